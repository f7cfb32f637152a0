//! Tally's domain types, shared by every other crate and free of I/O.
//!
//! A usage event arrives as CloudEvents 1.0 structured JSON ([`event`]), is decided
//! ([`Decision`]) and lands in the lake as one row of [`schema::lake_schema`]. The NATS
//! names every component agrees on (streams, subjects, the customer-token rule) live in
//! [`subject`], and the batch a worker hands to the lake in [`batch`]. What customers
//! bought (plans, add-ons, SKUs, grants) is in [`entitlement`], what it costs and how
//! usage is rated in [`pricing`], usage periods in
//! [`period`]; a partition's checkpoint of counters in [`snapshot`]; the deadline past
//! which a worker may no longer write a partition in [`fence`].

pub mod access;
pub mod batch;
pub mod columnar;
pub mod decision;
pub mod entitlement;
pub mod event;
pub mod fence;
pub mod meter;
pub mod metrics;
pub mod partitions;
pub mod period;
pub mod pricing;
pub mod schema;
pub mod snapshot;
pub mod subject;

pub use batch::{Durable, FlushRequest, SealedBatch};
pub use decision::Decision;
pub use event::{DecodeLimits, Event, Frame, Invalid, Reason};
pub use fence::Fence;
