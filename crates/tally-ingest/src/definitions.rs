//! The entitlement definitions in NATS key-value buckets, and their audit trail.
//!
//! Plans, add-ons and SKU mappings live in the `tally_catalog` bucket (keys `plan.<key>`,
//! `addon.<key>`, `sku.<key>`), customers in `tally_customers` (key: the customer id by
//! [`kv_key`]), each value the definition as JSON. Every change is also appended to the
//! `TALLY_AUDIT` stream: who, when, which definition, before and after. Applying a
//! definition equal to the stored one changes nothing and audits nothing.

use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::kv::{self, Store};
use async_nats::jetstream::stream::{self, StorageType};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tally_core::entitlement::{AddOn, Catalog, Customer, Customers, Plan, Sku};
use tally_core::subject::{
    AUDIT_PREFIX, AUDIT_STREAM, CATALOG_BUCKET, CUSTOMERS_BUCKET, customer_token, kv_key,
};

use crate::{Error, Result};

/// Revisions kept per key: the recent history of a definition.
const HISTORY: i64 = 16;

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
    /// `plan`, `addon`, `sku` or `customer`.
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
    pub time: DateTime<Utc>,
    pub kind: String,
    pub id: String,
    pub bucket: String,
    pub key: String,
    pub revision: u64,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

/// Everything the buckets hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub plans: Vec<Plan>,
    pub addons: Vec<AddOn>,
    pub skus: Vec<Sku>,
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
    /// Opens the buckets and the audit stream, creating them when missing.
    pub async fn open(js: &Context) -> Result<Definitions> {
        let bucket = |name: &str, description: &str| kv::Config {
            bucket: name.to_owned(),
            description: description.to_owned(),
            history: HISTORY,
            storage: StorageType::File,
            ..Default::default()
        };
        let catalog = js
            .create_or_update_key_value(bucket(CATALOG_BUCKET, "Tally plans, add-ons and SKUs"))
            .await
            .map_err(|e| Error::nats("open the catalogue bucket", e))?;
        let customers = js
            .create_or_update_key_value(bucket(CUSTOMERS_BUCKET, "Tally customers"))
            .await
            .map_err(|e| Error::nats("open the customers bucket", e))?;
        js.get_or_create_stream(stream::Config {
            name: AUDIT_STREAM.to_owned(),
            subjects: vec![format!("{AUDIT_PREFIX}.>")],
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::nats("open the audit stream", e))?;
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
        Ok(applied)
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
        let mut snapshot = Snapshot::default();
        for (key, value) in entries(&self.catalog).await? {
            let bad =
                |e: serde_json::Error| Error::Definition(format!("{CATALOG_BUCKET} {key}: {e}"));
            match key.split_once('.') {
                Some(("plan", _)) => snapshot
                    .plans
                    .push(serde_json::from_value(value).map_err(bad)?),
                Some(("addon", _)) => snapshot
                    .addons
                    .push(serde_json::from_value(value).map_err(bad)?),
                Some(("sku", _)) => snapshot
                    .skus
                    .push(serde_json::from_value(value).map_err(bad)?),
                _ => tracing::warn!(key, "unexpected key in the catalogue bucket"),
            }
        }
        for (key, value) in entries(&self.customers).await? {
            let customer = serde_json::from_value(value)
                .map_err(|e| Error::Definition(format!("{CUSTOMERS_BUCKET} {key}: {e}")))?;
            snapshot.customers.push(customer);
        }
        Ok(snapshot)
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
            let entry = serde_json::from_slice(&message.payload)
                .map_err(|e| Error::Definition(format!("audit entry {seq}: {e}")))?;
            out.push(entry);
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
        let key = if kind == "customer" {
            kv_key(id)
        } else {
            format!("{kind}.{}", kv_key(id))
        };
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
        Ok(Applied {
            kind,
            id: id.to_owned(),
            change,
            revision: Some(revision),
        })
    }
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
