//! The end-to-end suite, one test binary (DataFusion and the rest link once): a module
//! per area, sharing the harness in `common` (a real nats-server on a free port in its own
//! temporary directory, stopped on drop, and Tally's pipeline wired as the binary wires it).

mod common;

mod analytics;
mod api;
mod api_limits;
mod api_portal;
mod api_provisioning;
mod api_queries;
mod api_tls;
mod bad_input;
mod ballista;
mod billing;
mod chaos;
mod cli;
mod cluster;
mod compose;
mod enforcement;
mod entitlements;
mod faults;
mod golden;
mod lake;
mod meters;
mod metrics;
mod openmeter;
mod ownership;
mod partitions;
mod pipeline;
mod security;
mod sql;
