//! The routes, the caller's key, and the OpenAPI document generated from the handlers.

// utoipa's `path` macro expands parameter types to qualified paths.
#![allow(unused_qualifications)]

pub(crate) mod access;
pub(crate) mod entitlements;
pub(crate) mod events;
pub(crate) mod features;
pub(crate) mod health;
pub(crate) mod idempotency;
pub(crate) mod licenses;
pub(crate) mod meters;
pub(crate) mod metrics;
pub(crate) mod portal;
pub(crate) mod provisioning;
pub mod queries;

use axum::Router;
use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::http::header;
use axum::http::request::Parts;
use tally_core::metrics as names;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi, Server};
use utoipa_axum::router::OpenApiRouter;

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::keys::{KeyRecord, Rejected, Role};
use crate::limits::{BodyMeter, Limit};

/// The header a key travels in: `Authorization: Bearer tally_<id>_<secret>`.
pub const AUTH_HEADER: &str = "authorization";

/// The whole API: the axum router and the OpenAPI document of its routes.
pub fn router(state: AppState) -> (Router, OpenApi) {
    let max_body = state.config.max_body_bytes;
    let (router, mut api) = OpenApiRouter::with_openapi(base_document())
        .merge(events::routes())
        .merge(entitlements::routes())
        .merge(provisioning::routes())
        .merge(licenses::routes())
        .merge(queries::routes())
        .merge(meters::routes())
        .merge(features::routes())
        .merge(health::routes())
        .merge(metrics::routes())
        .merge(access::routes())
        .merge(portal::routes())
        .split_for_parts();
    api.servers = Some(vec![Server::new("/")]);
    document_rate_limits(&mut api);
    let document = api.clone();
    let router = router
        .route(
            "/api/v1/openapi.json",
            axum::routing::get(move || {
                let document = document.clone();
                async move { axum::Json(document) }
            }),
        )
        .merge(portal::pages())
        .route_layer(axum::middleware::from_fn(
            crate::limits::meter_undeclared_body,
        ))
        .route_layer(axum::middleware::from_fn(metrics::track))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(state);
    (router, api)
}

fn base_document() -> OpenApi {
    let mut api = OpenApi::builder()
        .info(
            utoipa::openapi::InfoBuilder::new()
                .title("Tally")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Usage metering, entitlement enforcement and billing analytics. Every \
                     route but /healthz, /readyz, the license keys and this document needs \
                     `Authorization: Bearer <API key>`; errors are RFC 9457 problem details. \
                     Each key may make so many requests and send so many body bytes per \
                     second (`api.key_*`); over either it gets 429 with `Retry-After`.",
                ))
                .build(),
        )
        .build();
    let components = api.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "api_key",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("tally_<id>_<secret>")
                .build(),
        ),
    );
    api
}

/// Every route that takes a key may answer 429 (the key over its limits): one shared
/// response, listed on each of them.
fn document_rate_limits(api: &mut OpenApi) {
    use utoipa::openapi::header::Header;
    use utoipa::openapi::{Content, Object, Ref, Response, Type};
    const NAME: &str = "RateLimited";
    let mut retry_after = Header::new(Object::with_type(Type::Integer));
    retry_after.description = Some("Whole seconds until the same request would pass".to_owned());
    let response = Response::builder()
        .description(
            "The key is over its requests or body bytes per second (`limit` says which); \
             retry after `Retry-After` seconds",
        )
        .header("Retry-After", retry_after)
        .content(
            "application/problem+json",
            Content::new(Some(Ref::from_schema_name("Problem"))),
        )
        .build();
    api.components
        .get_or_insert_with(Default::default)
        .responses
        .insert(NAME.to_owned(), response.into());
    for item in api.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            if operation.security.as_ref().is_some_and(|s| !s.is_empty()) {
                operation
                    .responses
                    .responses
                    .insert("429".to_owned(), Ref::from_response_name(NAME).into());
            }
        }
    }
}

/// The caller, known by a valid API key.
#[derive(Debug, Clone)]
pub struct Caller(pub KeyRecord);

