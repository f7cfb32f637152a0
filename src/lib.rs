//! The `tally` binary's commands. `main.rs` parses the command line and dispatches;
//! the process's parts are `tally-node`'s, the demo, chaos and benches
//! `tally-workbench`'s, and the reports `tally-reports`'. Their modules are re-exported
//! here under the names the integration tests use.

pub mod commands;

pub use commands::{compact, definitions, license, reports, sql};
pub use tally_node::{api, config, metrics, output, pipeline};
pub use tally_workbench::{bench, chaos, demo, workload};
