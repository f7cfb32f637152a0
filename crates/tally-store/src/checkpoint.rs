//! Checkpoints: a partition's counters and seen event ids (a [`Snapshot`]), one object
//! each in the lake's store (local disk or S3), beside its tables.
//!
//! ```text
//! <lake>/checkpoints/p<partition>/<last_seq>.ckpt
//! ```
//!
//! The object is `TALLYCK2`, the snapshot in postcard, and the XXH3-64 of that payload; a
//! put makes it appear whole (on local disk: written aside, fsynced and renamed). The
//! newest two are kept: a corrupt newest one falls back to the one before. Postcard
//! writes fields by position, so a snapshot with another shape is another format: a
//! `TALLYCK1` object (written before counters kept distinct values) is still read.

use bytes::Bytes;
use tally_core::Fence;
use tally_core::snapshot::Snapshot;

use crate::table::block_on;
use crate::{Error, Lake, Result};

const MAGIC: &[u8; 8] = b"TALLYCK2";
/// The format before counters kept distinct values ([`v1`]).
const MAGIC_V1: &[u8; 8] = b"TALLYCK1";
const KEEP: usize = 2;
const CHECKPOINTS: &str = "checkpoints";

impl Lake {
    fn checkpoints_dir(partition: u16) -> String {
        format!("{CHECKPOINTS}/p{partition:03}")
    }

    /// Writes a partition's checkpoint durably and drops all but the newest two, if the
    /// partition's fence still holds. Returns its size in bytes.
    pub fn write_checkpoint(&self, snapshot: &Snapshot, fence: &Fence) -> Result<u64> {
        let dir = Self::checkpoints_dir(snapshot.partition);
        let payload =
            postcard::to_stdvec(snapshot).map_err(|e| Error::Checkpoint(e.to_string()))?;
        let mut bytes = Vec::with_capacity(MAGIC.len() + payload.len() + 8);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&payload);
        bytes.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&payload).to_le_bytes());
        let size = bytes.len() as u64;
        if !fence.holds() {
            return Err(Error::Fenced(snapshot.partition));
        }
        let key = format!("{dir}/{:020}.ckpt", snapshot.last_seq);
        block_on(async {
            self.storage.put(&key, Bytes::from(bytes)).await?;
            for old in self
                .checkpoint_keys(snapshot.partition)
                .await?
                .into_iter()
                .skip(KEEP)
            {
                self.storage.delete(&old).await?;
            }
            Ok(size)
        })
    }

    /// The newest readable checkpoint of a partition.
    pub fn latest_checkpoint(&self, partition: u16) -> Result<Option<Snapshot>> {
        block_on(async {
            for key in self.checkpoint_keys(partition).await? {
                // None: removed by a newer checkpoint's writer since the listing.
                let Some(bytes) = self.storage.get_if_exists(&key).await? else {
                    continue;
                };
                match decode(&bytes) {
                    Some(snapshot) if snapshot.partition == partition => {
                        return Ok(Some(snapshot));
                    }
                    _ => tracing::error!(%key, "unreadable checkpoint; trying an older one"),
                }
            }
            Ok(None)
        })
    }

    /// The keys of a partition's checkpoints (relative to the lake), newest first.
    pub(crate) async fn checkpoint_keys(&self, partition: u16) -> Result<Vec<String>> {
        let mut keys: Vec<String> = self
            .storage
            .list(&Self::checkpoints_dir(partition))
            .await?
            .into_iter()
            .map(|(key, _)| key)
            .filter(|k| {
                k.ends_with(".ckpt") && !k.rsplit('/').next().is_some_and(|n| n.starts_with('.'))
            })
            .collect();
        // Zero-padded sequence numbers: the keys sort as the sequences do.
        keys.sort_unstable_by(|a, b| b.cmp(a));
        Ok(keys)
    }
}

fn decode(bytes: &[u8]) -> Option<Snapshot> {
    let (v1, body) = match bytes.strip_prefix(MAGIC) {
        Some(body) => (false, body),
        None => (true, bytes.strip_prefix(MAGIC_V1)?),
    };
    let (payload, sum) = body.split_at_checked(body.len().checked_sub(8)?)?;
    let sum = u64::from_le_bytes(sum.try_into().ok()?);
    if xxhash_rust::xxh3::xxh3_64(payload) != sum {
        return None;
    }
    if v1 {
        return postcard::from_bytes::<v1::Snapshot>(payload)
            .ok()
            .map(Into::into);
    }
    postcard::from_bytes(payload).ok()
}

/// The snapshot as `TALLYCK1` objects hold it: a counter without distinct values.
mod v1 {
    use serde::Deserialize;
    use tally_core::snapshot::{self, Grant, Seats};

