//! API keys: who may call which route.
//!
//! A key is `tally_<id>_<secret>`: the id is public (it names the key in lists and
//! logs), the secret is 32 random bytes shown once when the key is created. The
//! `tally_api_keys` key-value bucket holds, per id, the key's role, its customer scope
//! and the SHA-256 digest of its secret — never the secret. Each server keeps the bucket
//! in memory and watches it, so a key created or revoked anywhere applies everywhere
//! within moments; a key the server has not seen yet is read from the bucket directly.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::kv::{self, Operation, Store};
use async_nats::jetstream::stream::StorageType;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

/// The bucket of API keys.
pub use tally_core::subject::KEYS_BUCKET;
const PREFIX: &str = "tally_";

/// What a key may do.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Plans, add-ons, SKUs, customers, orders, grants, and the audit trail.
    Provisioning,
    /// Billing and overage reports.
    Billing,
    /// Adoption analytics and read-only SQL.
    Analyst,
    /// Sending events only, optionally for listed customers only.
    Ingest,
    /// An application embedding the SDK: sends events, checks entitlements and records
    /// usage, over HTTP or NATS, optionally for listed customers only.
    Sdk,
    /// Receives notifications (upgrade prompts) over NATS, optionally of listed customers
    /// only.
    Notifications,
    /// One customer, read-only: its entitlements, usage and license.
    Portal,
}

impl Role {
    pub const ALL: [Role; 8] = [
        Role::Admin,
        Role::Provisioning,
        Role::Billing,
        Role::Analyst,
        Role::Ingest,
        Role::Sdk,
        Role::Notifications,
        Role::Portal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Provisioning => "provisioning",
            Role::Billing => "billing",
            Role::Analyst => "analyst",
            Role::Ingest => "ingest",
            Role::Sdk => "sdk",
            Role::Notifications => "notifications",
            Role::Portal => "portal",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
                format!("unknown role {s:?}; one of {}", names.join(", "))
            })
    }
}

/// A stored key: everything but its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyRecord {
    pub id: String,
    pub role: Role,
    /// The customers the key is limited to (`portal`: exactly one; `ingest`, `sdk`,
    /// `notifications`: any number, none meaning all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub customers: Vec<String>,
    /// What the key is for, in words.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
    /// When the key stops being accepted (a portal link's key); `None`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Hex SHA-256 of the secret.
    pub secret_sha256: String,
}

impl KeyRecord {
    /// Whether the key may act for `customer`.
    pub fn covers(&self, customer: &str) -> bool {
        self.customers.is_empty() || self.customers.iter().any(|c| c == customer)
    }

    /// The one customer a portal key is for.
    pub fn customer_scope(&self) -> Option<&[String]> {
        (!self.customers.is_empty()).then_some(self.customers.as_slice())
    }
}

/// A key just created: its record and the secret token, shown once.
#[derive(Debug, Clone, Serialize)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub record: KeyRecord,
    /// The whole key, to send as `Authorization: Bearer <token>`; not stored anywhere.
    pub token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    Invalid(String),
    #[error("nats: {what}: {source}")]
    Nats {
        what: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn nats(what: &'static str) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> KeyError {
    move |source| KeyError::Nats { what, source }
}

/// Why a presented key is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("the API key is not of the form tally_<id>_<secret>")]
    Malformed,
    #[error("no API key with id {0}")]
    Unknown(String),
    #[error("the API key's secret is wrong")]
    WrongSecret,
    #[error("the API key {0} was revoked")]
    Revoked(String),
    #[error("the API key {0} has expired")]
    Expired(String),
}

impl Rejected {
    /// A short name for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejected::Malformed => "malformed",
            Rejected::Unknown(_) => "unknown",
            Rejected::WrongSecret => "wrong_secret",
            Rejected::Revoked(_) => "revoked",
            Rejected::Expired(_) => "expired",
        }
    }
}

/// The keys bucket and the server's copy of it.
#[derive(Clone)]
pub struct ApiKeys {
    store: Store,
    cache: Arc<RwLock<HashMap<String, KeyRecord>>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys").finish_non_exhaustive()
    }
}