impl Caller {
    /// Passes when the key's role is admin or one of `roles`; 403 naming them otherwise.
    pub fn require(&self, roles: &[Role]) -> ApiResult<()> {
        if self.0.role == Role::Admin || roles.contains(&self.0.role) {
            return Ok(());
        }
        let mut names: Vec<&str> = vec!["admin"];
        names.extend(roles.iter().map(|r| r.as_str()));
        Err(ApiError::forbidden(format!(
            "this route needs a key with the role {}; key {} has the role {}",
            names.join(" or "),
            self.0.id,
            self.0.role
        )))
    }

    /// [`require`](Self::require), and the key must cover `customer` (a portal key is for
    /// one customer; an ingest key may list customers).
    pub fn require_for(&self, roles: &[Role], customer: &str) -> ApiResult<()> {
        self.require(roles)?;
        if self.0.covers(customer) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "key {} may not act for customer {customer:?}",
                self.0.id
            )))
        }
    }

    /// The customers the key is limited to, if any.
    pub fn scope(&self) -> Option<&[String]> {
        self.0.customer_scope()
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Caller> {
        let record = authenticate(parts, state).await?;
        admit(parts, state, &record)?;
        Ok(Caller(record))
    }
}

/// The record of the key the request presents, if it is valid; each refusal is counted
/// by its reason.
async fn authenticate(parts: &Parts, state: &AppState) -> ApiResult<KeyRecord> {
    let refused = |reason: &'static str, detail: String| {
        ::metrics::counter!(names::AUTH_FAILURES, "reason" => reason, "transport" => "http")
            .increment(1);
        ApiError::unauthorized(detail).field("authorization")
    };
    let Some(value) = parts.headers.get(AUTH_HEADER) else {
        return Err(refused(
            "missing",
            "send an API key as `Authorization: Bearer tally_<id>_<secret>` (tally keys create)"
                .to_owned(),
        ));
    };
    let Some(token) = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
    else {
        return Err(refused(
            "malformed",
            "the Authorization header must be `Bearer <API key>`".to_owned(),
        ));
    };
    match state.keys.authenticate(token).await {
        Ok(Ok(record)) => Ok(record),
        Ok(Err(rejected)) => {
            let reason = match rejected {
                Rejected::Malformed => "malformed",
                Rejected::Unknown(_) => "unknown",
                Rejected::WrongSecret => "wrong_secret",
                Rejected::Revoked(_) => "revoked",
                Rejected::Expired(_) => "expired",
            };
            Err(refused(reason, rejected.to_string()))
        }
        // Not a failed authentication: the key could not be judged.
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the API keys");
            Err(ApiError::unavailable(
                "the API keys cannot be read now (NATS is unavailable)",
            ))
        }
    }
}

/// Charges the request to its key's limits (one request, and the body bytes its
/// `Content-Length` declares, or as they are read without one); 429 naming the limit
/// when it is over one, before the body is read.
fn admit(parts: &Parts, state: &AppState, record: &KeyRecord) -> ApiResult<()> {
    // No length and a body: the middleware meters it as it is read.
    let meter = parts.extensions.get::<BodyMeter>();
    let declared = match parts.headers.get(header::CONTENT_LENGTH) {
        Some(v) => Some(v.to_str().ok().and_then(|v| v.parse().ok()).unwrap_or(0)),
        None if meter.is_some() => None,
        None => Some(0),
    };
    if let Err(refused) = state.key_limits.admit(&record.id, declared) {
        let limit = refused.limit.as_str();
        ::metrics::counter!(names::RATE_LIMITED, "limit" => limit).increment(1);
        tracing::debug!(key = %record.id, limit, "over the key's limit");
        let secs = refused.retry_after_secs();
        let over = match refused.limit {
            Limit::Requests => format!(
                "{} requests per second (burst {})",
                refused.per_sec, refused.burst
            ),
            Limit::Bytes => format!(
                "{} request-body bytes per second (burst {}); this body is {}",
                refused.per_sec,
                refused.burst,
                declared.map_or("of undeclared length".to_owned(), |n| format!("{n} bytes"))
            ),
        };
        return Err(ApiError::rate_limited(
            limit,
            secs,
            format!(
                "key {} is over its limit of {over}; retry after {secs} s",
                record.id
            ),
        ));
    }
    if declared.is_none()
        && let Some(meter) = meter
    {
        meter.bind(&state.key_limits, &record.id);
    }
    Ok(())
}

