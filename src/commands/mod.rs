//! One module per subcommand of `tally` (`serve` also runs `worker` and `api`;
//! `reports` is what the three reports share).

pub mod adoption;
pub mod ballista;
pub mod billing;
pub mod chaos;
pub mod check;
pub mod compact;
pub mod definitions;
pub mod demo;
pub mod keys;
pub mod lake;
pub mod license;
pub mod meters;
pub mod nats;
pub mod overage;
pub mod partitions;
pub mod reports;
pub mod serve;
pub mod sql;
