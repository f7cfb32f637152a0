//! The worker's entitlements: the quota engine, kept current by watching the buckets.
//!
//! At start the worker reads both buckets whole (the latest value of every key) and then
//! follows their changes. Each watch is supervised: when it ends or fails (a NATS restart,
//! say) it is re-created from the revision after the last one applied, so no change is
//! missed or applied twice.
//!
//! A change acknowledged to its writer applies to the next event the worker decides: before
//! deciding a message stored after the last synchronisation point, the worker reads the
//! buckets' last revisions and waits until the watches have applied them
//! ([`Entitlements::sync_for`]). Under load the messages being decided were stored before
//! the last synchronisation, so this costs a request now and then, not one per message.
//!
//! Each owned partition has an engine of its own, behind a lock that only its partition
//! task and the watches take (so partitions never wait for each other): it holds the
//! partition's customers, and every plan and add-on.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::kv::{Entry, Operation, Store};
use async_nats::jetstream::response::Response;
use futures::StreamExt;
use tally_core::entitlement::{AddOn, Customer, Plan};
use tally_core::meter::{Feature, Meter};
use tally_core::partitions::Partitions;
use tally_core::subject::{CATALOG_BUCKET, CUSTOMERS_BUCKET, id_from_kv_key};
use tally_quota::Engine;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::definitions::Definitions;
use crate::{Error, Result};

/// How far the clocks of the servers leading the buckets' streams and the events stream may
/// disagree (in a cluster they are different hosts) before a message stored just before a
/// synchronisation is taken for one stored after it (which only costs a sync). Every time
/// compared is a server's: the worker's own clock never enters.
const CLOCK_MARGIN_US: i64 = 5_000;
/// How long a sync waits for the watches before deciding with what it has.
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a bucket's last revision is asked for before the partition fails.
const REVISION_WAIT: Duration = Duration::from_secs(20);

/// The engines of one worker process and what keeps them current.
pub struct Entitlements {
    /// By partition; `None` for a partition this process does not own.
    engines: Vec<Option<Owned>>,
    /// Which partitions hold which customer (a partition from before a growth holds its
    /// children's customers too: see [`Partitions::holds`]).
    partitions: Partitions,
    catalog: Followed,
    customers: Followed,
    /// Messages stored at or before this time (µs, nats-server's clock, less the margin)
    /// are decided with every change acknowledged before them.
    synced_until: AtomicI64,
    sync: tokio::sync::Mutex<()>,
    js: Context,
    /// Fault injection (tests): a pause before each change is applied.
    apply_delay: Duration,
    /// Record requests waiting for their event's decision.
    pub waiters: crate::record::Waiters,
    /// Every meter by id, and the lake whose flushes roll them up.
    meters: Mutex<std::collections::BTreeMap<String, Meter>>,
    lake: Option<tally_store::Lake>,
}

impl std::fmt::Debug for Entitlements {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entitlements")
            .field("partitions", &self.partitions.to_string())
            .finish_non_exhaustive()
    }
}

/// An owned partition's engine, and how many definition changes it has taken (watched by
/// the partition task, which checkpoints after a change).
struct Owned {
    engine: Mutex<Engine>,
    changes: watch::Sender<u64>,
}

/// One watched bucket: its stream, and the last revision applied.
struct Followed {
    stream: String,
    applied: watch::Sender<u64>,
    /// The bucket's last revision when the worker started: changes after it are news.
    started_at: std::sync::atomic::AtomicU64,
}

