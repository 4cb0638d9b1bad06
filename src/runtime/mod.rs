//! Process plumbing shared by the subcommands: logging (and later leader election, metrics and
//! health endpoints).

pub mod telemetry;
