//! Access requests: a customer asks, from the portal, for a feature (or more of it) or for
//! an upgrade to a plan; an admin or provisioning key approves or denies.
//!
//! Requests live in the `tally_access_requests` key-value bucket, one entry per request.
//! Deciding is a compare-and-set on the entry's revision from `pending` to the decision,
//! made *before* the entitlement change, so a request is decided once even when two
//! deciders race (the loser gets 409); should the change then fail, the request goes
//! back to `pending`. Approval changes the customer through
//! [`Definitions::modify_customer`](tally_ingest::definitions::Definitions::modify_customer),
//! exactly as an order does: audited with the approver's key, applied live by the workers
//! (which publish their `entitlement_changed` notification as for any change).

use async_nats::jetstream::Context;
use async_nats::jetstream::kv::{self, Store};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use tally_core::entitlement::{Catalog, Order, SkuTarget};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::provisioning::{actor, flaws_error};
use super::{Caller, JsonBody, optional_json, query_error};
use crate::error::{ApiError, ApiResult, Problem};
use crate::{AppState, Role};

/// The bucket of access requests.
pub use tally_core::subject::ACCESS_REQUESTS_BUCKET;

/// Who decides requests (admin always may).
const DECIDERS: &[Role] = &[Role::Provisioning];
/// Who may ask, and read a customer's requests: a portal key for its own customer only.
const ASKERS: &[Role] = &[Role::Provisioning, Role::Portal];

pub(crate) async fn open(js: &Context, replicas: usize) -> Result<Store, crate::OpenError> {
    tally_ingest::topology::ensure_bucket(
        js,
        kv::Config {
            bucket: ACCESS_REQUESTS_BUCKET.to_owned(),
            description: "Tally customers' access and upgrade requests".to_owned(),
            history: 4,
            storage: async_nats::jetstream::stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        },
    )
    .await
    .map_err(|e| crate::OpenError::AccessRequests(e.to_string()))
}

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list_for_customer))
        .routes(routes!(list))
        .routes(routes!(approve))
        .routes(routes!(deny))
}

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccessStatus {
    Pending,
    Approved,
    Denied,
}

/// A customer's request for a feature or a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AccessRequest {
    /// `ar_<16 hex digits>`.
    pub id: String,
    pub customer: String,
    /// The feature asked for (access to it, or more of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    /// The plan asked for (an upgrade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    pub message: String,
    pub status: AccessStatus,
    pub created_at: DateTime<Utc>,
    /// Who asked: `key:<key id>`.
    pub requested_by: String,
    /// Who decided: `key:<key id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<DateTime<Utc>>,
    /// Why (required to deny; optional to approve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What approval did: the plan set, or the add-on of which one unit was added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<String>,
}

/// A request as a customer sends it: exactly one of `feature` and `plan`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAccessRequest {
    #[serde(default)]
    pub feature: Option<String>,
    #[serde(default)]
    pub plan: Option<String>,
    pub message: String,
}

/// A decision's body.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// Why; required to deny.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Requests, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccessRequestList {
    pub requests: Vec<AccessRequest>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only requests in this status: `pending`, `approved` or `denied`.
    status: Option<AccessStatus>,
    /// Only this customer's requests.
    customer: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CustomerListParams {
    /// Only requests in this status: `pending`, `approved` or `denied`.
    status: Option<AccessStatus>,
}

/// Asks for access to a feature (or more of it) or for an upgrade to a plan. The feature
/// or plan must exist in the catalogue.
#[utoipa::path(
    post,
    path = "/api/v1/customers/{customer}/access-requests",
    tag = "access",
    params(("customer" = String, Path, description = "The customer id")),
    request_body(content = NewAccessRequest, content_type = "application/json", description = "`{feature, message}` or `{plan, message}`"),
    responses(
        (status = 201, body = AccessRequest),
        (status = 400, description = "Not valid, or no such feature or plan; `field` names it", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such customer", body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer): Path<String>,
    body: Result<JsonBody<NewAccessRequest>, ApiError>,
) -> ApiResult<(StatusCode, Json<AccessRequest>)> {
    caller.require_for(ASKERS, &customer)?;
    let JsonBody(body) = body?;
    let message = body.message.trim().to_owned();
    if message.chars().count() > 2_000 {
        return Err(ApiError::bad_request(
            "message",
            "the message is longer than 2,000 characters",
        ));
    }
    let catalog = state.definitions.load_catalog().await?;
    match (&body.feature, &body.plan) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "plan",
                "ask for a feature or for a plan, not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::bad_request(
                "feature",
                "missing field `feature` (or `plan`): ask for a feature or for a plan",
            ));
        }
        (Some(feature), None) if !feature_exists(&catalog, feature) => {
            return Err(ApiError::bad_request(
                "feature",
                format!("no feature {feature:?} in the catalogue"),
            ));
        }
        (None, Some(plan)) if !catalog.plans.iter().any(|p| &p.id == plan) => {
            return Err(ApiError::bad_request(
                "plan",
                format!("no plan {plan:?} in the catalogue"),
            ));
        }
        _ => {}
    }
    if state.definitions.customer(&customer).await?.is_none() {
        return Err(ApiError::not_found(format!("no customer {customer:?}")).field("customer"));
    }
    let request = AccessRequest {
        id: format!("ar_{:016x}", rand::random::<u64>()),
        customer,
        feature: body.feature,
        plan: body.plan,
        message,
        status: AccessStatus::Pending,
        created_at: Utc::now(),
        requested_by: actor(&caller),
        decided_by: None,
        decided_at: None,
        reason: None,
        applied: None,
    };
    let bytes = serde_json::to_vec(&request).map_err(ApiError::internal)?;
    state
        .access_requests
        .create(request.id.as_str(), bytes.into())
        .await
        .map_err(|e| nats("write an access request", e))?;
    Ok((StatusCode::CREATED, Json(request)))
}

