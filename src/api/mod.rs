//! The `FlowerCluster` resource (`flower.opennebula.io/v1alpha1`).
//!
//! Owns: the typed spec and status, their defaults and doc comments (the source of
//! `flower-reconcile explain` and of the JSON Schema), loading YAML files and
//! directories, and validation with errors that name file, field path and line.
//!
//! Must not: talk to OpenNebula, or know how a spec is turned into OpenNebula objects
//! (that is [`crate::render`]).

mod collect;
mod error;
pub mod explain;
pub mod load;
pub mod locate;
pub mod schema;
mod status;
pub mod tls;
mod types;
pub mod validate;

pub use error::*;
pub use load::{load_paths, spec_hash, LoadReport, Loaded, SourceRef};
pub use status::*;
pub use types::*;
pub use validate::is_cluster_name;

/// Every generated file: (path relative to the repository root, content).
pub fn generated_files() -> Vec<(&'static str, String)> {
    vec![
        (schema::JSON_SCHEMA_PATH, schema::json_schema_text()),
        (schema::CRD_PATH, schema::crd_text()),
        (schema::REFERENCE_PATH, explain::reference_markdown()),
    ]
}
