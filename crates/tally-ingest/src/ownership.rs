//! Which worker owns which partition: a lease per partition in a JetStream key-value
//! bucket, renewed with revision-checked updates.
//!
//! The bucket `tally_leases` holds one key per partition (`p007`) whose value is the id
//! of the worker process that owns it. Its entries expire `lease` after their last write
//! (the bucket's `max_age`), so a worker that dies loses its partitions without anyone
//! deleting anything:
//!
//! - **Acquire** is a `create`: it succeeds only when the key is absent (never written,
//!   expired, or deleted by a worker that let the partition go).
//! - **Renew** is an `update` that names the revision this worker last wrote. It fails
//!   once the entry has expired or another worker has written it, and then the partition
//!   is lost at once.
//! - **Write fencing.** Each renewal moves the partition's [`Fence`] to
//!   `sent + lease − margin`, where `sent` is when the renewal left this process. The
//!   server cannot have stored the renewal earlier than that, so its entry expires at
//!   least `margin` after the fence closes, and the lake refuses this worker's files once
//!   the fence is closed (see [`tally_core::fence`]). A worker cut off from NATS, stalled,
//!   or slower than its lease therefore writes nothing after another may own the
//!   partition.
//! - **Release** at a clean stop (or to hand a partition to a newcomer) waits until the
//!   partition has drained, then deletes the key with its revision, so the next owner
//!   starts at once instead of after the lease.
//!
//! Workers also announce themselves in `tally_workers` (same expiry) so that each can take
//! a fair share: `ceil(partitions / live workers)`. A worker with more than its share lets
//! the highest-numbered go; one with fewer acquires free ones. A worker started with
//! `--partitions` owns exactly those, waiting for any that another holds.
//!
//! Why a lease rather than a consumer setting that allows one active puller (priority
//! groups with a pinned client): the pin decides who may *pull*, but a worker that lost it
//! may still hold sealed batches on their way to the lake. Ownership here must fence the
//! *writes*, and a lease with a deadline known on both sides does.

use std::time::{Duration, Instant};

use async_nats::jetstream::Context;
use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use async_nats::jetstream::stream::StorageType;
use futures::TryStreamExt;

use crate::{Error, Result};

pub use tally_core::subject::{LEASES_BUCKET, WORKERS_BUCKET};

/// The key of a partition's lease.
pub fn lease_key(partition: u16) -> String {
    format!("p{partition:03}")
}

/// This process's leases.
#[derive(Debug, Clone)]
pub struct Leases {
    leases: kv::Store,
    workers: kv::Store,
    /// This worker process: the value of its leases.
    pub id: String,
    pub lease: Duration,
}

/// A lease this worker holds: the revision it last wrote.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    pub revision: u64,
    /// When the write of `revision` left this process.
    pub sent: Instant,
}

impl Leases {
    /// Opens (creating if needed) the two buckets, entries expiring `lease` after their
    /// last write, with `replicas` copies each.
    pub async fn open(js: &Context, lease: Duration, replicas: usize) -> Result<Leases> {
        let bucket = |name: &str, description: &str| kv::Config {
            bucket: name.to_owned(),
            description: description.to_owned(),
            history: 1,
            max_age: lease,
            storage: StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        };
        let leases =
            crate::topology::ensure_bucket(js, bucket(LEASES_BUCKET, "Tally partition leases"))
                .await
                .map_err(|e| Error::nats("open the leases bucket", e))?;
        let workers =
            crate::topology::ensure_bucket(js, bucket(WORKERS_BUCKET, "Live Tally workers"))
                .await
                .map_err(|e| Error::nats("open the workers bucket", e))?;
        Ok(Leases {
            leases,
            workers,
            id: worker_id(),
            lease,
        })
    }

    /// Until when this worker may write a partition it renewed at `sent`.
    pub fn deadline(&self, sent: Instant) -> Instant {
        sent + self.lease - self.margin()
    }

    /// Between the fence closing and the lease expiring on the server: covers a file's
    /// last rename and clocks that drift apart.
    fn margin(&self) -> Duration {
        self.lease / 4
    }

    /// Takes a partition if no one holds it.
    pub async fn acquire(&self, partition: u16) -> Result<Option<Held>> {
        let sent = Instant::now();
        match self
            .leases
            .create(lease_key(partition), self.id.clone().into())
            .await
        {
            Ok(revision) => Ok(Some(Held { revision, sent })),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(Error::nats("acquire a partition lease", e)),
        }
    }

