//! The entitlement definitions in NATS key-value buckets, and their audit trail.
//!
//! Plans, add-ons, SKU mappings, meters and features bound to meters live in the
//! `tally_catalog` bucket (keys `plan.<key>`, `addon.<key>`, `sku.<key>`, `meter.<slug>`,
//! `feature.<key>`; a deleted meter stays, marked `deletedAt`), customers in `tally_customers` (key: the customer id by
//! [`kv_key`]), each value the definition as JSON. Every change is also appended to the
//! `TALLY_AUDIT` stream: who, when, which definition, before and after. Applying a
//! definition equal to the stored one changes nothing and audits nothing.

use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::consumer;
use async_nats::jetstream::kv::{self, Store};
use async_nats::jetstream::stream::{self, StorageType};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tally_core::entitlement::{AddOn, Catalog, Customer, Customers, Plan, Sku};
use tally_core::meter::{Feature, Meter};
use tally_core::subject::{
    AUDIT_PREFIX, AUDIT_STREAM, CATALOG_BUCKET, CUSTOMERS_BUCKET, customer_token, kv_key,
};

use crate::{Error, Result};

/// Revisions kept per key: the recent history of a definition.
const HISTORY: i64 = 16;

/// How often [`Definitions::modify_customer`] reads again after losing a race.
const MODIFY_ATTEMPTS: usize = 32;

/// How long an audit read waits for the next entry the server said is pending.
const AUDIT_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Which audit entries [`Definitions::audit_where`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditFilter {
    /// `plan`, `addon`, `sku`, `meter` or `customer`; `None`: every kind.
    pub kind: Option<String>,
    /// The definition's id (with `kind`: a customer id for `customer`); `None`: every id.
    pub id: Option<String>,
    /// Entries at or after this time.
    pub from: Option<DateTime<Utc>>,
    /// Entries before this time.
    pub to: Option<DateTime<Utc>>,
    /// The most entries returned (the oldest of those selected).
    pub limit: usize,
}

impl Default for AuditFilter {
    fn default() -> Self {
        Self {
            kind: None,
            id: None,
            from: None,
            to: None,
            limit: usize::MAX,
        }
    }
}

/// What applying one definition did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Created,
    Updated,
    Unchanged,
}

/// One applied definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    /// `plan`, `addon`, `sku`, `meter` or `customer`.
    pub kind: &'static str,
    pub id: String,
    pub change: Change,
    /// The bucket revision written (`None` when unchanged).
    pub revision: Option<u64>,
}

/// One entry of the audit stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub actor: String,
    /// When the audit stream stored the change: read back from the server, so the audit is
    /// ordered and filtered on one clock, whatever the writer's clock said.
    pub time: DateTime<Utc>,
    pub kind: String,
    pub id: String,
    pub bucket: String,
    pub key: String,
    pub revision: u64,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

/// Why a meter was not written.
#[derive(Debug, thiserror::Error)]
pub enum MeterRefused {
    #[error("meter {0:?} exists: change it with PUT, or delete it first")]
    Exists(String),
    #[error(
        "meter {0:?} exists and measures something else: its eventType, aggregation, \
         valueProperty and eventFrom cannot change; delete it and create it again"
    )]
    MeasureChanged(String),
    #[error("no such meter")]
    Missing,
    #[error(transparent)]
    Definitions(#[from] Error),
}