impl Entitlements {
    /// Opens the buckets, starts the watches and waits until everything stored now is
    /// applied. The watches run until `cancel`.
    pub async fn start(
        js: &Context,
        owned: &[u16],
        partitions: Partitions,
        replicas: usize,
        apply_delay: Duration,
        lake: Option<tally_store::Lake>,
        cancel: CancellationToken,
    ) -> Result<Arc<Entitlements>> {
        let definitions = Definitions::open(js, replicas).await?;
        let (catalog, customers) = definitions.stores();
        let engines = (0..partitions.current())
            .map(|p| {
                owned.contains(&p).then(|| Owned {
                    engine: Mutex::new(Engine::new()),
                    changes: watch::Sender::new(0),
                })
            })
            .collect();
        let this = Arc::new(Entitlements {
            engines,
            partitions,
            catalog: Followed {
                stream: catalog.stream_name.clone(),
                applied: watch::Sender::new(0),
                started_at: std::sync::atomic::AtomicU64::new(u64::MAX),
            },
            customers: Followed {
                stream: customers.stream_name.clone(),
                applied: watch::Sender::new(0),
                started_at: std::sync::atomic::AtomicU64::new(u64::MAX),
            },
            synced_until: AtomicI64::new(i64::MIN),
            waiters: crate::record::Waiters::default(),
            apply_delay,
            sync: tokio::sync::Mutex::new(()),
            js: js.clone(),
            meters: Mutex::default(),
            lake,
        });
        let (c, k) = tokio::join!(
            this.last_revision(&this.catalog),
            this.last_revision(&this.customers)
        );
        this.catalog.started_at.store(c?.0, Ordering::Release);
        this.customers.started_at.store(k?.0, Ordering::Release);
        tokio::spawn(follow(this.clone(), catalog, cancel.clone()));
        tokio::spawn(follow(this.clone(), customers, cancel));
        // Everything written so far, whenever it was stored.
        this.sync_for(i64::MAX).await?;
        Ok(this)
    }

