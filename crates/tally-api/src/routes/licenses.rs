//! Signed licenses: issued per customer from its entitlement, verified offline by the SDK
//! against the published public keys.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use tally_core::entitlement::{Customer, Entitlement, Status};
use tally_license::{KeySet, License};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::extract::rejection::BytesRejection;
use bytes::Bytes;

use super::{Caller, body_error, optional_json};
use crate::error::{ApiError, ApiResult, Problem};
use crate::{AppState, Role};

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(issue))
        .routes(routes!(keys))
        .routes(routes!(rotate))
}

/// What to issue (every field optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LicenseRequest {
    /// Lifetime in seconds; at most (and by default) the server's `api.license_ttl_secs`.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// An issued license: the token and what it says.
#[derive(Debug, Serialize, ToSchema)]
pub struct IssuedLicense {
    /// A PASETO v4.public token; verify it with a key from `GET /api/v1/license-keys`.
    pub token: String,
    #[schema(value_type = Object)]
    pub license: License,
}

/// Issues a signed license for a customer: plan, features with their limits, seats,
/// regions, expiry and key id. Fetch it again after an upgrade: the new token carries the
/// new plan.
#[utoipa::path(
    post,
    path = "/api/v1/customers/{customer}/license",
    tag = "licenses",
    params(("customer" = String, Path, description = "The customer id")),
    request_body(content = Option<LicenseRequest>, content_type = "application/json"),
    responses(
        (status = 201, body = IssuedLicense),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem),
        (status = 409, description = "The customer is suspended or its entitlement has ended", body = Problem),
        (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn issue(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<IssuedLicense>)> {
    caller.require_for(&[Role::Provisioning, Role::Portal], &customer)?;
    let body = body.map_err(body_error)?;
    let request: LicenseRequest = optional_json(&body)?;
    let max = state.config.license_ttl_secs;
    let ttl = match request.ttl_secs {
        Some(0) => {
            return Err(ApiError::bad_request(
                "ttl_secs",
                "ttl_secs must be above 0",
            ));
        }
        Some(t) if t > max => {
            return Err(ApiError::bad_request(
                "ttl_secs",
                format!("ttl_secs is {t}; this server issues licenses of at most {max} seconds"),
            ));
        }
        Some(t) => t,
        None => max,
    };
    let Some(c) = state.definitions.customer(&customer).await? else {
        return Err(ApiError::not_found(format!("no customer {customer:?}")).field("customer"));
    };
    let license = license_of(&state, &c, ttl).await?;
    let (token, key_id) = state.licenses.sign(&license).await.map_err(license_error)?;
    let license = License { key_id, ..license };
    Ok((StatusCode::CREATED, Json(IssuedLicense { token, license })))
}

/// What a customer's license says, from its stored definition and plan.
async fn license_of(state: &AppState, c: &Customer, ttl: u64) -> ApiResult<License> {
    let now = Utc::now();
    if c.status == Status::Suspended {
        return Err(ApiError::conflict(format!(
            "customer {:?} is suspended",
            c.id
        )));
    }
    if c.valid_until.is_some_and(|until| until <= now) {
        return Err(ApiError::conflict(format!(
            "customer {:?}'s entitlement ended at {}",
            c.id,
            c.valid_until.map(|t| t.to_rfc3339()).unwrap_or_default()
        )));
    }
    let Some(plan) = state.definitions.plan(&c.plan).await? else {
        return Err(ApiError::conflict(format!(
            "customer {:?} is on plan {:?}, which does not exist",
            c.id, c.plan
        )));
    };
    let mut features: BTreeMap<String, Entitlement> = plan.features.clone();
    let mut seats = c.seats.or(plan.seats);
    for a in &c.addons {
        let Some(addon) = state.definitions.addon(&a.id).await? else {
            continue;
        };
        features.extend(addon.features.clone());
        for (feature, extra) in &addon.extra {
            if let Some(Entitlement::Metered(m)) = features.get_mut(feature)
                && let Some(limit) = m.limit.as_mut()
            {
                *limit += extra * f64::from(a.quantity);
            }
        }
        if let (Some(s), Some(add)) = (seats.as_mut(), addon.seats) {
            *s += add * a.quantity;
        }
    }
    let expires =
        now + chrono::Duration::seconds(i64::try_from(ttl).unwrap_or(i64::MAX / 1_000_000));
    let expires = c.valid_until.map_or(expires, |until| until.min(expires));
    let not_before = c.valid_from.map_or(now, |from| from.max(now));
    let features = features
        .into_iter()
        .map(|(name, e)| serde_json::to_value(e).map(|v| (name, v)))
        .collect::<Result<_, _>>()
        .map_err(ApiError::internal)?;
    Ok(License {
        customer: c.id.clone(),
        plan: c.plan.clone(),
        features,
        seats,
        regions: c.regions.clone(),
        issued_at: now,
        not_before,
        expires_at: expires,
        key_id: String::new(),
    })
}

/// The public keys that verify licenses: the active one and those retired recently
/// enough that their tokens may still be valid. No key is needed to read them.
#[utoipa::path(
    get,
    path = "/api/v1/license-keys",
    tag = "licenses",
    responses((status = 200, body = Object, description = "The key set: `{\"keys\": [{kid, public_key, created_at, retired_at, status}]}`"),
        (status = 503, body = Problem))
)]
async fn keys(State(state): State<AppState>) -> ApiResult<Json<KeySet>> {
    state
        .licenses
        .published()
        .await
        .map(Json)
        .map_err(license_error)
}

/// The new key's id.
#[derive(Debug, Serialize, ToSchema)]
pub struct Rotated {
    pub kid: String,
}

/// Makes a new signing key and retires the others (they stay published until every
/// token they signed has expired).
#[utoipa::path(
    post,
    path = "/api/v1/license-keys/rotate",
    tag = "licenses",
    responses((status = 201, body = Rotated), (status = 401, body = Problem), (status = 403, body = Problem), (status = 503, body = Problem)),
    security(("api_key" = []))
)]
async fn rotate(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<(StatusCode, Json<Rotated>)> {
    caller.require(&[])?;
    let kid = state.licenses.rotate().await.map_err(license_error)?;
    Ok((StatusCode::CREATED, Json(Rotated { kid })))
}

fn license_error(e: crate::licenses::LicenseKeyError) -> ApiError {
    match e {
        crate::licenses::LicenseKeyError::Nats { what, source } => {
            tracing::warn!(what, error = %source, "nats unavailable");
            ApiError::unavailable(format!("NATS is unavailable ({what})"))
        }
        other => ApiError::internal(other),
    }
}
