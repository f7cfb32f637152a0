//! A partition's checkpoint: the quota engine's counters and the event ids seen, as they
//! stood after one stream sequence.
//!
//! A worker writes one beside the lake every so often, only once every message up to
//! `last_seq` is durable and before it acknowledges them. A worker that takes the partition
//! over restores the latest checkpoint, replays the lake's rows past it with the decisions
//! they were stored with, and skips every redelivered message at or below what the lake
//! holds: it counts nothing twice and forgets no notification it sent.

use serde::{Deserialize, Serialize};

use crate::entitlement::UsagePeriod;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub partition: u16,
    /// Every message of the partition up to this stream sequence is in this state (and in
    /// the lake).
    pub last_seq: u64,
    pub accounts: Vec<Account>,
    /// The XXH3-128 hashes of the event ids seen, oldest first.
    pub seen: Vec<u128>,
}

/// What one customer has counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Account {
    pub customer: String,
    pub counters: Vec<Counter>,
    pub grants: Vec<Grant>,
    /// The seats of the whole plan.
    pub seats: Option<Seats>,
}

/// One metered feature's open period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Counter {
    pub feature: String,
    /// The period, in microseconds since the epoch (`i64::MIN` for both: none opened yet).
    pub start: i64,
    pub end: i64,
    /// Everything counted in the period.
    pub used: f64,
    /// The part counted against the period's limit.
    pub base: f64,
    /// Which notifications the period has sent (bit i: threshold i; bit 31: the first
    /// refusal).
    pub notified: u32,
    /// The feature's own seats.
    pub seats: Option<Seats>,
    /// The distinct values a `UNIQUE_COUNT` feature counted in the period (`users` holds
    /// their keys). Checkpoints before it (`TALLYCK1`) have none.
    #[serde(default)]
    pub values: Option<Seats>,
}

/// A grant's balance, with the terms it was granted on (a balance carries over only to a
/// grant with the same terms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    pub id: String,
    pub feature: String,
    pub amount: f64,
    pub effective: i64,
    pub recurring: Option<UsagePeriod>,
    pub remaining: f64,
    pub window: (i64, i64),
    pub exhausted_sent: bool,
}

/// Distinct users of a period, by the XXH3-64 hash of their id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Seats {
    pub period: UsagePeriod,
    pub start: i64,
    pub end: i64,
    pub users: Vec<u64>,
}