    /// A partition's engine, for deciding one message's events. Hold it only while
    /// deciding. `None` for a partition this process does not own.
    pub fn engine(&self, partition: u16) -> Option<MutexGuard<'_, Engine>> {
        let owned = self.owned(partition)?;
        Some(
            owned
                .engine
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// Changes whenever a definition change reaches the partition's engine.
    pub fn changes(&self, partition: u16) -> Option<watch::Receiver<u64>> {
        Some(self.owned(partition)?.changes.subscribe())
    }

    fn owned(&self, partition: u16) -> Option<&Owned> {
        self.engines.get(usize::from(partition))?.as_ref()
    }

    /// Runs `f` on a partition's engine and counts it as a change.
    fn change(&self, partition: u16, f: impl FnOnce(&mut Engine)) -> Option<()> {
        f(&mut *self.engine(partition)?);
        self.owned(partition)?.changes.send_modify(|n| *n += 1);
        Some(())
    }

    /// Runs `f` on every owned partition's engine, one at a time.
    fn each_engine(&self, mut f: impl FnMut(&mut Engine)) {
        for p in 0..self.partitions.current() {
            self.change(p, &mut f);
        }
    }

    /// Keeps the lake's meters current: each flush rolls up the live meters' values
    /// ([`tally_store::meter_rollup`]).
    fn roll_up(&self, id: &str, meter: Option<Meter>) {
        let Some(lake) = &self.lake else {
            return;
        };
        let mut meters = self.meters.lock().unwrap_or_else(|p| p.into_inner());
        match meter {
            Some(m) => meters.insert(id.to_owned(), m),
            None => meters.remove(id),
        };
        lake.set_meters(meters.values());
    }

    /// Makes sure every change acknowledged before `stored_us` (a message's JetStream
    /// timestamp) is applied.
    pub async fn sync_for(&self, stored_us: i64) -> Result<()> {
        if stored_us <= self.synced_until.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one_at_a_time = self.sync.lock().await;
        // Another partition may have synchronised while this one waited.
        if stored_us <= self.synced_until.load(Ordering::Acquire) {
            return Ok(());
        }
        // Both buckets' last revisions, asked at once.
        let (catalog, customers) = tokio::join!(
            self.last_revision(&self.catalog),
            self.last_revision(&self.customers)
        );
        let (catalog, customers) = (catalog?, customers?);
        // Every change stored before the servers answered has one of these revisions.
        let asked_at = catalog.1.min(customers.1);
        for (followed, (last, _)) in [(&self.catalog, catalog), (&self.customers, customers)] {
            let mut applied = followed.applied.subscribe();
            let caught_up = tokio::time::timeout(SYNC_TIMEOUT, applied.wait_for(|r| *r >= last));
            if !matches!(caught_up.await, Ok(Ok(_))) {
                tracing::warn!(
                    bucket = followed.stream,
                    revision = last,
                    "the definitions watch is behind; deciding with what it has"
                );
                return Ok(());
            }
        }
        self.synced_until
            .store(asked_at - CLOCK_MARGIN_US, Ordering::Release);
        Ok(())
    }

    /// Publishes `tally.notify.entitlement_changed.<token>`, once per revision (its message
    /// id), so that the vendor's app can refresh a license or a cached check.
    async fn announce(&self, customer: &str, revision: u64, body: serde_json::Value) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("entitlement-changed-{revision}").as_str(),
        );
        let subject = format!(
            "{}.entitlement_changed.{}",
            tally_core::subject::NOTIFY_PREFIX,
            tally_core::subject::customer_token(customer)
        );
        let sent = self
            .js
            .publish_with_headers(subject, headers, body.to_string().into())
            .await;
        let stored = match sent {
            Ok(ack) => ack.await.map(drop),
            Err(e) => Err(e),
        };
        if let Err(e) = stored {
            tracing::warn!(customer, revision, error = %e, "cannot announce an entitlement change");
        }
    }

    /// A bucket's last revision and the server's time when it answered, asked again while
    /// the bucket's stream has no leader: past a NATS node's loss JetStream elects one in
    /// 4 to 9 s, and a partition that failed here would be taken over from the lake.
    async fn last_revision(&self, followed: &Followed) -> Result<(u64, i64)> {
        crate::topology::ask_through_election("read a definitions bucket", REVISION_WAIT, || {
            self.ask_last_revision(followed)
        })
        .await
    }

    async fn ask_last_revision(&self, followed: &Followed) -> Result<(u64, i64)> {
        /// The part of JetStream's stream info read here: `ts` is the server's time when it
        /// answered (nats-server 2.10+), on the clock that stamps stored messages.
        #[derive(serde::Deserialize)]
        struct InfoAt {
            state: LastSeq,
            ts: chrono::DateTime<chrono::Utc>,
        }
        #[derive(serde::Deserialize)]
        struct LastSeq {
            last_seq: u64,
        }
        let response: Response<InfoAt> = self
            .js
            .request(format!("STREAM.INFO.{}", followed.stream), &())
            .await
            .map_err(|e| Error::nats("read a definitions bucket", e))?;
        match response {
            Response::Ok(info) => Ok((info.state.last_seq, info.ts.timestamp_micros())),
            Response::Err { error } => Err(Error::nats("read a definitions bucket", error)),
        }
    }

    /// Applies one bucket entry to the engine; for a customer of this process, returns
    /// the entitlement-changed notification to publish.
    fn apply(&self, entry: &Entry) -> Option<(String, serde_json::Value)> {
        let put = entry.operation == Operation::Put;
        let parse = |what: &str| -> Option<serde_json::Value> {
            serde_json::from_slice(&entry.value)
                .map_err(
                    |e| tracing::error!(key = entry.key, error = %e, "unreadable {what}; ignored"),
                )
                .ok()
        };
        if entry.bucket == CUSTOMERS_BUCKET {
            let id = id_from_kv_key(&entry.key)?;
            let mut homes = self.partitions.homes(&id);
            homes.retain(|&p| self.owned(p).is_some());
            if homes.is_empty() {
                return None;
            }
            let mut customer = None;
            if !put {
                for &p in &homes {
                    self.change(p, |e| e.remove_customer(&id));
                }
            } else if let Some(c) =
                parse("customer").and_then(|v| serde_json::from_value::<Customer>(v).ok())
            {
                customer = Some(serde_json::to_value(&c).unwrap_or_default());
                for &p in &homes {
                    self.change(p, |e| e.upsert_customer(c.clone()));
                }
            }
            let news = entry.revision > self.customers.started_at.load(Ordering::Acquire);
            return news.then(|| {
                let body = serde_json::json!({
                    "kind": "entitlement_changed",
                    "customer": id,
                    "revision": entry.revision,
                    "deleted": !put,
                    "plan": customer.as_ref().and_then(|c| c.get("plan").cloned()),
                    "status": customer.as_ref().and_then(|c| c.get("status").cloned()),
                    "entitlement": customer,
                });
                (id, body)
            });
        }
        debug_assert_eq!(entry.bucket, CATALOG_BUCKET);
        let (kind, key) = entry.key.split_once('.')?;
        let id = id_from_kv_key(key)?;
        match (kind, put) {
            ("plan", false) => self.each_engine(|e| e.remove_plan(&id)),
            ("addon", false) => self.each_engine(|e| e.remove_addon(&id)),
            ("plan", true) => {
                if let Some(p) = parse("plan").and_then(|v| serde_json::from_value::<Plan>(v).ok())
                {
                    self.each_engine(|e| e.upsert_plan(p.clone()));
                }
            }
            ("addon", true) => {
                if let Some(a) =
                    parse("addon").and_then(|v| serde_json::from_value::<AddOn>(v).ok())
                {
                    self.each_engine(|e| e.upsert_addon(a.clone()));
                }
            }
            ("meter", false) => {
                self.each_engine(|e| e.remove_meter(&id));
                self.roll_up(&id, None);
            }
            ("meter", true) => {
                if let Some(m) =
                    parse("meter").and_then(|v| serde_json::from_value::<Meter>(v).ok())
                {
                    self.each_engine(|e| e.upsert_meter(m.clone()));
                    self.roll_up(&id, Some(m));
                }
            }
            ("feature", false) => self.each_engine(|e| e.remove_feature(&id)),
            ("feature", true) => {
                if let Some(f) =
                    parse("feature").and_then(|v| serde_json::from_value::<Feature>(v).ok())
                {
                    self.each_engine(|e| e.upsert_feature(f.clone()));
                }
            }
            // SKU mappings are for orders, not for deciding events.
            _ => {}
        }
        None
    }
}

