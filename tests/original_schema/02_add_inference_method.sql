-- add_inference_method.sql: how each request was answered (the column goes last,
-- after the generated created_date), and two indexes for the original's stats.

ALTER TABLE request_log ADD COLUMN inference_method VARCHAR(20) DEFAULT 'llm';

CREATE INDEX idx_inference_method ON request_log(inference_method);

CREATE INDEX idx_created_date_method ON request_log(created_date, inference_method);
