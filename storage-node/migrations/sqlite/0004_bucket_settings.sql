-- Settings S3 keeps per bucket (its tag set, its public access block), one row per kind,
-- the value a JSON document. Deleted with the bucket.
CREATE TABLE bucket_settings (
    bucket_id  TEXT NOT NULL REFERENCES buckets(id) ON DELETE CASCADE,
    kind       TEXT NOT NULL,
    value      TEXT NOT NULL,
    PRIMARY KEY (bucket_id, kind)
);