/// Follows one bucket until cancelled, re-creating the watch after a failure from the
/// revision after the last one applied.
async fn follow(entitlements: Arc<Entitlements>, store: Store, cancel: CancellationToken) {
    let followed = if store.name == CATALOG_BUCKET {
        &entitlements.catalog
    } else {
        &entitlements.customers
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let last = *followed.applied.borrow();
        let watch = if last == 0 {
            store.watch_with_history(">").await
        } else {
            store.watch_all_from_revision(last + 1).await
        };
        let mut watch = match watch {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(bucket = store.name, error = %e, "cannot watch a definitions bucket; retrying");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        loop {
            let next = tokio::select! {
                () = cancel.cancelled() => return,
                next = watch.next() => next,
            };
            match next {
                Some(Ok(entry)) => {
                    if !entitlements.apply_delay.is_zero() {
                        tokio::time::sleep(entitlements.apply_delay).await;
                    }
                    if entry.revision > *followed.applied.borrow() {
                        let news = entitlements.apply(&entry);
                        followed.applied.send_replace(entry.revision);
                        if let Some((customer, body)) = news {
                            entitlements.announce(&customer, entry.revision, body).await;
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(bucket = store.name, error = %e, "definitions watch failed; re-creating it");
                    break;
                }
                None => {
                    tracing::warn!(
                        bucket = store.name,
                        "definitions watch ended; re-creating it"
                    );
                    break;
                }
            }
        }
    }
}