/// Why a feature was not written.
#[derive(Debug, thiserror::Error)]
pub enum FeatureRefused {
    #[error("feature {0:?} exists: archive it first")]
    Exists(String),
    /// A flaw of the definition, or its meter missing or not bindable.
    #[error("{0}")]
    Invalid(tally_core::entitlement::Problem),
    #[error("no such feature")]
    Missing,
    #[error(transparent)]
    Definitions(#[from] Error),
}

/// A new meter's or feature's id: a UUID v7's bits in OpenMeter's 26-character form.
fn new_meter_id() -> String {
    tally_core::meter::ulid_text(uuid::Uuid::now_v7().as_u128())
}

/// A definition with an id and times given when stored (meters, features).
trait Stamped: PartialEq {
    fn stamps(
        &mut self,
    ) -> (
        &mut String,
        &mut Option<DateTime<Utc>>,
        &mut Option<DateTime<Utc>>,
    );
}

impl Stamped for Meter {
    fn stamps(
        &mut self,
    ) -> (
        &mut String,
        &mut Option<DateTime<Utc>>,
        &mut Option<DateTime<Utc>>,
    ) {
        (&mut self.id, &mut self.created_at, &mut self.updated_at)
    }
}

impl Stamped for Feature {
    fn stamps(
        &mut self,
    ) -> (
        &mut String,
        &mut Option<DateTime<Utc>>,
        &mut Option<DateTime<Utc>>,
    ) {
        (&mut self.id, &mut self.created_at, &mut self.updated_at)
    }
}

/// `next` as it is stored over `live`: the live one's id and `createdAt`, and `updatedAt`
/// moved to `now` only when something changed; a new id and both times `now` when there
/// is no live one.
fn stamped<T: Stamped>(mut next: T, live: Option<T>, now: DateTime<Utc>) -> T {
    let (id, created, updated) = next.stamps();
    match live {
        Some(mut live) => {
            let (live_id, live_created, live_updated) = live.stamps();
            *id = live_id.clone();
            *created = *live_created;
            *updated = *live_updated;
            if next != live {
                *next.stamps().2 = Some(now);
            }
        }
        None => {
            *id = new_meter_id();
            *created = Some(now);
            *updated = Some(now);
        }
    }
    next
}

/// Everything the buckets hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub plans: Vec<Plan>,
    pub addons: Vec<AddOn>,
    pub skus: Vec<Sku>,
    /// Meters, the deleted ones included.
    pub meters: Vec<Meter>,
    /// Features bound to meters.
    pub features: Vec<Feature>,
    pub customers: Vec<Customer>,
}

/// The buckets and the audit stream.
#[derive(Clone)]
pub struct Definitions {
    js: Context,
    catalog: Store,
    customers: Store,
}

impl std::fmt::Debug for Definitions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Definitions").finish_non_exhaustive()
    }
}

