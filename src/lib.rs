//! The `tally` binary's library half: configuration, the wiring of ingest to the lake,
//! the workload generator, and output formatting. `main.rs` holds only the command line.
//! Integration tests under `tests/` drive these same pieces.

pub mod api;
pub mod bench;
pub mod chaos;
pub mod compact;
pub mod config;
pub mod definitions;
pub mod demo;
pub mod license;
pub mod metrics;
pub mod output;
pub mod pipeline;
pub mod reports;
pub mod sql;
pub mod workload;
