//! Tally's proving ground, run by `tally demo`, `tally chaos` and `tally bench`:
//!
//! - [`workload`]: a realistic month of usage (a few large customers and a long tail,
//!   malformed events and duplicates at set rates) and its publisher;
//! - [`demo`]: the whole pipeline on the embedded default, checked against an
//!   independent replay, with the month's invoices, overage and adoption;
//! - [`chaos`]: the fault suite (workers killed, nats-server restarted, the lake refusing
//!   writes) and the exactness check after it;
//! - [`bench`]: the benchmarks of ingest, the quota engine, checks, recovery, queries and
//!   HTTP, whose figures BENCHMARKS.md records.

pub mod bench;
pub mod chaos;
pub mod demo;
pub mod workload;
