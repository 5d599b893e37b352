-- init.sql: the two tables of the original system (utf8mb4, utf8mb4_unicode_ci).

CREATE TABLE IF NOT EXISTS `image_classification_cache` (
  `id` BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  `image_hash` VARCHAR(64) NOT NULL,
  `category` VARCHAR(50) NOT NULL,
  `confidence` DECIMAL(5,4) NOT NULL,
  `description` TEXT DEFAULT NULL,
  `model_used` VARCHAR(50) NOT NULL,
  `model_response` JSON DEFAULT NULL,
  `hit_count` INT UNSIGNED DEFAULT 1,
  `created_at` DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
  `last_hit_at` DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
  PRIMARY KEY (`id`),
  UNIQUE KEY `uk_image_hash` (`image_hash`),
  KEY `idx_created_at` (`created_at`),
  KEY `idx_category` (`category`),
  KEY `idx_hit_count` (`hit_count`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS `request_log` (
  `id` BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  `request_id` VARCHAR(64) NOT NULL,
  `user_id` VARCHAR(64) DEFAULT NULL,
  `ip_address` VARCHAR(45) DEFAULT NULL,
  `image_hash` VARCHAR(64) NOT NULL,
  `image_size` INT UNSIGNED DEFAULT NULL,
  `category` VARCHAR(50) NOT NULL,
  `confidence` DECIMAL(5,4) NOT NULL,
  `from_cache` TINYINT(1) DEFAULT 0,
  `processing_time_ms` INT UNSIGNED DEFAULT NULL,
  `created_at` DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
  `created_date` DATE GENERATED ALWAYS AS (DATE(`created_at`)) STORED,
  PRIMARY KEY (`id`),
  KEY `idx_user_id` (`user_id`),
  KEY `idx_ip_address` (`ip_address`),
  KEY `idx_created_date` (`created_date`),
  KEY `idx_from_cache` (`from_cache`),
  KEY `idx_created_at` (`created_at`),
  KEY `idx_category` (`category`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
