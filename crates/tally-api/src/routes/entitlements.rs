//! Entitlement checks over HTTP, answered by the worker that owns the customer (the same
//! request-reply as `tally check`, or in-process when that worker runs beside the API),
//! in OpenMeter's entitlement-value shape.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, Query, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tally_core::metrics as names;
use tally_ingest::checks::{CheckReply, CheckRequest, ListRequest, check, check_all};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{Caller, query_error};
use crate::error::{ApiError, ApiResult, Problem};
use crate::{AppState, Role};

/// Who may read a customer's entitlements (a portal key: its own customer's only).
pub(crate) const READERS: &[Role] = &[Role::Provisioning, Role::Billing, Role::Sdk, Role::Portal];

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(one))
        .routes(routes!(value))
        .routes(routes!(value_v2))
        .routes(routes!(subject_value))
}

/// A feature's entitlement now, as OpenMeter reports it, with Tally's decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntitlementValue {
    /// Whether usage of the quantity asked (default 1) would be allowed now.
    pub has_access: bool,
    /// What is left of the limit and usable grants; absent when unlimited or not metered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<f64>,
    /// Quantity counted in the open period.
    pub usage: f64,
    /// Quantity counted past the limit (soft limits).
    pub overage: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<f64>,
    /// When the period's counter starts again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<DateTime<Utc>>,
    /// A static feature's value, as JSON text (OpenMeter's `config`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// The decision an event would get now: `accepted`, `overage`, `limit_reached`, …
    pub decision: String,
}

impl From<CheckReply> for EntitlementValue {
    fn from(r: CheckReply) -> Self {
        Self {
            has_access: r.has_access,
            balance: r.remaining,
            usage: r.usage,
            overage: r.limit.map_or(0.0, |limit| (r.usage - limit).max(0.0)),
            limit: r.limit,
            resets_at: r.resets_at,
            config: r.value.map(|v| v.to_string()),
            decision: r.decision,
        }
    }
}

/// Every feature of a customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Entitlements {
    pub customer: String,
    pub features: BTreeMap<String, EntitlementValue>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct CheckParams {
    /// The quantity about to be used (default 1).
    quantity: Option<f64>,
    /// The moment to check at (RFC 3339; default now).
    time: Option<DateTime<Utc>>,
    /// The region the usage would come from (geo-fenced customers).
    region: Option<String>,
    /// The user (seat-limited features).
    user: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// The moment to check at (RFC 3339; default now).
    time: Option<DateTime<Utc>>,
}

/// Every feature of a customer: access, usage, limit, balance, reset time, static values.
#[utoipa::path(
    get,
    path = "/api/v1/customers/{customer}/entitlements",
    tag = "checks",
    params(("customer" = String, Path, description = "The customer id"), ListParams),
    responses(
        (status = 200, body = Entitlements),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such customer", body = Problem),
        (status = 503, description = "No worker answered: retry", body = Problem),
    ),
    security(("api_key" = []))
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer): Path<String>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Entitlements>> {
    caller.require_for(READERS, &customer)?;
    let Query(params) = params.map_err(query_error)?;
    let request = ListRequest {
        customer: customer.clone(),
        all: true,
        time: params.time,
    };
    let started = Instant::now();
    let local = state
        .local_checks
        .as_ref()
        .and_then(|l| l.check_all(&request));
    let reply = match local {
        Some(answer) => answer.map_err(ApiError::from),
        None => check_all(&state.client, state.partitions(), &request, timeout(&state))
            .await
            .map_err(ApiError::from),
    };
    let reply = checked("list", started, reply)?;
    if !reply.known {
        return Err(ApiError::not_found(format!("no customer {customer:?}")).field("customer"));
    }
    Ok(Json(Entitlements {
        customer,
        features: reply
            .features
            .into_iter()
            .map(|r| (r.feature.clone(), EntitlementValue::from(r)))
            .collect(),
    }))
}

