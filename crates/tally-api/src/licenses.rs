//! The license signing keys, shared by every API server through a key-value bucket.
//!
//! `tally_license_keys` holds one entry per key (by its PASERK id): the secret key, the
//! public key, when it was made and when it was retired. The newest key not retired signs
//! new tokens. Rotating makes a new key and retires the others; a retired key stays
//! published (`GET /api/v1/license-keys`) for `grace` — at least the longest license
//! lifetime — so every token it signed verifies until it expires.

use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::kv::{self, Store};
use async_nats::jetstream::stream::StorageType;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use tally_license::{KeySet, KeyStatus, License, PublishedKey, SigningKey};

/// The bucket of license signing keys.
pub use tally_core::subject::LICENSE_KEYS_BUCKET;

#[derive(Debug, thiserror::Error)]
pub enum LicenseKeyError {
    #[error("nats: {what}: {source}")]
    Nats {
        what: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("stored license key {kid}: {message}")]
    Stored { kid: String, message: String },
    #[error("signing: {0}")]
    Sign(String),
}

fn nats<E: Into<Box<dyn std::error::Error + Send + Sync>>>(
    what: &'static str,
) -> impl FnOnce(E) -> LicenseKeyError {
    move |e| LicenseKeyError::Nats {
        what,
        source: e.into(),
    }
}

/// One stored key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    secret: String,
    public_key: String,
    created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retired_at: Option<DateTime<Utc>>,
}

/// The signing keys.
#[derive(Clone)]
pub struct LicenseKeys {
    store: Store,
    grace: Duration,
}

impl std::fmt::Debug for LicenseKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LicenseKeys")
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl LicenseKeys {
    /// Opens the bucket, creating it when missing, with `replicas` copies.
    pub async fn open(
        js: &Context,
        grace: Duration,
        replicas: usize,
    ) -> Result<LicenseKeys, LicenseKeyError> {
        let store = tally_ingest::topology::ensure_bucket(
            js,
            kv::Config {
                bucket: LICENSE_KEYS_BUCKET.to_owned(),
                description: "Tally license signing keys".to_owned(),
                history: 1,
                storage: StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await
        .map_err(nats("open the license keys bucket"))?;
        Ok(LicenseKeys { store, grace })
    }

    /// Signs a license with the active key (made on first use); returns the token and
    /// the key's id.
    pub async fn sign(&self, license: &License) -> Result<(String, String), LicenseKeyError> {
        let stored = match self.active().await? {
            Some(key) => key,
            None => self.make().await?,
        };
        let key = SigningKey::from_paserk(&stored.secret).map_err(|e| LicenseKeyError::Stored {
            kid: stored.kid.clone(),
            message: e.to_string(),
        })?;
        let token = key
            .sign(license)
            .map_err(|e| LicenseKeyError::Sign(e.to_string()))?;
        Ok((token, stored.kid))
    }

    /// Makes a new signing key and retires the others; returns the new key's id.
    pub async fn rotate(&self) -> Result<String, LicenseKeyError> {
        let now = Utc::now();
        for mut old in self.all().await? {
            if old.retired_at.is_none() {
                old.retired_at = Some(now);
                self.put(&old).await?;
            }
        }
        Ok(self.make().await?.kid)
    }

    /// The keys whose tokens may still be valid: the active ones and those retired less
    /// than `grace` ago. Older retired keys are removed from the bucket.
    pub async fn published(&self) -> Result<KeySet, LicenseKeyError> {
        let now = Utc::now();
        let grace = chrono::Duration::from_std(self.grace).unwrap_or(chrono::Duration::MAX);
        let mut keys = Vec::new();
        for key in self.all().await? {
            match key.retired_at {
                Some(at) if at + grace <= now => {
                    self.store
                        .delete(&key.kid)
                        .await
                        .map_err(nats("remove a retired license key"))?;
                }
                retired_at => keys.push(PublishedKey {
                    kid: key.kid,
                    public_key: key.public_key,
                    created_at: key.created_at,
                    retired_at,
                    status: if retired_at.is_some() {
                        KeyStatus::Retired
                    } else {
                        KeyStatus::Active
                    },
                }),
            }
        }
        Ok(KeySet { keys })
    }

    /// The newest key not retired.
    async fn active(&self) -> Result<Option<StoredKey>, LicenseKeyError> {
        Ok(self
            .all()
            .await?
            .into_iter()
            .filter(|k| k.retired_at.is_none())
            .max_by_key(|k| k.created_at))
    }

    async fn make(&self) -> Result<StoredKey, LicenseKeyError> {
        let key = SigningKey::generate().map_err(|e| LicenseKeyError::Sign(e.to_string()))?;
        let stored = StoredKey {
            kid: key.key_id().to_owned(),
            secret: key.to_paserk(),
            public_key: key.public().paserk,
            created_at: Utc::now(),
            retired_at: None,
        };
        self.put(&stored).await?;
        tracing::info!(kid = %stored.kid, "made a license signing key");
        Ok(stored)
    }

    async fn put(&self, key: &StoredKey) -> Result<(), LicenseKeyError> {
        let body = serde_json::to_vec(key).map_err(|e| LicenseKeyError::Sign(e.to_string()))?;
        self.store
            .put(key.kid.as_str(), body.into())
            .await
            .map_err(nats("write a license key"))?;
        Ok(())
    }

    async fn all(&self) -> Result<Vec<StoredKey>, LicenseKeyError> {
        let names: Vec<String> = self
            .store
            .keys()
            .await
            .map_err(nats("list the license keys"))?
            .try_collect()
            .await
            .map_err(nats("list the license keys"))?;
        let mut keys = Vec::with_capacity(names.len());
        for name in names {
            let Some(bytes) = self
                .store
                .get(name.as_str())
                .await
                .map_err(nats("read a license key"))?
            else {
                continue;
            };
            let key: StoredKey =
                serde_json::from_slice(&bytes).map_err(|e| LicenseKeyError::Stored {
                    kid: name.clone(),
                    message: e.to_string(),
                })?;
            keys.push(key);
        }
        keys.sort_by_key(|k| k.created_at);
        Ok(keys)
    }
}
