//! Checkpoints: a partition's counters and seen event ids (a [`Snapshot`]), one object
//! each in the lake's store (local disk or S3), beside its tables.
//!
//! ```text
//! <lake>/checkpoints/p<partition>/<last_seq>.ckpt
//! ```
//!
//! The object is `TALLYCK1`, the snapshot in postcard, and the XXH3-64 of that payload; a
//! put makes it appear whole (on local disk: written aside, fsynced and renamed). The
//! newest two are kept: a corrupt newest one falls back to the one before.

use bytes::Bytes;
use tally_core::Fence;
use tally_core::snapshot::Snapshot;

use crate::table::block_on;
use crate::{Error, Lake, Result};

const MAGIC: &[u8; 8] = b"TALLYCK1";
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
    let body = bytes.strip_prefix(MAGIC)?;
    let (payload, sum) = body.split_at_checked(body.len().checked_sub(8)?)?;
    let sum = u64::from_le_bytes(sum.try_into().ok()?);
    if xxhash_rust::xxh3::xxh3_64(payload) != sum {
        return None;
    }
    postcard::from_bytes(payload).ok()
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
}
