//! Process plumbing shared by the subcommands: logging, leader election, metrics and the health
//! endpoints. Nothing here knows about caches.

pub mod http;
pub mod leader;
pub mod metrics;
pub mod telemetry;
