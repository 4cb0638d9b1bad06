//! The controllers of `templatecache run`, one module per reconciler, sharing one [`Context`].

mod config;
mod context;
mod error;
pub mod events;
#[cfg(test)]
mod fixtures;
pub mod group_commit;
pub mod index;
pub mod jobs;
pub mod pacing;
pub mod pod_gate;
pub mod populator;
pub mod retry;
mod run;
pub mod staging_store;
pub mod template_cache;
pub mod template_cache_claim;
pub mod watched;
pub mod writes;

pub use config::{Config, DEFAULT_MAX_REFERENCES};
pub use context::Context;
pub use error::Error;
pub use run::{run, run_with};
