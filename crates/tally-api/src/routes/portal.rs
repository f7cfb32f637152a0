//! The customer portal: one HTML page (plain JavaScript, no build step, embedded in the
//! binary) and the short-lived links that sign a customer in to it.
//!
//! **Sign-in.** The page works with a `portal` API key, pasted into its form or carried in
//! the URL's fragment (`/portal#key=…`; a fragment never reaches the server or its logs).
//! A portal link is such a key with an expiry: `POST …/portal-link` creates a portal key
//! for the customer with `expires_at` set (default one hour), which
//! [`ApiKeys::authenticate`](crate::keys::ApiKeys::authenticate) refuses from then on.
//! It is read-only for that one customer like any portal key (plus asking for access).
//! The secret is shown once, in the link; the bucket keeps only its digest.

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::provisioning::actor;
use super::{Caller, body_error, optional_json};
use crate::error::{ApiError, ApiResult, Problem};
use crate::{AppState, Role};

const INDEX_HTML: &str = include_str!("../../assets/portal/index.html");
const PORTAL_JS: &str = include_str!("../../assets/portal/portal.js");
const PORTAL_CSS: &str = include_str!("../../assets/portal/portal.css");

/// A portal link's lifetime unless the request asks for another, and the longest.
const LINK_TTL_SECS: u64 = 3_600;
const LINK_MAX_TTL_SECS: u64 = 7 * 24 * 3_600;

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(portal_link))
}

/// The page and its two assets: public, outside the OpenAPI document.
pub(crate) fn pages() -> Router<AppState> {
    Router::new()
        .route(
            "/portal",
            axum::routing::get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/portal/portal.js",
            axum::routing::get(|| async { asset(PORTAL_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/portal/portal.css",
            axum::routing::get(|| async { asset(PORTAL_CSS, "text/css; charset=utf-8") }),
        )
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
             connect-src 'self'; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// A portal link's options.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortalLinkRequest {
    /// The link's lifetime in seconds, 1 to 604800 (default 3600).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// A portal link: open `url` on this server to sign in as the customer, until
/// `expires_at`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PortalLink {
    /// `/portal#customer=<customer>&token=<portal key>`, relative to this server.
    pub url: String,
    /// The portal key itself (also usable as `Authorization: Bearer`).
    pub token: String,
    /// The key's id (revocable with `tally keys revoke`).
    pub key_id: String,
    pub customer: String,
    pub expires_at: DateTime<Utc>,
}

/// Issues a short-lived portal link for a customer: a portal key that expires
/// (default one hour), embedded in the page's URL fragment.
#[utoipa::path(
    post,
    path = "/api/v1/customers/{customer}/portal-link",
    tag = "portal",
    params(("customer" = String, Path, description = "The customer id")),
    request_body(content = PortalLinkRequest, content_type = "application/json", description = "`{ttl_secs}` (optional); an empty body is allowed"),
    responses(
        (status = 201, body = PortalLink),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such customer", body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn portal_link(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer): Path<String>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<(StatusCode, Json<PortalLink>)> {
    caller.require(&[Role::Provisioning])?;
    let body = body.map_err(body_error)?;
    let request: PortalLinkRequest = optional_json(&body)?;
    let ttl = request.ttl_secs.unwrap_or(LINK_TTL_SECS);
    if !(1..=LINK_MAX_TTL_SECS).contains(&ttl) {
        return Err(ApiError::bad_request(
            "ttl_secs",
            format!("ttl_secs must be from 1 to {LINK_MAX_TTL_SECS}, not {ttl}"),
        ));
    }
    if state.definitions.customer(&customer).await?.is_none() {
        return Err(ApiError::not_found(format!("no customer {customer:?}")).field("customer"));
    }
    let expires_at = Utc::now() + chrono::Duration::seconds(ttl as i64);
    let created = state
        .keys
        .create_expiring(
            Role::Portal,
            vec![customer.clone()],
            format!("portal link by {}", actor(&caller)),
            Some(expires_at),
        )
        .await
        .map_err(|e| match e {
            crate::keys::KeyError::Invalid(m) => ApiError::bad_request("customer", m),
            other => {
                tracing::warn!(error = %other, "cannot create a portal link key");
                ApiError::unavailable("NATS is unavailable (create a portal link)")
            }
        })?;
    Ok((
        StatusCode::CREATED,
        Json(PortalLink {
            url: format!("/portal#customer={customer}&token={}", created.token),
            token: created.token,
            key_id: created.record.id,
            customer,
            expires_at,
        }),
    ))
}