impl Definitions {
    /// Opens the buckets and the audit stream, creating them when missing, with `replicas`
    /// copies each (`IngestConfig::replicas`).
    pub async fn open(js: &Context, replicas: usize) -> Result<Definitions> {
        let bucket = |name: &str, description: &str| kv::Config {
            bucket: name.to_owned(),
            description: description.to_owned(),
            history: HISTORY,
            storage: StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        };
        let catalog = crate::topology::ensure_bucket(
            js,
            bucket(CATALOG_BUCKET, "Tally plans, add-ons and SKUs"),
        )
        .await
        .map_err(|e| Error::nats("open the catalogue bucket", e))?;
        let customers =
            crate::topology::ensure_bucket(js, bucket(CUSTOMERS_BUCKET, "Tally customers"))
                .await
                .map_err(|e| Error::nats("open the customers bucket", e))?;
        crate::topology::ensure_stream(
            js,
            stream::Config {
                name: AUDIT_STREAM.to_owned(),
                subjects: vec![format!("{AUDIT_PREFIX}.>")],
                storage: StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
            "open the audit stream",
        )
        .await?;
        Ok(Definitions {
            js: js.clone(),
            catalog,
            customers,
        })
    }

    /// The catalogue and customers buckets.
    pub fn stores(&self) -> (Store, Store) {
        (self.catalog.clone(), self.customers.clone())
    }

    /// Writes a catalogue's plans, add-ons and SKU mappings, in that order.
    pub async fn apply_catalog(&self, catalog: &Catalog, actor: &str) -> Result<Vec<Applied>> {
        let mut applied = Vec::new();
        for p in &catalog.plans {
            applied.push(self.put(&self.catalog, "plan", &p.id, p, actor).await?);
        }
        for a in &catalog.addons {
            applied.push(self.put(&self.catalog, "addon", &a.id, a, actor).await?);
        }
        for s in &catalog.skus {
            applied.push(self.put(&self.catalog, "sku", &s.sku, s, actor).await?);
        }
        for m in &catalog.meters {
            let (_, done) = self.put_meter(m, actor, false).await.map_err(|e| match e {
                MeterRefused::Definitions(e) => e,
                other => Error::Definition(other.to_string()),
            })?;
            applied.push(done);
        }
        for (i, f) in catalog.features.iter().enumerate() {
            let at = format!("features[{i}]");
            let (_, done) = self
                .put_feature(f, &at, actor, false)
                .await
                .map_err(|e| match e {
                    FeatureRefused::Definitions(e) => e,
                    other => Error::Definition(other.to_string()),
                })?;
            applied.push(done);
        }
        Ok(applied)
    }

    /// Writes feature `feature.key` bound to a meter, once its meter is known to be live
    /// and bindable (a flaw named under `at`, `features[0]` say, or empty), keeping its
    /// `createdAt`; an archived feature's key makes a new feature. A live feature is
    /// refused with [`FeatureRefused::Exists`] under `only_create`.
    pub async fn put_feature(
        &self,
        feature: &Feature,
        at: &str,
        actor: &str,
        only_create: bool,
    ) -> std::result::Result<(Feature, Applied), FeatureRefused> {
        let meter = self.meter(&feature.meter_slug).await?;
        let mut problems = feature.problems(at, meter.as_ref());
        if meter.is_none() && problems.is_empty() {
            problems.push(feature.no_meter(at));
        }
        if let Some(p) = problems.into_iter().next() {
            return Err(FeatureRefused::Invalid(p));
        }
        let now = Utc::now();
        self.modify(
            &self.catalog,
            "feature",
            &feature.key,
            actor,
            |stored: Option<Feature>| {
                let mut next = feature.clone();
                next.archived_at = None;
                match stored.filter(|f| !f.is_archived()) {
                    Some(_) if only_create => Err(FeatureRefused::Exists(feature.key.clone())),
                    live => Ok(stamped(next, live, now)),
                }
            },
            |f| &f.key,
        )
        .await
    }

    /// Archives feature `key` (kept for the record, binding nothing); `None` when there is
    /// no live feature of that key.
    pub async fn archive_feature(&self, key: &str, actor: &str) -> Result<Option<Feature>> {
        let outcome = self
            .modify(
                &self.catalog,
                "feature",
                key,
                actor,
                |stored: Option<Feature>| match stored.filter(|f| !f.is_archived()) {
                    Some(mut live) => {
                        let now = Utc::now();
                        live.archived_at = Some(now);
                        live.updated_at = Some(now);
                        Ok(live)
                    }
                    None => Err(FeatureRefused::Missing),
                },
                |f| &f.key,
            )
            .await;
        match outcome {
            Ok((feature, _)) => Ok(Some(feature)),
            Err(FeatureRefused::Missing) => Ok(None),
            Err(FeatureRefused::Definitions(e)) => Err(e),
            Err(other) => Err(Error::Definition(other.to_string())),
        }
    }

    /// Feature `key` as stored, archived or not.
    pub async fn feature(&self, key: &str) -> Result<Option<Feature>> {
        self.get(&self.catalog, "feature", key).await
    }

    /// The live feature known by `id_or_key` (its key, or the id OpenMeter's clients
    /// hold).
    pub async fn live_feature(&self, id_or_key: &str) -> Result<Option<Feature>> {
        if let Some(f) = self.feature(id_or_key).await?
            && !f.is_archived()
        {
            return Ok(Some(f));
        }
        Ok(self
            .load_catalog()
            .await?
            .features
            .into_iter()
            .find(|f| !f.is_archived() && f.id == id_or_key))
    }

    pub async fn apply_customers(
        &self,
        customers: &Customers,
        actor: &str,
    ) -> Result<Vec<Applied>> {
        let mut applied = Vec::new();
        for c in &customers.customers {
            applied.push(
                self.put(&self.customers, "customer", &c.id, c, actor)
                    .await?,
            );
        }
        Ok(applied)
    }

    /// Everything the buckets hold now.
    pub async fn load(&self) -> Result<Snapshot> {
        let catalog = self.load_catalog().await?;
        Ok(Snapshot {
            plans: catalog.plans,
            addons: catalog.addons,
            skus: catalog.skus,
            meters: catalog.meters,
            features: catalog.features,
            customers: self.load_customers().await?,
        })
    }

    /// Every plan, add-on and SKU mapping, each list sorted by key.
    pub async fn load_catalog(&self) -> Result<Catalog> {
        let mut catalog = Catalog::default();
        for (key, value) in entries(&self.catalog).await? {
            let bad =
                |e: serde_json::Error| Error::Definition(format!("{CATALOG_BUCKET} {key}: {e}"));
            match key.split_once('.') {
                Some(("plan", _)) => catalog
                    .plans
                    .push(serde_json::from_value(value).map_err(bad)?),
                Some(("addon", _)) => catalog
                    .addons
                    .push(serde_json::from_value(value).map_err(bad)?),
                Some(("sku", _)) => catalog
                    .skus
                    .push(serde_json::from_value(value).map_err(bad)?),
                Some(("meter", _)) => catalog
                    .meters
                    .push(serde_json::from_value(value).map_err(bad)?),
                Some(("feature", _)) => catalog
                    .features
                    .push(serde_json::from_value(value).map_err(bad)?),
                _ => tracing::warn!(key, "unexpected key in the catalogue bucket"),
            }
        }
        Ok(catalog)
    }

    /// Every customer, sorted by key.
    pub async fn load_customers(&self) -> Result<Vec<Customer>> {
        let mut customers = Vec::new();
        for (key, value) in entries(&self.customers).await? {
            let customer = serde_json::from_value(value)
                .map_err(|e| Error::Definition(format!("{CUSTOMERS_BUCKET} {key}: {e}")))?;
            customers.push(customer);
        }
        Ok(customers)
    }

    /// Writes one plan (audited unless unchanged).
    pub async fn put_plan(&self, plan: &Plan, actor: &str) -> Result<Applied> {
        self.put(&self.catalog, "plan", &plan.id, plan, actor).await
    }

    /// Writes one add-on (audited unless unchanged).
    pub async fn put_addon(&self, addon: &AddOn, actor: &str) -> Result<Applied> {
        self.put(&self.catalog, "addon", &addon.id, addon, actor)
            .await
    }

    /// Writes one SKU mapping (audited unless unchanged).
    pub async fn put_sku(&self, sku: &Sku, actor: &str) -> Result<Applied> {
        self.put(&self.catalog, "sku", &sku.sku, sku, actor).await
    }

    /// Writes one customer whole (audited unless unchanged); the last writer wins. Use
    /// [`modify_customer`](Self::modify_customer) to change part of a customer.
    pub async fn put_customer(&self, customer: &Customer, actor: &str) -> Result<Applied> {
        self.put(&self.customers, "customer", &customer.id, customer, actor)
            .await
    }

    /// Reads customer `id` (`None` when it does not exist), lets `change` make the new
    /// definition, and writes it (audited unless unchanged).
    ///
    /// The write is a compare-and-set on the revision read: when another writer changed
    /// the customer in between, `change` runs again on the newer definition, so two
    /// concurrent changes (two add-on orders) both take effect. An error from `change`
    /// writes nothing and is returned as is.
    pub async fn modify_customer<E: From<Error>>(
        &self,
        id: &str,
        actor: &str,
        change: impl FnMut(Option<Customer>) -> Result<Customer, E>,
    ) -> Result<(Customer, Applied), E> {
        self.modify(&self.customers, "customer", id, actor, change, |c| &c.id)
            .await
    }

    /// [`modify_customer`](Self::modify_customer) for any definition in `store`: read,
    /// change, compare-and-set, again on a lost race; `id_of` is the id the changed
    /// definition must keep.
    async fn modify<T, E>(
        &self,
        store: &Store,
        kind: &'static str,
        id: &str,
        actor: &str,
        mut change: impl FnMut(Option<T>) -> Result<T, E>,
        id_of: impl Fn(&T) -> &str,
    ) -> Result<(T, Applied), E>
    where
        T: Serialize + serde::de::DeserializeOwned,
        E: From<Error>,
    {
        let key = key_of(kind, id);
        let bad = |e: serde_json::Error| Error::Definition(format!("stored {kind} {id}: {e}"));
        for _ in 0..MODIFY_ATTEMPTS {
            let entry = store
                .entry(key.as_str())
                .await
                .map_err(|e| Error::nats("read a definition", e))?;
            let before = match &entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    Some(serde_json::from_slice::<Value>(&e.value).map_err(bad)?)
                }
                _ => None,
            };
            let current = before
                .clone()
                .map(serde_json::from_value::<T>)
                .transpose()
                .map_err(bad)?;
            let changed = change(current)?;
            if id_of(&changed) != id {
                return Err(Error::Definition(format!(
                    "a change of {kind} {id} made {kind} {}",
                    id_of(&changed)
                ))
                .into());
            }
            let after = serde_json::to_value(&changed)
                .map_err(|e| Error::Definition(format!("{kind} {id}: {e}")))?;
            if before.as_ref() == Some(&after) {
                let applied = Applied {
                    kind,
                    id: id.to_owned(),
                    change: Change::Unchanged,
                    revision: None,
                };
                return Ok((changed, applied));
            }
            let body: bytes::Bytes = serde_json::to_vec(&after)
                .map_err(|e| Error::Definition(format!("{kind} {id}: {e}")))?
                .into();
            let written = match &entry {
                Some(e) => store
                    .update(key.as_str(), body, e.revision)
                    .await
                    .map(Some)
                    .or_else(|e| match e.kind() {
                        kv::UpdateErrorKind::WrongLastRevision => Ok(None),
                        _ => Err(Error::nats("write a definition", e)),
                    })?,
                None => store
                    .create(key.as_str(), body)
                    .await
                    .map(Some)
                    .or_else(|e| match e.kind() {
                        kv::CreateErrorKind::AlreadyExists => Ok(None),
                        _ => Err(Error::nats("write a definition", e)),
                    })?,
            };
            // `None`: another writer got there first; decide again on what it wrote.
            let Some(revision) = written else {
                continue;
            };
            let change = if before.is_some() {
                Change::Updated
            } else {
                Change::Created
            };
            self.record(store, kind, id, key, revision, before, after, actor)
                .await?;
            let applied = Applied {
                kind,
                id: id.to_owned(),
                change,
                revision: Some(revision),
            };
            return Ok((changed, applied));
        }
        Err(Error::Definition(format!(
            "{kind} {id} changed under {MODIFY_ATTEMPTS} attempts in a row to modify it"
        ))
        .into())
    }

    /// Creates meter `meter.slug`, or changes what may change of it in place (its name,
    /// description, group-bys and metadata), keeping its `id` and `createdAt`; a deleted
    /// meter's slug makes a new meter with a new id. A live meter whose measure would
    /// change (event type, aggregation, value, `eventFrom`) is refused with
    /// [`MeterRefused::MeasureChanged`], as is a live one with `only_create`.
    pub async fn put_meter(
        &self,
        meter: &Meter,
        actor: &str,
        only_create: bool,
    ) -> std::result::Result<(Meter, Applied), MeterRefused> {
        let now = Utc::now();
        self.modify(
            &self.catalog,
            "meter",
            &meter.slug,
            actor,
            |stored: Option<Meter>| {
                let mut next = meter.clone();
                next.deleted_at = None;
                match stored.filter(|m| !m.is_deleted()) {
                    Some(_) if only_create => Err(MeterRefused::Exists(meter.slug.clone())),
                    Some(live) if !live.same_measure(meter) => {
                        Err(MeterRefused::MeasureChanged(meter.slug.clone()))
                    }
                    live => Ok(stamped(next, live, now)),
                }
            },
            |m| &m.slug,
        )
        .await
    }

    /// Marks meter `slug` deleted (kept for the record, reading nothing); `None` when
    /// there is no live meter of that slug.
    pub async fn delete_meter(&self, slug: &str, actor: &str) -> Result<Option<Meter>> {
        let outcome = self
            .modify(
                &self.catalog,
                "meter",
                slug,
                actor,
                |stored: Option<Meter>| match stored.filter(|m| !m.is_deleted()) {
                    Some(mut live) => {
                        let now = Utc::now();
                        live.deleted_at = Some(now);
                        live.updated_at = Some(now);
                        Ok(live)
                    }
                    None => Err(MeterRefused::Missing),
                },
                |m| &m.slug,
            )
            .await;
        match outcome {
            Ok((meter, _)) => Ok(Some(meter)),
            Err(MeterRefused::Missing) => Ok(None),
            Err(MeterRefused::Definitions(e)) => Err(e),
            Err(other) => Err(Error::Definition(other.to_string())),
        }
    }

    /// Meter `slug` as stored, deleted or not.
    pub async fn meter(&self, slug: &str) -> Result<Option<Meter>> {
        self.get(&self.catalog, "meter", slug).await
    }

    /// The live meter known by `id_or_slug` (its slug, or the id OpenMeter's clients
    /// also address it by).
    pub async fn live_meter(&self, id_or_slug: &str) -> Result<Option<Meter>> {
        if tally_core::meter::check_slug(id_or_slug).is_ok()
            && let Some(m) = self.meter(id_or_slug).await?
            && !m.is_deleted()
        {
            return Ok(Some(m));
        }
        Ok(self
            .load_catalog()
            .await?
            .meters
            .into_iter()
            .find(|m| m.id == id_or_slug && !m.is_deleted()))
    }

    /// One customer's definition, if it exists.
    pub async fn customer(&self, id: &str) -> Result<Option<Customer>> {
        self.get(&self.customers, "customer", id).await
    }

    /// One plan's definition, if it exists.
    pub async fn plan(&self, id: &str) -> Result<Option<Plan>> {
        self.get(&self.catalog, "plan", id).await
    }

    /// One add-on's definition, if it exists.
    pub async fn addon(&self, id: &str) -> Result<Option<AddOn>> {
        self.get(&self.catalog, "addon", id).await
    }

    /// One SKU mapping, if it exists.
    pub async fn sku(&self, sku: &str) -> Result<Option<Sku>> {
        self.get(&self.catalog, "sku", sku).await
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        store: &Store,
        kind: &'static str,
        id: &str,
    ) -> Result<Option<T>> {
        let key = key_of(kind, id);
        let Some(bytes) = store
            .get(key.as_str())
            .await
            .map_err(|e| Error::nats("read a definition", e))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Definition(format!("stored {kind} {id}: {e}")))
    }

    /// The audit entries, oldest first.
    pub async fn audit(&self) -> Result<Vec<AuditEntry>> {
        let stream = self
            .js
            .get_stream(AUDIT_STREAM)
            .await
            .map_err(|e| Error::nats("open the audit stream", e))?;
        let last = stream
            .get_info()
            .await
            .map_err(|e| Error::nats("read the audit stream", e))?
            .state
            .last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            let Ok(message) = stream.get_raw_message(seq).await else {
                continue;
            };
            let mut entry: AuditEntry = serde_json::from_slice(&message.payload)
                .map_err(|e| Error::Definition(format!("audit entry {seq}: {e}")))?;
            entry.time = message.time;
            out.push(entry);
        }
        Ok(out)
    }

    /// The audit entries `filter` selects, oldest first, at most `filter.limit`.
    ///
    /// Entries are read through a consumer filtered on their subject
    /// (`tally.audit.<kind>.<id token>`), so one customer's history is read without
    /// scanning the others', and from the first entry stored near `filter.from`.
    pub async fn audit_where(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
        if filter.limit == 0 {
            return Ok(Vec::new());
        }
        let stream = self
            .js
            .get_stream(AUDIT_STREAM)
            .await
            .map_err(|e| Error::nats("open the audit stream", e))?;
        let subject = format!(
            "{AUDIT_PREFIX}.{}.{}",
            filter.kind.as_deref().unwrap_or("*"),
            filter.id.as_deref().map_or("*".to_owned(), customer_token)
        );
        let deliver_policy = match filter.from {
            // An entry's time is the time it was stored, so the server seeks to it exactly.
            Some(from) => start_time(from)?,
            None => consumer::DeliverPolicy::All,
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subject,
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::nats("read the audit stream", e))?;
        let mut out = Vec::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(out);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| Error::nats("read the audit stream", e))?;
        loop {
            let message = tokio::time::timeout(AUDIT_READ_TIMEOUT, messages.try_next())
                .await
                .map_err(|e| Error::nats("read the audit stream", e))?
                .map_err(|e| Error::nats("read the audit stream", e))?;
            let Some(message) = message else {
                break;
            };
            let info = message
                .info()
                .map_err(|e| Error::nats("read the audit stream", e))?;
            let (pending, stored) = (info.pending, info.published);
            let mut entry: AuditEntry = serde_json::from_slice(&message.payload).map_err(|e| {
                Error::Definition(format!("audit entry on {}: {e}", message.subject))
            })?;
            entry.time = stored;
            if filter.to.is_some_and(|to| entry.time >= to) {
                break;
            }
            let after_from = filter.from.is_none_or(|from| entry.time >= from);
            let before_to = filter.to.is_none_or(|to| entry.time < to);
            if after_from && before_to {
                out.push(entry);
            }
            if out.len() >= filter.limit || pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    async fn put<T: Serialize>(
        &self,
        store: &Store,
        kind: &'static str,
        id: &str,
        definition: &T,
        actor: &str,
    ) -> Result<Applied> {
        let key = key_of(kind, id);
        let after = serde_json::to_value(definition)
            .map_err(|e| Error::Definition(format!("{kind} {id}: {e}")))?;
        let before = store
            .get(key.as_str())
            .await
            .map_err(|e| Error::nats("read a definition", e))?
            .map(|b| serde_json::from_slice::<Value>(&b))
            .transpose()
            .map_err(|e| Error::Definition(format!("stored {kind} {id}: {e}")))?;
        if before.as_ref() == Some(&after) {
            return Ok(Applied {
                kind,
                id: id.to_owned(),
                change: Change::Unchanged,
                revision: None,
            });
        }
        let body = serde_json::to_vec(&after)
            .map_err(|e| Error::Definition(format!("{kind} {id}: {e}")))?;
        let revision = store
            .put(key.as_str(), body.into())
            .await
            .map_err(|e| Error::nats("write a definition", e))?;
        let change = if before.is_some() {
            Change::Updated
        } else {
            Change::Created
        };
        self.record(store, kind, id, key, revision, before, after, actor)
            .await?;
        Ok(Applied {
            kind,
            id: id.to_owned(),
            change,
            revision: Some(revision),
        })
    }

    /// Appends one change to the audit stream, on `tally.audit.<kind>.<id token>`.
    #[allow(clippy::too_many_arguments)]
    async fn record(
        &self,
        store: &Store,
        kind: &str,
        id: &str,
        key: String,
        revision: u64,
        before: Option<Value>,
        after: Value,
        actor: &str,
    ) -> Result<()> {
        let entry = AuditEntry {
            actor: actor.to_owned(),
            time: Utc::now(),
            kind: kind.to_owned(),
            id: id.to_owned(),
            bucket: store.name.clone(),
            key,
            revision,
            before,
            after: Some(after),
        };
        let payload = serde_json::to_vec(&entry)
            .map_err(|e| Error::Definition(format!("audit of {kind} {id}: {e}")))?;
        let subject = format!("{AUDIT_PREFIX}.{kind}.{}", customer_token(id));
        self.js
            .publish(subject, payload.into())
            .await
            .map_err(|e| Error::nats("append to the audit stream", e))?
            .await
            .map_err(|e| Error::nats("append to the audit stream", e))?;
        Ok(())
    }
}