/// Every access request, oldest first; filtered by status and customer.
#[utoipa::path(
    get,
    path = "/api/v1/access-requests",
    tag = "access",
    params(ListParams),
    responses(
        (status = 200, body = AccessRequestList),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<AccessRequestList>> {
    caller.require(DECIDERS)?;
    let Query(params) = params.map_err(query_error)?;
    let requests = load(&state, params.status, params.customer.as_deref()).await?;
    Ok(Json(AccessRequestList { requests }))
}

/// One customer's access requests, oldest first (a portal key: its own customer's).
#[utoipa::path(
    get,
    path = "/api/v1/customers/{customer}/access-requests",
    tag = "access",
    params(("customer" = String, Path, description = "The customer id"), CustomerListParams),
    responses(
        (status = 200, body = AccessRequestList),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn list_for_customer(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer): Path<String>,
    params: Result<Query<CustomerListParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<AccessRequestList>> {
    caller.require_for(ASKERS, &customer)?;
    let Query(params) = params.map_err(query_error)?;
    let requests = load(&state, params.status, Some(&customer)).await?;
    Ok(Json(AccessRequestList { requests }))
}

/// Approves a pending request and applies it: a plan request sets the customer's plan
/// (as an order of it), a feature request adds one unit of the first add-on (by id) that
/// provides the feature. Audited with the approver's key and applied live.
#[utoipa::path(
    post,
    path = "/api/v1/access-requests/{id}/approve",
    tag = "access",
    params(("id" = String, Path, description = "The request id")),
    request_body(content = Decision, content_type = "application/json", description = "`{reason}` (optional); an empty body is allowed"),
    responses(
        (status = 200, body = AccessRequest, description = "The request, approved"),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such request", body = Problem),
        (status = 409, description = "Already decided, or no add-on provides the feature", body = Problem),
        (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn approve(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Json<AccessRequest>> {
    caller.require(DECIDERS)?;
    let decision: Decision = optional_json(&body.map_err(super::body_error)?)?;
    let (pending, revision) = read_pending(&state, &id).await?;
    // What approval will do, checked before claiming the request.
    let catalog = state.definitions.load_catalog().await?;
    let target = match (&pending.plan, &pending.feature) {
        (Some(plan), _) => SkuTarget::Plan(plan.clone()),
        (None, Some(feature)) => {
            let mut addons: Vec<_> = catalog
                .addons
                .iter()
                .filter(|a| a.features.contains_key(feature) || a.extra.contains_key(feature))
                .collect();
            addons.sort_by(|a, b| a.id.cmp(&b.id));
            match addons.first() {
                Some(addon) => SkuTarget::Addon {
                    id: addon.id.clone(),
                    quantity: 1,
                },
                None => {
                    return Err(ApiError::conflict(format!(
                        "no add-on in the catalogue provides feature {feature:?}: change the \
                         customer by hand (PUT /api/v1/customers/{{customer}}), then deny or \
                         approve"
                    ))
                    .field("feature"));
                }
            }
        }
        (None, None) => return Err(ApiError::internal(format!("request {id} asks for nothing"))),
    };
    let applied = match &target {
        SkuTarget::Plan(plan) => format!("plan:{plan}"),
        SkuTarget::Addon { id, .. } => format!("addon:{id}"),
    };
    let mut decided = pending.clone();
    decided.status = AccessStatus::Approved;
    decided.decided_by = Some(actor(&caller));
    decided.decided_at = Some(Utc::now());
    decided.reason = decision.reason.filter(|r| !r.trim().is_empty());
    decided.applied = Some(applied);
    let claimed = claim(&state, &decided, revision).await?;
    let order = Order {
        customer: pending.customer.clone(),
        target,
        quantity: 1,
        seats: None,
        starts_at: None,
        ends_at: None,
        anchor_day: None,
    };
    let now = Utc::now();
    let change = state
        .definitions
        .modify_customer(&pending.customer, &actor(&caller), |current| {
            order
                .apply(current.as_ref(), now)
                .map_err(|flaws| flaws_error(&flaws, ""))
        })
        .await;
    if let Err(e) = change {
        // Give the request back: it is still pending.
        let bytes = serde_json::to_vec(&pending).map_err(ApiError::internal)?;
        if let Err(undo) = state
            .access_requests
            .update(id.as_str(), bytes.into(), claimed)
            .await
        {
            tracing::warn!(request = %id, error = %undo, "cannot set an access request back to pending");
        }
        return Err(e);
    }
    Ok(Json(decided))
}

/// Denies a pending request, with the reason the customer will see.
#[utoipa::path(
    post,
    path = "/api/v1/access-requests/{id}/deny",
    tag = "access",
    params(("id" = String, Path, description = "The request id")),
    request_body(content = Decision, content_type = "application/json", description = "`{reason}`, required"),
    responses(
        (status = 200, body = AccessRequest, description = "The request, denied"),
        (status = 400, description = "No reason", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such request", body = Problem),
        (status = 409, description = "Already decided", body = Problem),
        (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn deny(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Json<AccessRequest>> {
    caller.require(DECIDERS)?;
    let decision: Decision = optional_json(&body.map_err(super::body_error)?)?;
    let (pending, revision) = read_pending(&state, &id).await?;
    let Some(reason) = decision.reason.filter(|r| !r.trim().is_empty()) else {
        return Err(ApiError::bad_request(
            "reason",
            "a denial needs a reason, which the customer sees",
        ));
    };
    let mut decided = pending;
    decided.status = AccessStatus::Denied;
    decided.decided_by = Some(actor(&caller));
    decided.decided_at = Some(Utc::now());
    decided.reason = Some(reason);
    claim(&state, &decided, revision).await?;
    Ok(Json(decided))
}

/// Whether a plan or an add-on of the catalogue has `feature`.
fn feature_exists(catalog: &Catalog, feature: &str) -> bool {
    catalog
        .plans
        .iter()
        .any(|p| p.features.contains_key(feature))
        || catalog
            .addons
            .iter()
            .any(|a| a.features.contains_key(feature) || a.extra.contains_key(feature))
}

/// A pending request and its revision; 404 if there is none, 409 if it is decided.
async fn read_pending(state: &AppState, id: &str) -> ApiResult<(AccessRequest, u64)> {
    let valid = id.len() <= 64
        && !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let entry = if valid {
        state
            .access_requests
            .entry(id)
            .await
            .map_err(|e| nats("read an access request", e))?
    } else {
        None
    };
    let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
        return Err(ApiError::not_found(format!("no access request {id:?}")).field("id"));
    };
    let request: AccessRequest = serde_json::from_slice(&entry.value)
        .map_err(|e| ApiError::internal(format!("stored access request {id}: {e}")))?;
    if request.status != AccessStatus::Pending {
        return Err(ApiError::conflict(format!(
            "access request {id} is already {}",
            status_name(request.status)
        ))
        .field("id"));
    }
    Ok((request, entry.revision))
}

/// Writes the decided request if it is still at `revision`; 409 if another decider got
/// there first. Returns the new revision.
async fn claim(state: &AppState, decided: &AccessRequest, revision: u64) -> ApiResult<u64> {
    let bytes = serde_json::to_vec(decided).map_err(ApiError::internal)?;
    state
        .access_requests
        .update(decided.id.as_str(), bytes.into(), revision)
        .await
        .map_err(|e| match e.kind() {
            kv::UpdateErrorKind::WrongLastRevision => ApiError::conflict(format!(
                "access request {} was decided meanwhile",
                decided.id
            ))
            .field("id"),
            _ => nats("write an access request", e),
        })
}

/// Every request, oldest first, filtered.
async fn load(
    state: &AppState,
    status: Option<AccessStatus>,
    customer: Option<&str>,
) -> ApiResult<Vec<AccessRequest>> {
    let keys: Vec<String> = match state.access_requests.keys().await {
        Ok(keys) => keys
            .try_collect()
            .await
            .map_err(|e| nats("list the access requests", e))?,
        Err(e) => return Err(nats("list the access requests", e)),
    };
    let mut out = Vec::new();
    for key in keys {
        let Some(bytes) = state
            .access_requests
            .get(key.as_str())
            .await
            .map_err(|e| nats("read an access request", e))?
        else {
            continue;
        };
        let request: AccessRequest = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(request = %key, error = %e, "unreadable access request skipped");
                continue;
            }
        };
        if status.is_some_and(|s| s != request.status)
            || customer.is_some_and(|c| c != request.customer)
        {
            continue;
        }
        out.push(request);
    }
    out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    Ok(out)
}

fn status_name(status: AccessStatus) -> &'static str {
    match status {
        AccessStatus::Pending => "pending",
        AccessStatus::Approved => "approved",
        AccessStatus::Denied => "denied",
    }
}

fn nats(what: &'static str, e: impl std::fmt::Display) -> ApiError {
    tracing::warn!(what, error = %e, "nats unavailable");
    ApiError::unavailable(format!("NATS is unavailable ({what})"))
}
