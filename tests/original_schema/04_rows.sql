-- Rows as the original's code writes them. Photos are named by the client: the
-- SHA-256 of the ORIGINAL file (here of b"IMG_000N.xxx original bytes"), while the
-- bytes it classified were a resized copy. created_at and last_hit_at are the
-- columns' defaults (the server's NOW()); model_response is never written.

-- cache_service.save_result, first version (no hit_count: the default 1 applies),
-- model_used = settings.LLM_MODEL.
INSERT INTO image_classification_cache
(image_hash, category, confidence, description, model_used)
VALUES ('2928dec604b2f725c4087eb16e330b94434fe82cb038ffc3fc63d949a0db358f', 'travel_scenery', 0.87, '海边的日落，远处有灯塔', 'gpt-4-vision-preview');

-- cache_service.save_result, later versions: hit_count 1, model_used = f"{model}_{inference_method}".
INSERT INTO image_classification_cache
(image_hash, category, confidence, description, model_used, hit_count)
VALUES ('492723251cbc8b035a9d9a2237ad33c594be66609de98bf152487c3a6af918ee', 'pets', 0.95, '一只橘猫趴在沙发上', 'qwen-vl-plus_llm', 1);

INSERT INTO image_classification_cache
(image_hash, category, confidence, description, model_used, hit_count)
VALUES ('f94ce82671eec6551f9b79a8ea6bbfd0693a1140de687afd727f8fca36a6c897', 'foods', 0.92, '一碗牛肉面', 'qwen-vl-plus_llm_fallback', 1);

-- cache_service.increment_hit_count, on every hit: the cat twice, the noodles once.
UPDATE image_classification_cache SET hit_count = hit_count + 1, last_hit_at = NOW()
WHERE image_hash = '492723251cbc8b035a9d9a2237ad33c594be66609de98bf152487c3a6af918ee';

UPDATE image_classification_cache SET hit_count = hit_count + 1, last_hit_at = NOW()
WHERE image_hash = '492723251cbc8b035a9d9a2237ad33c594be66609de98bf152487c3a6af918ee';

UPDATE image_classification_cache SET hit_count = hit_count + 1, last_hit_at = NOW()
WHERE image_hash = 'f94ce82671eec6551f9b79a8ea6bbfd0693a1140de687afd727f8fca36a6c897';

-- stats_service.log_request (with inference_method): a /classify answered by the LLM,
-- image_size = the uploaded (resized) bytes, processing_time_ms an int.
INSERT INTO request_log (
    request_id, user_id, ip_address, image_hash, image_size,
    category, confidence, from_cache, processing_time_ms, inference_method
) VALUES ('req_1760081234_a3f5d8c2b1e9', 'device-7f3a', '203.0.113.5', '492723251cbc8b035a9d9a2237ad33c594be66609de98bf152487c3a6af918ee', 245760, 'pets', 0.95, 0, 3120, 'llm');

-- A check-cache hit: image_size 0 (only the hash is known), from_cache 1.
INSERT INTO request_log (
    request_id, user_id, ip_address, image_hash, image_size,
    category, confidence, from_cache, processing_time_ms, inference_method
) VALUES ('req_1760081301_0c9be27d4f15', 'device-7f3a', '203.0.113.5', '492723251cbc8b035a9d9a2237ad33c594be66609de98bf152487c3a6af918ee', 0, 'pets', 0.95, 1, 12, 'cache');

-- A local inference (never cached): category "local_pending", confidence 0.8, no user.
INSERT INTO request_log (
    request_id, user_id, ip_address, image_hash, image_size,
    category, confidence, from_cache, processing_time_ms, inference_method
) VALUES ('req_1760081377_5e21a07bc3d8', NULL, '198.51.100.23', 'c1d7e6a3ba2f0b1de6a8e2f5b3c4d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f80', 183022, 'local_pending', 0.8, 0, 96, 'local');

-- stats_service.log_unified_request for the check-cache above.
INSERT INTO unified_request_log (
    request_id, request_type, ip_address, client_id, openid,
    total_images, cached_count, llm_count, local_count, created_at
) VALUES ('req_1760081301_0c9be27d4f15', 'single_cache', '203.0.113.5', 'device-7f3a', NULL, 1, 1, 0, 0, NOW());
