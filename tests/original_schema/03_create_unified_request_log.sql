-- create_unified_request_log.sql: one row per API request, for the original's stats.

CREATE TABLE IF NOT EXISTS `unified_request_log` (
  `id` BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  `request_id` VARCHAR(64) NOT NULL,
  `ip_address` VARCHAR(45) DEFAULT NULL,
  `client_id` VARCHAR(64) DEFAULT NULL,
  `openid` VARCHAR(64) DEFAULT NULL,
  `request_type` VARCHAR(32) NOT NULL,
  `total_images` INT UNSIGNED DEFAULT 0,
  `cached_count` INT UNSIGNED DEFAULT 0,
  `llm_count` INT UNSIGNED DEFAULT 0,
  `local_count` INT UNSIGNED DEFAULT 0,
  `created_at` DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
  `created_date` DATE GENERATED ALWAYS AS (DATE(`created_at`)) STORED,
  PRIMARY KEY (`id`),
  KEY `idx_request_type` (`request_type`),
  KEY `idx_created_date` (`created_date`),
  KEY `idx_ip_address` (`ip_address`),
  KEY `idx_openid` (`openid`),
  KEY `idx_client_id` (`client_id`),
  KEY `idx_request_id` (`request_id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