/// One feature of a customer, in OpenMeter's entitlement-value shape.
#[utoipa::path(
    get,
    path = "/api/v1/customers/{customer}/entitlements/{feature}",
    tag = "checks",
    params(
        ("customer" = String, Path, description = "The customer id"),
        ("feature" = String, Path, description = "The feature"),
        CheckParams
    ),
    responses(
        (status = 200, body = EntitlementValue),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such customer", body = Problem),
        (status = 503, description = "No worker answered: retry", body = Problem),
    ),
    security(("api_key" = []))
)]
async fn one(
    State(state): State<AppState>,
    caller: Caller,
    Path((customer, feature)): Path<(String, String)>,
    params: Result<Query<CheckParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<EntitlementValue>> {
    caller.require_for(READERS, &customer)?;
    let Query(params) = params.map_err(query_error)?;
    let quantity = params.quantity.unwrap_or(1.0);
    if !quantity.is_finite() || quantity < 0.0 {
        return Err(ApiError::bad_request(
            "quantity",
            format!("quantity must be a finite number ≥ 0, not {quantity}"),
        ));
    }
    let request = CheckRequest {
        customer: customer.clone(),
        feature,
        quantity,
        time: params.time,
        region: params.region,
        user: params.user,
    };
    let started = Instant::now();
    let local = state.local_checks.as_ref().and_then(|l| l.check(&request));
    let reply = match local {
        Some(answer) => answer.map_err(ApiError::from),
        None => check(&state.client, state.partitions(), &request, timeout(&state))
            .await
            .map_err(ApiError::from),
    };
    let reply = checked("one", started, reply)?;
    if reply.decision == "unknown_customer" {
        return Err(ApiError::not_found(format!("no customer {customer:?}")).field("customer"));
    }
    Ok(Json(reply.into()))
}

/// [`one`] on another path, OpenMeter's: a handler of its own, for the OpenAPI document.
macro_rules! value_route {
    ($name:ident, $path:literal, $customer:literal, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path(
            get,
            path = $path,
            tag = "checks",
            params(
                ("customer" = String, Path, description = $customer),
                ("feature" = String, Path, description = "The feature"),
                CheckParams
            ),
            responses(
                (status = 200, body = EntitlementValue),
                (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
                (status = 404, description = "No such customer", body = Problem),
                (status = 503, description = "No worker answered: retry", body = Problem),
            ),
            security(("api_key" = []))
        )]
        async fn $name(
            state: State<AppState>,
            caller: Caller,
            path: Path<(String, String)>,
            params: Result<Query<CheckParams>, axum::extract::rejection::QueryRejection>,
        ) -> ApiResult<Json<EntitlementValue>> {
            one(state, caller, path, params).await
        }
    };
}

value_route!(
    value,
    "/api/v1/customers/{customer}/entitlements/{feature}/value",
    "The customer id",
    "OpenMeter's path of [`one`]."
);
value_route!(
    value_v2,
    "/api/v2/customers/{customer}/entitlements/{feature}/value",
    "The customer id",
    "OpenMeter's v2 path of [`one`] (a feature key: Tally's entitlements are known by it)."
);
value_route!(
    subject_value,
    "/api/v1/subjects/{customer}/entitlements/{feature}/value",
    "The customer id (OpenMeter's subject)",
    "OpenMeter's subject path of [`one`] (deprecated there; a subject is a customer here)."
);

/// Records a check's latency, by what was asked (`one` feature or the `list`) and whether
/// a worker answered.
fn checked<T, E>(kind: &'static str, started: Instant, reply: Result<T, E>) -> Result<T, E> {
    let outcome = if reply.is_ok() { "answered" } else { "failed" };
    metrics::histogram!(names::CHECK_SECONDS, "kind" => kind, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    reply
}

fn timeout(state: &AppState) -> Duration {
    Duration::from_millis(state.config.check_timeout_ms)
}