    /// Renews a held lease: `Ok(false)` when it is no longer this worker's.
    pub async fn renew(&self, partition: u16, held: &mut Held) -> Result<bool> {
        let sent = Instant::now();
        match self
            .leases
            .update(lease_key(partition), self.id.clone().into(), held.revision)
            .await
        {
            Ok(revision) => {
                *held = Held { revision, sent };
                Ok(true)
            }
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                // An earlier renewal whose answer was lost (it timed out while NATS
                // elected a leader) may have landed: the entry still names this worker,
                // whose id no other process writes. Its fence is not extended: when that
                // write landed is unknown, but not before the last renewal known.
                let entry = self
                    .leases
                    .entry(lease_key(partition))
                    .await
                    .map_err(|e| Error::nats("read a partition lease", e))?;
                match entry {
                    Some(entry)
                        if entry.operation == kv::Operation::Put
                            && entry.value.as_ref() == self.id.as_bytes() =>
                    {
                        held.revision = entry.revision;
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            }
            Err(e) => Err(Error::nats("renew a partition lease", e)),
        }
    }

    /// Gives a lease up, if it is still this worker's.
    pub async fn release(&self, partition: u16, held: Held) -> Result<()> {
        self.leases
            .delete_expect_revision(lease_key(partition), Some(held.revision))
            .await
            .map_err(|e| Error::nats("release a partition lease", e))
    }

    /// The worker holding a partition, if any.
    pub async fn owner(&self, partition: u16) -> Result<Option<String>> {
        let value = self
            .leases
            .get(lease_key(partition))
            .await
            .map_err(|e| Error::nats("read a partition lease", e))?;
        Ok(value.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Says this worker is alive (for a lease); returns how many are.
    pub async fn heartbeat(&self) -> Result<usize> {
        self.workers
            .put(&self.id, bytes::Bytes::new())
            .await
            .map_err(|e| Error::nats("announce this worker", e))?;
        let keys: Vec<String> = self
            .workers
            .keys()
            .await
            .map_err(|e| Error::nats("list the live workers", e))?
            .try_collect()
            .await
            .map_err(|e| Error::nats("list the live workers", e))?;
        Ok(keys.len().max(1))
    }

    /// Leaves the workers' list at a clean stop.
    pub async fn leave(&self) {
        if let Err(e) = self.workers.delete(&self.id).await {
            tracing::warn!(error = %e, "cannot leave the workers' list; it expires by itself");
        }
    }
}

/// `<host>-<pid>-<random>`: says which process holds a lease, and is unique across
/// restarts. Only the characters a key may hold.
fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &random[..8])
}

/// The process id in a worker id.
pub fn worker_pid(id: &str) -> Option<u32> {
    id.rsplit('-').nth(1)?.parse().ok()
}

/// Which partitions a worker takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assignment {
    /// Exactly these, waiting for any another worker holds.
    Fixed(Vec<u16>),
    /// A fair share of all partitions among the live workers.
    Shared,
}

impl Assignment {
    /// The partitions this worker may ever own.
    pub fn candidates(&self, total: u16) -> Vec<u16> {
        match self {
            Assignment::Fixed(list) => list.clone(),
            Assignment::Shared => (0..total).collect(),
        }
    }

    /// How many partitions this worker should own with `workers` alive.
    pub fn share(&self, total: u16, workers: usize) -> usize {
        match self {
            Assignment::Fixed(list) => list.len(),
            Assignment::Shared => usize::from(total).div_ceil(workers.max(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_id_names_its_process() {
        let id = worker_id();
        assert_eq!(worker_pid(&id), Some(std::process::id()));
        assert!(
            id.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }

    #[test]
    fn a_shared_worker_takes_a_fair_share_and_a_fixed_one_its_list() {
        let shared = Assignment::Shared;
        assert_eq!(shared.share(16, 1), 16);
        assert_eq!(shared.share(16, 2), 8);
        assert_eq!(shared.share(16, 3), 6);
        assert_eq!(shared.share(16, 0), 16);
        assert_eq!(shared.candidates(4), vec![0, 1, 2, 3]);
        let fixed = Assignment::Fixed(vec![2, 5]);
        assert_eq!(fixed.share(16, 3), 2);
        assert_eq!(fixed.candidates(16), vec![2, 5]);
    }
}