impl OptionalFromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Option<Caller>> {
        if parts.headers.contains_key(AUTH_HEADER) {
            <Caller as FromRequestParts<AppState>>::from_request_parts(parts, state)
                .await
                .map(Some)
        } else {
            Ok(None)
        }
    }
}

/// A JSON body whose every rejection (not JSON, wrong shape, wrong content type) is a
/// problem naming the field.
pub struct JsonBody<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> ApiResult<Self> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(body_error)?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Reads a JSON body, naming the field at fault by its path (`features.calls.limit`).
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let detail = format!("the body is not valid: {}", e.inner());
        let path = e.path().to_string();
        // serde names a missing field (not in the path) and an unknown one (already its
        // last segment).
        let field = match field_of(&e.inner().to_string()) {
            Some(name) if path == "." => name,
            Some(name) if path.rsplit('.').next() == Some(name.as_str()) => path,
            Some(name) => format!("{path}.{name}"),
            None => path,
        };
        // Broken JSON is at no field, whatever value the parser was in.
        let broken = e.inner().is_syntax() || e.inner().is_eof();
        if broken || field == "." || field == "?" || field.is_empty() {
            ApiError::invalid("bad_request", detail)
        } else {
            ApiError::bad_request(field, detail)
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid("bad_request", format!("the body is not valid: {e}")))?;
    Ok(value)
}

/// A JSON body that may be left out: empty (or blank) reads as the default.
pub fn optional_json<T: serde::de::DeserializeOwned + Default>(bytes: &[u8]) -> ApiResult<T> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse_json(bytes)
    }
}

/// A query string that does not parse, naming the parameter: serde names it for a
/// missing, unknown or repeated one (`` missing field `period` ``), and the query
/// extractor puts it before a bad value (`quantity: invalid float literal`).
pub fn query_error(e: axum::extract::rejection::QueryRejection) -> ApiError {
    let text = e.body_text();
    let detail = format!("the query string is not valid: {text}");
    let reason = text.split_once(": ").map_or(text.as_str(), |(_, r)| r);
    let field = field_of(reason).or_else(|| {
        let (name, _) = reason.split_once(": ")?;
        let is_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        is_name.then(|| name.to_owned())
    });
    match field {
        Some(f) => ApiError::bad_request(f, detail),
        None => ApiError::invalid("bad_request", detail),
    }
}

/// serde names the field itself for missing, unknown and repeated fields.
fn field_of(message: &str) -> Option<String> {
    ["missing field `", "unknown field `", "duplicate field `"]
        .iter()
        .find_map(|marker| message.split(marker).nth(1))
        .and_then(|rest| rest.split('`').next())
        .map(str::to_owned)
}

/// A body that could not be read: too large (413) or broken.
pub fn body_error(e: axum::extract::rejection::BytesRejection) -> ApiError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(format!("the request body is larger than the limit: {e}"))
    } else {
        ApiError::invalid("bad_request", format!("cannot read the request body: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        limit: f64,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        #[serde(default)]
        features: std::collections::BTreeMap<String, Inner>,
    }

    fn field(body: &str) -> Option<String> {
        parse_json::<Outer>(body.as_bytes())
            .unwrap_err()
            .problem()
            .field
    }

    #[test]
    fn a_bad_body_names_its_field_by_path_once() {
        assert_eq!(field(r#"{"name":"x","nmae":1}"#).as_deref(), Some("nmae"));
        assert_eq!(field(r#"{}"#).as_deref(), Some("name"));
        assert_eq!(field(r#"{"name":3}"#).as_deref(), Some("name"));
        assert_eq!(
            field(r#"{"name":"x","features":{"calls":{"limit":"many"}}}"#).as_deref(),
            Some("features.calls.limit")
        );
        assert_eq!(
            field(r#"{"name":"x","features":{"calls":{"limt":1}}}"#).as_deref(),
            Some("features.calls.limt")
        );
        assert_eq!(
            field(r#"{"name":"x","features":{"calls":{}}}"#).as_deref(),
            Some("features.calls.limit")
        );
        // Not JSON, or something after it: no field to name.
        assert_eq!(field(r#"{"name":"#), None);
        assert_eq!(field(r#"{"name":"x"} trailing"#), None);
    }
}