impl ApiKeys {
    /// Opens the bucket, creating it when missing, with `replicas` copies.
    pub async fn open(js: &Context, replicas: usize) -> Result<ApiKeys, KeyError> {
        let store = tally_ingest::topology::ensure_bucket(
            js,
            kv::Config {
                bucket: KEYS_BUCKET.to_owned(),
                description: "Tally API keys (digests of their secrets)".to_owned(),
                history: 4,
                storage: StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| nats("open the keys bucket")(e.into()))?;
        Ok(ApiKeys {
            store,
            cache: Arc::default(),
        })
    }

    /// Creates a key. A `portal` key needs exactly one customer; only `portal`, `ingest`,
    /// `sdk` and `notifications` keys may be limited to customers.
    pub async fn create(
        &self,
        role: Role,
        customers: Vec<String>,
        name: String,
    ) -> Result<CreatedKey, KeyError> {
        self.create_expiring(role, customers, name, None).await
    }

    /// [`create`](Self::create), for a key refused from `expires_at` on (a portal link).
    pub async fn create_expiring(
        &self,
        role: Role,
        customers: Vec<String>,
        name: String,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<CreatedKey, KeyError> {
        match role {
            Role::Portal if customers.len() != 1 => {
                return Err(KeyError::Invalid(
                    "a portal key is for exactly one customer (--customer C)".to_owned(),
                ));
            }
            Role::Portal | Role::Ingest | Role::Sdk | Role::Notifications => {}
            _ if !customers.is_empty() => {
                return Err(KeyError::Invalid(format!(
                    "only portal, ingest, sdk and notifications keys are limited to customers, not {role} keys"
                )));
            }
            _ => {}
        }
        if let Some(c) = customers.iter().find(|c| c.is_empty()) {
            return Err(KeyError::Invalid(format!(
                "customer ids must not be empty ({c:?})"
            )));
        }
        let id = hex(&rand::random::<[u8; 8]>());
        let secret = hex(&rand::random::<[u8; 32]>());
        let record = KeyRecord {
            id: id.clone(),
            role,
            customers,
            name,
            created_at: Utc::now(),
            revoked_at: None,
            expires_at,
            secret_sha256: digest(&secret),
        };
        let body = serde_json::to_vec(&record).map_err(|e| KeyError::Invalid(e.to_string()))?;
        self.store
            .create(id.as_str(), body.into())
            .await
            .map_err(|e| nats("write a key")(e.into()))?;
        self.remember(record.clone());
        Ok(CreatedKey {
            record,
            token: format!("{PREFIX}{id}_{secret}"),
        })
    }

    /// Every key, revoked ones included, oldest first.
    pub async fn list(&self) -> Result<Vec<KeyRecord>, KeyError> {
        let keys: Vec<String> = self
            .store
            .keys()
            .await
            .map_err(|e| nats("list the keys")(e.into()))?
            .try_collect()
            .await
            .map_err(|e| nats("list the keys")(e.into()))?;
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(record) = self.read(&key).await? {
                out.push(record);
            }
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Revokes a key; it is refused from then on. Revoking a revoked key changes nothing.
    pub async fn revoke(&self, id: &str) -> Result<KeyRecord, KeyError> {
        let mut record = self
            .read(id)
            .await?
            .ok_or_else(|| KeyError::Invalid(format!("no API key with id {id}")))?;
        if record.revoked_at.is_none() {
            record.revoked_at = Some(Utc::now());
            let body = serde_json::to_vec(&record).map_err(|e| KeyError::Invalid(e.to_string()))?;
            self.store
                .put(id, body.into())
                .await
                .map_err(|e| nats("write a key")(e.into()))?;
        }
        self.remember(record.clone());
        Ok(record)
    }

    /// The record of a presented key, if the key is valid.
    pub async fn authenticate(&self, token: &str) -> Result<Result<KeyRecord, Rejected>, KeyError> {
        let Some((id, secret)) = token
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('_'))
        else {
            return Ok(Err(Rejected::Malformed));
        };
        let cached = self
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned();
        let record = match cached {
            Some(record) => record,
            None => match self.read(id).await? {
                Some(record) => {
                    self.remember(record.clone());
                    record
                }
                None => return Ok(Err(Rejected::Unknown(id.to_owned()))),
            },
        };
        if !constant_time_eq(digest(secret).as_bytes(), record.secret_sha256.as_bytes()) {
            return Ok(Err(Rejected::WrongSecret));
        }
        if record.revoked_at.is_some() {
            return Ok(Err(Rejected::Revoked(record.id)));
        }
        if record.expires_at.is_some_and(|at| at <= Utc::now()) {
            return Ok(Err(Rejected::Expired(record.id)));
        }
        Ok(Ok(record))
    }

    /// Keeps the in-memory copy current until `cancel`: the bucket is watched from its
    /// start, and the watch is made again when it fails (a NATS restart).
    pub async fn follow(self, cancel: CancellationToken) {
        let mut pause = Duration::from_millis(100);
        while !cancel.is_cancelled() {
            match self.store.watch_all_from_revision(1).await {
                Ok(mut watch) => loop {
                    let entry = tokio::select! {
                        () = cancel.cancelled() => return,
                        e = watch.next() => e,
                    };
                    match entry {
                        Some(Ok(entry)) => {
                            pause = Duration::from_millis(100);
                            let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
                            match entry.operation {
                                Operation::Put => {
                                    if let Ok(record) =
                                        serde_json::from_slice::<KeyRecord>(&entry.value)
                                    {
                                        cache.insert(record.id.clone(), record);
                                    }
                                }
                                Operation::Delete | Operation::Purge => {
                                    cache.remove(&entry.key);
                                }
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "the API keys watch failed; watching again");
                            break;
                        }
                        None => break,
                    }
                },
                Err(e) => tracing::warn!(error = %e, "cannot watch the API keys; retrying"),
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    async fn read(&self, id: &str) -> Result<Option<KeyRecord>, KeyError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let Some(bytes) = self
            .store
            .get(id)
            .await
            .map_err(|e| nats("read a key")(e.into()))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| KeyError::Invalid(format!("stored key {id}: {e}")))
    }

    fn remember(&self, record: KeyRecord) {
        self.cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(record.id.clone(), record);
    }
}

fn digest(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Compares without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_by_name_and_unknown_ones_list_the_choices() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        }
        let e = "root".parse::<Role>().unwrap_err();
        assert!(e.contains("admin, provisioning"), "{e}");
    }

    #[test]
    fn digests_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert_eq!(digest("x").len(), 64);
    }
}
