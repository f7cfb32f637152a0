//! `Idempotency-Key`, as Stripe honours it: a `POST` retried with the same key is applied
//! once and answered with the first response.
//!
//! The `tally_idempotency` bucket (entries expire after `api.idempotency_secs`) holds,
//! per API key and header value, the request it was used for and, once it finished, the
//! response it got. See [`idempotent`].

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::kv::{self, Store};
use axum::Json;
use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::Caller;
use crate::AppState;
use crate::error::{ApiError, ApiResult};

/// The bucket remembering `Idempotency-Key`s and the responses they got.
pub use tally_core::subject::IDEMPOTENCY_BUCKET;

/// The header a retried `POST` carries to be applied once.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// Set on a response replayed for a repeated `Idempotency-Key`.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// The longest `Idempotency-Key` accepted, in bytes.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// A claimed key whose request has not finished after this long belongs to a server that
/// stopped: another request may take it over.
const STALE_CLAIM: chrono::TimeDelta = chrono::TimeDelta::minutes(2);

/// Opens the bucket, creating it when missing with `replicas` copies; entries expire after
/// `ttl`.
pub(crate) async fn open(
    js: &Context,
    ttl: Duration,
    replicas: usize,
) -> Result<Store, crate::OpenError> {
    tally_ingest::topology::ensure_bucket(
        js,
        kv::Config {
            bucket: IDEMPOTENCY_BUCKET.to_owned(),
            description: "Tally API Idempotency-Keys and their responses".to_owned(),
            max_age: ttl,
            history: 1,
            storage: async_nats::jetstream::stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        },
    )
    .await
    .map_err(|e| crate::OpenError::Idempotency(e.to_string()))
}

/// What the bucket remembers of a key: the request it was used for and, once it
/// finished, the response it got.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Remembered {
    /// Hex SHA-256 of the method, path and body.
    request_hash: String,
    /// When the first request claimed the key.
    claimed_at: DateTime<Utc>,
    /// `None` while the first request is in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body: Option<Value>,
}

pub(crate) fn to_value<T: Serialize>(value: &T) -> ApiResult<Value> {
    serde_json::to_value(value).map_err(ApiError::internal)
}

fn hex_sha256(parts: &[&[u8]]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        // Length-prefixed, so that no two different part lists hash alike.
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The `Idempotency-Key` header, if any: 1 to 255 bytes of visible ASCII.
fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(value) = headers.get(IDEMPOTENCY_HEADER) else {
        return Ok(None);
    };
    let bad = |why: &str| {
        ApiError::bad_request(
            IDEMPOTENCY_HEADER,
            format!("the Idempotency-Key header {why}"),
        )
    };
    let key = value.to_str().map_err(|_| bad("must be visible ASCII"))?;
    if key.is_empty() {
        return Err(bad("must not be empty"));
    }
    if key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(bad(&format!(
            "is {} bytes; the limit is {MAX_IDEMPOTENCY_KEY}",
            key.len()
        )));
    }
    Ok(Some(key.to_owned()))
}

fn respond(status: StatusCode, body: &Value, replayed: bool) -> Response {
    let mut response = (status, Json(body)).into_response();
    if replayed {
        response
            .headers_mut()
            .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    response
}

/// Runs `work` once per `Idempotency-Key` (per API key): the first request claims the key
/// (a `create` in the bucket, which fails when it exists), runs, and records its response;
/// a repeat with the same path and request gets that response again (with
/// `Idempotent-Replayed: true`) without running; a repeat with another request, or while
/// the first is still running, gets 409. Only a successful response is remembered: after
/// an error (which changed nothing) the key is released, so the request may be retried
/// with the same key. Once claimed, the work runs to its end even if the client goes.
/// Without the header, `work` simply runs.
pub(crate) async fn idempotent<W>(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    uri: &Uri,
    request: &Value,
    work: W,
) -> ApiResult<Response>
where
    W: Future<Output = ApiResult<(StatusCode, Value)>> + Send + 'static,
{
    let Some(key) = idempotency_key(headers)? else {
        let (status, body) = work.await?;
        return Ok(respond(status, &body, false));
    };
    let store = state.idempotency.clone();
    let bucket_key = hex_sha256(&[caller.0.id.as_bytes(), key.as_bytes()]);
    // The request as read (defaults filled in), not its bytes: spacing and key order
    // do not make another request.
    let request = serde_json::to_vec(request).map_err(ApiError::internal)?;
    let request_hash = hex_sha256(&[b"POST", uri.path().as_bytes(), &request]);
    let claim = Remembered {
        request_hash: request_hash.clone(),
        claimed_at: Utc::now(),
        status: None,
        body: None,
    };
    let claim_bytes: Bytes = serde_json::to_vec(&claim)
        .map_err(ApiError::internal)?
        .into();
    let unavailable = |e: &dyn std::fmt::Display| {
        tracing::warn!(error = %e, "idempotency bucket unavailable");
        ApiError::unavailable("NATS is unavailable (the idempotency bucket)")
    };
    let mut claimed = false;
    for _ in 0..4 {
        match store.create(bucket_key.as_str(), claim_bytes.clone()).await {
            Ok(_) => {
                claimed = true;
                break;
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(unavailable(&e)),
        }
        let Some(entry) = store
            .entry(bucket_key.as_str())
            .await
            .map_err(|e| unavailable(&e))?
            .filter(|e| e.operation == kv::Operation::Put)
        else {
            // Released or expired in between: claim again.
            continue;
        };
        let seen: Remembered = serde_json::from_slice(&entry.value).map_err(ApiError::internal)?;
        let conflict = |why: &str| ApiError::conflict(why.to_owned()).field(IDEMPOTENCY_HEADER);
        if seen.request_hash != request_hash {
            return Err(conflict(
                "this Idempotency-Key was used for a different request (another path or body); use a new key",
            ));
        }
        if let (Some(status), Some(body)) = (seen.status, &seen.body) {
            let status = StatusCode::from_u16(status).map_err(ApiError::internal)?;
            return Ok(respond(status, body, true));
        }
        if Utc::now() - seen.claimed_at < STALE_CLAIM {
            return Err(conflict(
                "a request with this Idempotency-Key is in progress; retry once it has finished",
            ));
        }
        // The server that claimed it stopped before finishing: take the claim over.
        match store
            .update(bucket_key.as_str(), claim_bytes.clone(), entry.revision)
            .await
        {
            Ok(_) => {
                claimed = true;
                break;
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
            Err(e) => return Err(unavailable(&e)),
        }
    }
    if !claimed {
        return Err(
            ApiError::conflict("this Idempotency-Key is being used concurrently; retry")
                .field(IDEMPOTENCY_HEADER),
        );
    }
    let task = tokio::spawn(async move {
        let outcome = work.await;
        match &outcome {
            Ok((status, body)) => {
                let done = Remembered {
                    status: Some(status.as_u16()),
                    body: Some(body.clone()),
                    ..claim
                };
                let recorded = match serde_json::to_vec(&done) {
                    Ok(bytes) => store
                        .put(bucket_key.as_str(), bytes.into())
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = recorded {
                    // Applied but not remembered: a retry after the claim goes stale
                    // would apply again.
                    tracing::error!(error = %e, "cannot record an idempotent response");
                }
            }
            Err(_) => {
                if let Err(e) = store.delete(bucket_key.as_str()).await {
                    tracing::warn!(error = %e, "cannot release an Idempotency-Key");
                }
            }
        }
        outcome
    });
    let (status, body) = task.await.map_err(ApiError::internal)??;
    Ok(respond(status, &body, false))
}
