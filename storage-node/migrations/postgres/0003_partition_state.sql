-- Replication state per partition: who leads it under which epoch, and which replicas hold
-- every acknowledged write. The catalog is the configuration manager: a change is a
-- compare-and-set on the epoch, so two nodes can never both take the same partition.
CREATE TABLE partition_states (
    partition     BIGINT PRIMARY KEY,
    epoch         BIGINT NOT NULL,
    primary_node  TEXT NOT NULL,
    in_sync       TEXT NOT NULL,
    updated_at    BIGINT NOT NULL
);
