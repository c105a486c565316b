-- Granary catalog, version 1. Keep this file portable between Postgres and SQLite:
-- TEXT and BIGINT only, timestamps in Unix milliseconds.
CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    spec        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE access_keys (
    access_key_id  TEXT PRIMARY KEY,
    tenant_id      TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    secret_sealed  TEXT NOT NULL,
    description    TEXT NOT NULL DEFAULT '',
    created_at     BIGINT NOT NULL,
    revoked_at     BIGINT
);
CREATE INDEX access_keys_by_tenant ON access_keys(tenant_id);

CREATE TABLE buckets (
    tenant_id   TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    id          TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, name)
);

CREATE TABLE nodes (
    id            TEXT PRIMARY KEY,
    region        TEXT NOT NULL,
    zone          TEXT NOT NULL,
    s3_addr       TEXT NOT NULL,
    kv_addr       TEXT NOT NULL,
    admin_addr    TEXT NOT NULL,
    rpc_addr      TEXT NOT NULL,
    heartbeat_at  BIGINT NOT NULL
);

-- Cluster-wide settings (partition count, region, ...), one row per key.
CREATE TABLE cluster_settings (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);

-- Partition layouts, one row per version; the highest version is current.
CREATE TABLE layouts (
    version     BIGINT PRIMARY KEY,
    partitions  BIGINT NOT NULL,
    body        TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
