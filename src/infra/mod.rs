//! What the operator process runs on besides its reconcilers: logging, leader election, the
//! metrics registry (which names cache phases, so it knows the API types) and the health and
//! metrics endpoint. No reconciler logic lives here.

pub mod http;
pub mod leader;
pub mod metrics;
pub mod telemetry;
