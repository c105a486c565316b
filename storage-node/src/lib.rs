//! Granary storage node.
//!
//! Layers, each importing only from the ones below it:
//! `s3`, `kv`, `admin` (front ends, with `jsonapi` for their JSON errors) ->
//! `tenancy` (auth, admission) -> `model` (buckets, objects, multipart, KV semantics)
//! -> `engine` (local crash-safe store) and `catalog` (SQL); `cluster` (membership,
//! layout, internal RPC) sits on the catalog beside the model. `server` wires them;
//! `telemetry`, `config` and `types` are shared by all.

pub mod admin;
pub mod catalog;
pub mod cluster;
pub mod cold;
pub mod config;
pub mod engine;
pub mod jsonapi;
pub mod kv;
pub mod model;
pub mod s3;
pub mod server;
pub mod telemetry;
pub mod tenancy;
pub mod types;
