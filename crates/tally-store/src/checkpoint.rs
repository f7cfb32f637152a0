//! Checkpoints: a partition's counters and seen event ids (a [`Snapshot`]), one file each.
//!
//! ```text
//! <root>/checkpoints/p<partition>/<last_seq>.ckpt
//! ```
//!
//! The file is `TALLYCK1`, the snapshot in postcard, and the XXH3-64 of that payload; it
//! appears atomically like a lake file. The newest two are kept: a torn or corrupt newest
//! one (which the atomic rename should make impossible) falls back to the one before.

use std::fs::{self, File};
use std::io::Write;
use std::path::PathBuf;

use tally_core::Fence;
use tally_core::snapshot::Snapshot;

use crate::{Error, Lake, Result, io_err, publish, sync_dir};

const MAGIC: &[u8; 8] = b"TALLYCK1";
const KEEP: usize = 2;

impl Lake {
    fn checkpoints_dir(&self, partition: u16) -> PathBuf {
        self.root
            .join("checkpoints")
            .join(format!("p{partition:03}"))
    }

    /// Writes a partition's checkpoint durably and drops all but the newest two, if the
    /// partition's fence still holds. Returns its size in bytes.
    pub fn write_checkpoint(&self, snapshot: &Snapshot, fence: &Fence) -> Result<u64> {
        let dir = self.checkpoints_dir(snapshot.partition);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let payload =
            postcard::to_stdvec(snapshot).map_err(|e| Error::Checkpoint(e.to_string()))?;
        let name = format!("{:020}.ckpt", snapshot.last_seq);
        let (tmp, path) = (dir.join(format!(".{name}.tmp")), dir.join(&name));
        let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
        file.write_all(MAGIC)
            .and_then(|()| file.write_all(&payload))
            .and_then(|()| file.write_all(&xxhash_rust::xxh3::xxh3_64(&payload).to_le_bytes()))
            .and_then(|()| file.sync_all())
            .map_err(io_err(&tmp))?;
        drop(file);
        publish(&tmp, &path, fence, snapshot.partition)?;
        sync_dir(&dir)?;
        for old in self
            .checkpoint_files(snapshot.partition)?
            .into_iter()
            .skip(KEEP)
        {
            fs::remove_file(&old).map_err(io_err(&old))?;
        }
        Ok((MAGIC.len() + payload.len() + 8) as u64)
    }

    /// The newest readable checkpoint of a partition.
    pub fn latest_checkpoint(&self, partition: u16) -> Result<Option<Snapshot>> {
        for path in self.checkpoint_files(partition)? {
            let bytes = fs::read(&path).map_err(io_err(&path))?;
            match decode(&bytes) {
                Some(snapshot) if snapshot.partition == partition => return Ok(Some(snapshot)),
                _ => {
                    tracing::error!(path = %path.display(), "unreadable checkpoint; trying an older one")
                }
            }
        }
        Ok(None)
    }

    /// A partition's checkpoint files, newest first.
    pub(crate) fn checkpoint_files(&self, partition: u16) -> Result<Vec<PathBuf>> {
        let dir = self.checkpoints_dir(partition);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "ckpt"))
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        // Zero-padded sequence numbers: the names sort as the sequences do.
        files.sort_unstable_by(|a, b| b.cmp(a));
        Ok(files)
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
        assert_eq!(lake.checkpoint_files(7).unwrap().len(), 2);
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
        let newest = lake.checkpoint_files(7).unwrap()[0].clone();
        let mut bytes = fs::read(&newest).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        fs::write(&newest, bytes).unwrap();
        assert_eq!(lake.latest_checkpoint(7).unwrap(), Some(snapshot(10)));
    }
}