/// A definition's key: the customer id's key in the customers bucket, `<kind>.<id key>`
/// in the catalogue.
fn key_of(kind: &str, id: &str) -> String {
    if kind == "customer" {
        kv_key(id)
    } else {
        format!("{kind}.{}", kv_key(id))
    }
}

/// A consumer's start at `time` (async-nats takes it as a `time` crate value, which this
/// crate does not otherwise use: the policy is read from its JSON form).
fn start_time(time: DateTime<Utc>) -> Result<consumer::DeliverPolicy> {
    serde_json::from_value(serde_json::json!({
        "deliver_policy": "by_start_time",
        "opt_start_time": time.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
    }))
    .map_err(|e| Error::Definition(format!("audit start time {time}: {e}")))
}

/// Every live key of a bucket with its value, sorted by key.
async fn entries(store: &Store) -> Result<Vec<(String, Value)>> {
    let mut keys: Vec<String> = match store.keys().await {
        Ok(keys) => keys
            .try_collect()
            .await
            .map_err(|e| Error::nats("list a bucket", e))?,
        Err(e) => return Err(Error::nats("list a bucket", e)),
    };
    keys.sort();
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let value = tokio::time::timeout(Duration::from_secs(10), store.get(key.as_str()))
            .await
            .map_err(|e| Error::nats("read a definition", e))?
            .map_err(|e| Error::nats("read a definition", e))?;
        if let Some(bytes) = value {
            let value = serde_json::from_slice(&bytes)
                .map_err(|e| Error::Definition(format!("{} {key}: {e}", store.name)))?;
            out.push((key, value));
        }
    }
    Ok(out)
}
