-- Cluster membership: a node's relative capacity, its weight in partition placement.
ALTER TABLE nodes ADD COLUMN capacity BIGINT NOT NULL DEFAULT 1;