    #[derive(Deserialize)]
    pub(super) struct Snapshot {
        partition: u16,
        last_seq: u64,
        accounts: Vec<Account>,
        seen: Vec<u128>,
    }

    #[derive(Deserialize)]
    struct Account {
        customer: String,
        counters: Vec<Counter>,
        grants: Vec<Grant>,
        seats: Option<Seats>,
    }

    #[derive(Deserialize)]
    struct Counter {
        feature: String,
        start: i64,
        end: i64,
        used: f64,
        base: f64,
        notified: u32,
        seats: Option<Seats>,
    }

    impl From<Snapshot> for snapshot::Snapshot {
        fn from(s: Snapshot) -> Self {
            snapshot::Snapshot {
                partition: s.partition,
                last_seq: s.last_seq,
                seen: s.seen,
                accounts: s
                    .accounts
                    .into_iter()
                    .map(|a| snapshot::Account {
                        customer: a.customer,
                        grants: a.grants,
                        seats: a.seats,
                        counters: a
                            .counters
                            .into_iter()
                            .map(|c| snapshot::Counter {
                                feature: c.feature,
                                start: c.start,
                                end: c.end,
                                used: c.used,
                                base: c.base,
                                notified: c.notified,
                                seats: c.seats,
                                values: None,
                            })
                            .collect(),
                    })
                    .collect(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tally_core::entitlement::UsagePeriod;
    use tally_core::snapshot::{Account, Counter, Grant, Seats};

    use super::*;

    fn snapshot(last_seq: u64) -> Snapshot {
        Snapshot {
            partition: 7,
            last_seq,
            accounts: vec![Account {
                customer: "acme ✓".to_owned(),
                counters: vec![Counter {
                    feature: "api-calls".to_owned(),
                    start: 1,
                    end: 2,
                    used: 10.5,
                    base: 10.0,
                    notified: 1 | 1 << 31,
                    seats: Some(Seats {
                        period: UsagePeriod::Month,
                        start: 1,
                        end: 2,
                        users: vec![42, 7],
                    }),
                    values: None,
                }],
                grants: vec![Grant {
                    id: "g1".to_owned(),
                    feature: "api-calls".to_owned(),
                    amount: 5.0,
                    effective: 0,
                    recurring: None,
                    remaining: 4.5,
                    window: (i64::MIN, i64::MAX),
                    exhausted_sent: false,
                }],
                seats: None,
            }],
            seen: vec![u128::MAX, 1],
        }
    }

    #[test]
    fn the_newest_checkpoint_comes_back_and_two_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        assert_eq!(lake.latest_checkpoint(7).unwrap(), None);
        for seq in [5, 900, 12_000] {
            lake.write_checkpoint(&snapshot(seq), &Fence::open())
                .unwrap();
        }
        assert_eq!(lake.latest_checkpoint(7).unwrap(), Some(snapshot(12_000)));
        assert_eq!(block_on(lake.checkpoint_keys(7)).unwrap().len(), 2);
        assert_eq!(lake.latest_checkpoint(8).unwrap(), None);
    }

    #[test]
    fn a_corrupt_checkpoint_falls_back_to_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        lake.write_checkpoint(&snapshot(10), &Fence::open())
            .unwrap();
        lake.write_checkpoint(&snapshot(20), &Fence::open())
            .unwrap();
        let newest = dir
            .path()
            .join(&block_on(lake.checkpoint_keys(7)).unwrap()[0]);
        let mut bytes = std::fs::read(&newest).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&newest, bytes).unwrap();
        assert_eq!(lake.latest_checkpoint(7).unwrap(), Some(snapshot(10)));
    }

    #[test]
    fn checkpoints_of_the_format_before_distinct_values_are_still_read() {
        let mut now = snapshot(12_000);
        // What a TALLYCK1 object holds: the same fields in the same order, a counter
        // without its distinct values.
        let a = &now.accounts[0];
        let c = &a.counters[0];
        let counter = (
            &c.feature, c.start, c.end, c.used, c.base, c.notified, &c.seats,
        );
        let account = (&a.customer, vec![counter], &a.grants, &a.seats);
        let old = (now.partition, now.last_seq, vec![account], &now.seen);
        let payload = postcard::to_stdvec(&old).unwrap();
        let mut bytes = MAGIC_V1.to_vec();
        bytes.extend_from_slice(&payload);
        bytes.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&payload).to_le_bytes());
        assert_eq!(decode(&bytes), Some(now.clone()));

        // The current format keeps them.
        now.accounts[0].counters[0].values = Some(Seats {
            period: UsagePeriod::Day,
            start: 3,
            end: 4,
            users: vec![9, 8, 7],
        });
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        lake.write_checkpoint(&now, &Fence::open()).unwrap();
        assert_eq!(lake.latest_checkpoint(7).unwrap(), Some(now));
    }
}
