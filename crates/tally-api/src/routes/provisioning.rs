//! Provisioning for CRMs and ERPs: plans, add-ons, SKU mappings, customers, orders,
//! grants and the audit trail.
//!
//! Every write goes through [`Definitions`](tally_ingest::definitions::Definitions): it is
//! validated by the domain's own rules (`problems()`), written to the key-value buckets the
//! workers watch (so it applies live) and audited with the key that made it
//! (`key:<key id>`). A partial change of a customer (an order, a suspension, a grant) is a
//! compare-and-set on the customer's revision, so concurrent changes all take effect.
//!
//! `POST` routes accept an `Idempotency-Key` header, as Stripe's do: see [`idempotent`].

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tally_core::entitlement::{
    AddOn, Catalog, Customer, Customers, Grant, Order, Plan, Problem as Flaw, Sku, SkuTarget,
    Status,
};
use tally_ingest::definitions::{Applied, AuditEntry, AuditFilter, Change};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::idempotency::{idempotent, to_value};
use super::{Caller, JsonBody, body_error, optional_json, parse_json};
use crate::error::{ApiError, ApiResult, Problem};
use crate::{AppState, Role};

/// Who may provision (admin always may).
const PROVISIONERS: &[Role] = &[Role::Provisioning];

/// Audit entries returned by default, and at most.
const AUDIT_DEFAULT_LIMIT: usize = 1_000;
const AUDIT_MAX_LIMIT: usize = 10_000;

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_plans))
        .routes(routes!(get_plan, put_plan))
        .routes(routes!(list_addons))
        .routes(routes!(get_addon, put_addon))
        .routes(routes!(list_skus))
        .routes(routes!(get_sku, put_sku))
        .routes(routes!(list_customers))
        .routes(routes!(get_customer, put_customer))
        .routes(routes!(order))
        .routes(routes!(suspend))
        .routes(routes!(resume))
        .routes(routes!(cancel))
        .routes(routes!(grant))
        .routes(routes!(remove_addon))
        .routes(routes!(audit))
}

pub(crate) fn actor(caller: &Caller) -> String {
    format!("key:{}", caller.0.id)
}

/// 201 when the write created the definition, 200 when it updated it or it was unchanged.
fn status_of(applied: &Applied) -> StatusCode {
    match applied.change {
        Change::Created => StatusCode::CREATED,
        Change::Updated | Change::Unchanged => StatusCode::OK,
    }
}

/// A definition's flaws as one 400: the first names the field (its path inside the body,
/// without the `plans[0].` of the file it was checked as), the detail lists all.
pub(crate) fn flaws_error(flaws: &[Flaw], prefix: &str) -> ApiError {
    let field = |f: &Flaw| f.field.strip_prefix(prefix).unwrap_or(&f.field).to_owned();
    let detail = flaws
        .iter()
        .map(|f| format!("{}: {}", field(f), f.message))
        .collect::<Vec<_>>()
        .join("; ");
    match flaws.first() {
        Some(first) => {
            ApiError::bad_request(field(first), format!("the body is not valid: {detail}"))
        }
        None => ApiError::invalid("bad_request", "the body is not valid"),
    }
}

/// Reads a `PUT` body, a JSON object whose `id_field` (`id`, or `sku`) may be left out: the
/// path's id is used; when present it must be the path's.
fn body_with_id<T: DeserializeOwned>(bytes: &[u8], id_field: &str, id: &str) -> ApiResult<T> {
    let mut value: Value = parse_json(bytes)?;
    let Some(object) = value.as_object_mut() else {
        // Not an object: the typed read says what was expected.
        return parse_json(bytes);
    };
    match object.get(id_field) {
        None => {
            object.insert(id_field.to_owned(), Value::String(id.to_owned()));
        }
        Some(Value::String(given)) if given != id => {
            return Err(ApiError::bad_request(
                id_field,
                format!("the body's {id_field} {given:?} is not the path's {id:?}"),
            ));
        }
        Some(_) => {}
    }
    let bytes = serde_json::to_vec(&value).map_err(ApiError::internal)?;
    parse_json(&bytes)
}

fn no_customer(id: &str) -> ApiError {
    ApiError::not_found(format!("no customer {id:?}")).field("customer")
}

// ---------------------------------------------------------------------------------------
// Plans, add-ons and SKU mappings

/// Every plan.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlanList {
    #[schema(value_type = Vec<Object>)]
    pub plans: Vec<Plan>,
}

/// Every add-on.
#[derive(Debug, Serialize, ToSchema)]
pub struct AddOnList {
    #[schema(value_type = Vec<Object>)]
    pub addons: Vec<AddOn>,
}

/// Every SKU mapping.
#[derive(Debug, Serialize, ToSchema)]
pub struct SkuList {
    #[schema(value_type = Vec<Object>)]
    pub skus: Vec<Sku>,
}

/// Every customer.
#[derive(Debug, Serialize, ToSchema)]
pub struct CustomerList {
    #[schema(value_type = Vec<Object>)]
    pub customers: Vec<Customer>,
}

/// Every plan, sorted by id.
#[utoipa::path(
    get,
    path = "/api/v1/plans",
    tag = "provisioning",
    responses(
        (status = 200, body = PlanList),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn list_plans(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<PlanList>> {
    caller.require(PROVISIONERS)?;
    let plans = state.definitions.load_catalog().await?.plans;
    Ok(Json(PlanList { plans }))
}

/// One plan: its features with their entitlements, seats and prices.
#[utoipa::path(
    get,
    path = "/api/v1/plans/{id}",
    tag = "provisioning",
    params(("id" = String, Path, description = "The plan id")),
    responses(
        (status = 200, body = Object, description = "The plan"),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such plan", body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn get_plan(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Plan>> {
    caller.require(PROVISIONERS)?;
    match state.definitions.plan(&id).await? {
        Some(plan) => Ok(Json(plan)),
        None => Err(ApiError::not_found(format!("no plan {id:?}")).field("id")),
    }
}

/// Creates or replaces a plan (201 when created, 200 otherwise), applied live to every
/// customer on it. The body is the plan; its `id` may be left out, and must be the path's
/// when given. Every flaw is listed in the detail, the first one named in `field`.
#[utoipa::path(
    put,
    path = "/api/v1/plans/{id}",
    tag = "provisioning",
    params(("id" = String, Path, description = "The plan id")),
    request_body(content = Object, content_type = "application/json", description = "The plan: `{id, name, features: {<feature>: {kind: metered|boolean|static, …}}, seats, prices}`"),
    responses(
        (status = 200, body = Object, description = "The plan as stored (updated or unchanged)"),
        (status = 201, body = Object, description = "The plan as stored (created)"),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 413, body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn put_plan(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Plan>)> {
    caller.require(PROVISIONERS)?;
    let plan: Plan = body_with_id(&body.map_err(body_error)?, "id", &id)?;
    let catalog = Catalog {
        plans: vec![plan],
        ..Catalog::default()
    };
    let flaws = catalog.problems();
    if !flaws.is_empty() {
        return Err(flaws_error(&flaws, "plans[0]."));
    }
    let plan = &catalog.plans[0];
    let applied = state.definitions.put_plan(plan, &actor(&caller)).await?;
    Ok((status_of(&applied), Json(plan.clone())))
}

/// Every add-on, sorted by id.
#[utoipa::path(
    get,
    path = "/api/v1/addons",
    tag = "provisioning",
    responses(
        (status = 200, body = AddOnList),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn list_addons(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<AddOnList>> {
    caller.require(PROVISIONERS)?;
    let addons = state.definitions.load_catalog().await?.addons;
    Ok(Json(AddOnList { addons }))
}

/// One add-on: the features it turns on and the quantity it adds per unit bought.
#[utoipa::path(
    get,
    path = "/api/v1/addons/{id}",
    tag = "provisioning",
    params(("id" = String, Path, description = "The add-on id")),
    responses(
        (status = 200, body = Object, description = "The add-on"),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such add-on", body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn get_addon(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<AddOn>> {
    caller.require(PROVISIONERS)?;
    match state.definitions.addon(&id).await? {
        Some(addon) => Ok(Json(addon)),
        None => Err(ApiError::not_found(format!("no add-on {id:?}")).field("id")),
    }
}

/// Creates or replaces an add-on (201 when created, 200 otherwise), applied live to every
/// customer who bought it. The body's `id` may be left out, and must be the path's when
/// given.
#[utoipa::path(
    put,
    path = "/api/v1/addons/{id}",
    tag = "provisioning",
    params(("id" = String, Path, description = "The add-on id")),
    request_body(content = Object, content_type = "application/json", description = "The add-on: `{id, name, features, extra: {<feature>: <quantity per unit>}, seats, price}`"),
    responses(
        (status = 200, body = Object, description = "The add-on as stored (updated or unchanged)"),
        (status = 201, body = Object, description = "The add-on as stored (created)"),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 413, body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn put_addon(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<AddOn>)> {
    caller.require(PROVISIONERS)?;
    let addon: AddOn = body_with_id(&body.map_err(body_error)?, "id", &id)?;
    let catalog = Catalog {
        addons: vec![addon],
        ..Catalog::default()
    };
    let flaws = catalog.problems();
    if !flaws.is_empty() {
        return Err(flaws_error(&flaws, "addons[0]."));
    }
    let addon = &catalog.addons[0];
    let applied = state.definitions.put_addon(addon, &actor(&caller)).await?;
    Ok((status_of(&applied), Json(addon.clone())))
}

/// Every SKU mapping, sorted by SKU.
#[utoipa::path(
    get,
    path = "/api/v1/skus",
    tag = "provisioning",
    responses(
        (status = 200, body = SkuList),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn list_skus(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<SkuList>> {
    caller.require(PROVISIONERS)?;
    let skus = state.definitions.load_catalog().await?.skus;
    Ok(Json(SkuList { skus }))
}

/// One SKU mapping: the plan, or the add-on and units, an order of the SKU provisions.
#[utoipa::path(
    get,
    path = "/api/v1/skus/{sku}",
    tag = "provisioning",
    params(("sku" = String, Path, description = "The SKU")),
    responses(
        (status = 200, body = Object, description = "The SKU mapping"),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such SKU", body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn get_sku(
    State(state): State<AppState>,
    caller: Caller,
    Path(sku): Path<String>,
) -> ApiResult<Json<Sku>> {
    caller.require(PROVISIONERS)?;
    match state.definitions.sku(&sku).await? {
        Some(found) => Ok(Json(found)),
        None => Err(ApiError::not_found(format!("no SKU {sku:?}")).field("sku")),
    }
}

/// Creates or replaces a SKU mapping (201 when created, 200 otherwise): `{"sku": …,
/// "plan": <plan id>}` or `{"sku": …, "addon": {"id": <add-on id>, "quantity": <units per
/// unit ordered>}}`. The plan or add-on must exist. The body's `sku` may be left out, and
/// must be the path's when given.
#[utoipa::path(
    put,
    path = "/api/v1/skus/{sku}",
    tag = "provisioning",
    params(("sku" = String, Path, description = "The SKU")),
    request_body(content = Object, content_type = "application/json", description = "`{sku, plan}` or `{sku, addon: {id, quantity}}`"),
    responses(
        (status = 200, body = Object, description = "The mapping as stored (updated or unchanged)"),
        (status = 201, body = Object, description = "The mapping as stored (created)"),
        (status = 400, description = "Not valid, or the plan or add-on does not exist", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 413, body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn put_sku(
    State(state): State<AppState>,
    caller: Caller,
    Path(sku): Path<String>,
    body: Result<JsonBody<SkuBody>, ApiError>,
) -> ApiResult<(StatusCode, Json<Sku>)> {
    caller.require(PROVISIONERS)?;
    let JsonBody(body) = body?;
    let mapping = body.into_sku(sku)?;
    let catalog = Catalog {
        skus: vec![mapping],
        ..Catalog::default()
    };
    let flaws = catalog.problems();
    if !flaws.is_empty() {
        return Err(flaws_error(&flaws, "skus[0]."));
    }
    let mapping = &catalog.skus[0];
    match &mapping.target {
        SkuTarget::Plan(plan) if state.definitions.plan(plan).await?.is_none() => {
            return Err(ApiError::bad_request(
                "plan",
                format!("no plan {plan:?}: put the plan first"),
            ));
        }
        SkuTarget::Addon { id, .. } if state.definitions.addon(id).await?.is_none() => {
            return Err(ApiError::bad_request(
                "addon.id",
                format!("no add-on {id:?}: put the add-on first"),
            ));
        }
        _ => {}
    }
    let applied = state.definitions.put_sku(mapping, &actor(&caller)).await?;
    Ok((status_of(&applied), Json(mapping.clone())))
}

/// A SKU mapping as a `PUT` sends it. (The stored [`Sku`] flattens its target, which
/// serde reads without naming an unknown or missing field; this shape names them.)
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SkuBody {
    #[serde(default)]
    sku: Option<String>,
    #[serde(default)]
    plan: Option<String>,
    #[serde(default)]
    addon: Option<AddOnTarget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddOnTarget {
    id: String,
    #[serde(default = "one")]
    quantity: u32,
}

impl SkuBody {
    /// The mapping for the path's `sku`.
    fn into_sku(self, sku: String) -> ApiResult<Sku> {
        if let Some(given) = self.sku
            && given != sku
        {
            return Err(ApiError::bad_request(
                "sku",
                format!("the body's sku {given:?} is not the path's {sku:?}"),
            ));
        }
        let target = match (self.plan, self.addon) {
            (Some(plan), None) => SkuTarget::Plan(plan),
            (None, Some(AddOnTarget { id, quantity })) => SkuTarget::Addon { id, quantity },
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "addon",
                    "a SKU maps to a plan or to an add-on, not both",
                ));
            }
            (None, None) => {
                return Err(ApiError::bad_request(
                    "plan",
                    "missing field `plan` (or `addon`): a SKU maps to a plan or to an add-on",
                ));
            }
        };
        Ok(Sku { sku, target })
    }
}

// ---------------------------------------------------------------------------------------
// Customers

/// Every customer, sorted by id.
#[utoipa::path(
    get,
    path = "/api/v1/customers",
    tag = "provisioning",
    responses(
        (status = 200, body = CustomerList),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn list_customers(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<CustomerList>> {
    caller.require(PROVISIONERS)?;
    let customers = state.definitions.load_customers().await?;
    Ok(Json(CustomerList { customers }))
}

/// One customer's definition: plan, add-ons, seats, grants, validity, regions, status.
#[utoipa::path(
    get,
    path = "/api/v1/customers/{customer}",
    tag = "provisioning",
    params(("customer" = String, Path, description = "The customer id")),
    responses(
        (status = 200, body = Object, description = "The customer"),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such customer", body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn get_customer(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Customer>> {
    caller.require(PROVISIONERS)?;
    match state.definitions.customer(&id).await? {
        Some(customer) => Ok(Json(customer)),
        None => Err(no_customer(&id)),
    }
}

/// Creates or replaces a customer whole (201 when created, 200 otherwise), applied live
/// by the workers. Its plan and add-ons must exist. The body's `id` may be left out, and
/// must be the path's when given.
#[utoipa::path(
    put,
    path = "/api/v1/customers/{customer}",
    tag = "provisioning",
    params(("customer" = String, Path, description = "The customer id")),
    request_body(content = Object, content_type = "application/json", description = "The customer: `{id, plan, addons: [{id, quantity}], seats, grants, valid_from, valid_until, regions, status, anchor_day}`"),
    responses(
        (status = 200, body = Object, description = "The customer as stored (updated or unchanged)"),
        (status = 201, body = Object, description = "The customer as stored (created)"),
        (status = 400, description = "Not valid, or its plan or an add-on does not exist", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 413, body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn put_customer(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Customer>)> {
    caller.require(PROVISIONERS)?;
    let customer: Customer = body_with_id(&body.map_err(body_error)?, "id", &id)?;
    let customers = Customers {
        customers: vec![customer],
    };
    let flaws = customers.problems();
    if !flaws.is_empty() {
        return Err(flaws_error(&flaws, "customers[0]."));
    }
    let customer = &customers.customers[0];
    check_references(&state, customer).await?;
    let applied = state
        .definitions
        .put_customer(customer, &actor(&caller))
        .await?;
    Ok((status_of(&applied), Json(customer.clone())))
}

/// A customer's plan and add-ons exist.
async fn check_references(state: &AppState, customer: &Customer) -> ApiResult<()> {
    if state.definitions.plan(&customer.plan).await?.is_none() {
        return Err(ApiError::bad_request(
            "plan",
            format!("no plan {:?}", customer.plan),
        ));
    }
    for (i, addon) in customer.addons.iter().enumerate() {
        if state.definitions.addon(&addon.id).await?.is_none() {
            return Err(ApiError::bad_request(
                format!("addons[{i}].id"),
                format!("no add-on {:?}", addon.id),
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Orders

/// An order line: a SKU bought for a customer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    /// The customer id (created by the order of a plan SKU when missing).
    pub customer: String,
    /// The SKU ordered (`PUT /api/v1/skus/{sku}` maps it to a plan or an add-on).
    pub sku: String,
    /// Units ordered: of an add-on SKU, each adding the SKU's units of the add-on; a plan
    /// SKU is ordered once. Default 1.
    #[serde(default = "one")]
    pub quantity: u32,
    /// Replaces the customer's seats.
    #[serde(default)]
    pub seats: Option<u32>,
    /// When a new subscription starts (default: at once).
    #[serde(default)]
    pub starts_at: Option<DateTime<Utc>>,
    /// When the subscription ends (plan SKUs; default: open-ended).
    #[serde(default)]
    pub ends_at: Option<DateTime<Utc>>,
    /// The day of the month billing periods start, 1–31 (plan SKUs).
    #[serde(default)]
    pub anchor_day: Option<u8>,
}

fn one() -> u32 {
    1
}

/// What an order did.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OrderResult {
    /// This order's id (a replay for the same `Idempotency-Key` returns the same one).
    pub order_id: String,
    /// The customer as stored after the order.
    #[schema(value_type = Object)]
    pub customer: Customer,
    /// `created` (a new customer), `updated`, or `unchanged`.
    #[schema(value_type = String)]
    pub change: Change,
}

/// Provisions an order: a plan SKU sets the customer's plan (creating the customer, or
/// starting a new term when its entitlement has ended; on a current customer, an upgrade
/// or downgrade at once), an add-on SKU adds `quantity` × the SKU's units of the add-on.
/// Send an `Idempotency-Key` to make retries safe: a repeated key returns the first
/// response without provisioning again.
#[utoipa::path(
    post,
    path = "/api/v1/orders",
    tag = "provisioning",
    params(("Idempotency-Key" = Option<String>, Header, description = "Up to 255 bytes; a repeat returns the first response (for 24 hours by default)")),
    request_body(content = OrderRequest, content_type = "application/json"),
    responses(
        (status = 201, body = OrderResult),
        (status = 400, description = "Not valid, or an unknown SKU", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 409, description = "The Idempotency-Key was used for another request, or is in progress", body = Problem),
        (status = 413, body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn order(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    uri: Uri,
    body: Result<JsonBody<OrderRequest>, ApiError>,
) -> ApiResult<Response> {
    caller.require(PROVISIONERS)?;
    let JsonBody(request) = body?;
    let fingerprint = to_value(&request)?;
    let actor = actor(&caller);
    let work = {
        let state = state.clone();
        async move {
            let Some(sku) = state.definitions.sku(&request.sku).await? else {
                return Err(ApiError::bad_request(
                    "sku",
                    format!("no SKU {:?}", request.sku),
                ));
            };
            let missing = match &sku.target {
                SkuTarget::Plan(plan) => state
                    .definitions
                    .plan(plan)
                    .await?
                    .is_none()
                    .then(|| format!("plan {plan:?}")),
                SkuTarget::Addon { id, .. } => state
                    .definitions
                    .addon(id)
                    .await?
                    .is_none()
                    .then(|| format!("add-on {id:?}")),
            };
            if let Some(missing) = missing {
                return Err(ApiError::conflict(format!(
                    "SKU {:?} maps to {missing}, which does not exist",
                    sku.sku
                ))
                .field("sku"));
            }
            let order = Order {
                customer: request.customer.clone(),
                target: sku.target,
                quantity: request.quantity,
                seats: request.seats,
                starts_at: request.starts_at,
                ends_at: request.ends_at,
                anchor_day: request.anchor_day,
            };
            let now = Utc::now();
            let (customer, applied) = state
                .definitions
                .modify_customer(&request.customer, &actor, |current| {
                    order
                        .apply(current.as_ref(), now)
                        .map_err(|flaws| flaws_error(&flaws, ""))
                })
                .await?;
            let result = OrderResult {
                order_id: format!("ord_{:016x}", rand::random::<u64>()),
                customer,
                change: applied.change,
            };
            Ok((StatusCode::CREATED, to_value(&result)?))
        }
    };
    idempotent(&state, &caller, &headers, &uri, &fingerprint, work).await
}

// ---------------------------------------------------------------------------------------
// Customer actions

/// No body, or an empty object.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// When a cancellation takes effect.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// The first instant the entitlement no longer holds (RFC 3339); default now.
    #[serde(default)]
    pub at: Option<DateTime<Utc>>,
}

/// Reads the body, then applies `change` to the stored customer once per
/// `Idempotency-Key`, answering `status` and the stored customer.
#[allow(clippy::too_many_arguments)]
async fn customer_action<F>(
    state: AppState,
    caller: Caller,
    headers: HeaderMap,
    uri: Uri,
    request: Value,
    id: String,
    status: StatusCode,
    mut change: F,
) -> ApiResult<Response>
where
    F: FnMut(Customer, DateTime<Utc>) -> ApiResult<Customer> + Send + 'static,
{
    let actor = actor(&caller);
    let work = {
        let state = state.clone();
        async move {
            let now = Utc::now();
            let (customer, _) = state
                .definitions
                .modify_customer(&id, &actor, |current| match current {
                    Some(c) => change(c, now),
                    None => Err(no_customer(&id)),
                })
                .await?;
            Ok((status, to_value(&customer)?))
        }
    };
    idempotent(&state, &caller, &headers, &uri, &request, work).await
}

/// Suspends a customer: from now on its events are decided `expired` and checks deny
/// access, until it is resumed. Suspending a suspended customer changes nothing.
#[utoipa::path(
    post,
    path = "/api/v1/customers/{customer}/suspend",
    tag = "provisioning",
    params(
        ("customer" = String, Path, description = "The customer id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Up to 255 bytes; a repeat returns the first response"),
    ),
    request_body(content = Option<Empty>, content_type = "application/json"),
    responses(
        (status = 200, body = Object, description = "The customer as stored"),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such customer", body = Problem),
        (status = 409, description = "The Idempotency-Key was used for another request, or is in progress", body = Problem),
        (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn suspend(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    caller.require(PROVISIONERS)?;
    let body = body.map_err(body_error)?;
    let request: Empty = optional_json(&body)?;
    let request = to_value(&request)?;
    customer_action(
        state,
        caller,
        headers,
        uri,
        request,
        id,
        StatusCode::OK,
        |mut c, _| {
            c.status = Status::Suspended;
            Ok(c)
        },
    )
    .await
}

/// Resumes a suspended customer: its events are decided against its plan again.
#[utoipa::path(
    post,
    path = "/api/v1/customers/{customer}/resume",
    tag = "provisioning",
    params(
        ("customer" = String, Path, description = "The customer id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Up to 255 bytes; a repeat returns the first response"),
    ),
    request_body(content = Option<Empty>, content_type = "application/json"),
    responses(
        (status = 200, body = Object, description = "The customer as stored"),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such customer", body = Problem),
        (status = 409, description = "The Idempotency-Key was used for another request, or is in progress", body = Problem),
        (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    caller.require(PROVISIONERS)?;
    let body = body.map_err(body_error)?;
    let request: Empty = optional_json(&body)?;
    let request = to_value(&request)?;
    customer_action(
        state,
        caller,
        headers,
        uri,
        request,
        id,
        StatusCode::OK,
        |mut c, _| {
            c.status = Status::Active;
            Ok(c)
        },
    )
    .await
}

/// Cancels a customer's entitlement at `at` (default now): its `valid_until` becomes
/// `at`, and events after it are decided `expired`. A cancellation never extends an
/// entitlement that already ends earlier. To subscribe again, order a plan.
#[utoipa::path(
    post,
    path = "/api/v1/customers/{customer}/cancel",
    tag = "provisioning",
    params(
        ("customer" = String, Path, description = "The customer id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Up to 255 bytes; a repeat returns the first response"),
    ),
    request_body(content = Option<CancelRequest>, content_type = "application/json"),
    responses(
        (status = 200, body = Object, description = "The customer as stored"),
        (status = 400, description = "Not valid, or `at` is not after the customer's start", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such customer", body = Problem),
        (status = 409, description = "The Idempotency-Key was used for another request, or is in progress", body = Problem),
        (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    caller.require(PROVISIONERS)?;
    let body = body.map_err(body_error)?;
    let request: CancelRequest = optional_json(&body)?;
    let at = request.at;
    let request = to_value(&request)?;
    customer_action(
        state,
        caller,
        headers,
        uri,
        request,
        id,
        StatusCode::OK,
        move |mut c, now| {
            let at = at.unwrap_or(now);
            if let Some(from) = c.valid_from
                && at <= from
            {
                return Err(ApiError::bad_request(
                    "at",
                    format!(
                        "customer {:?} starts at {}; a cancellation must be after it",
                        c.id,
                        from.to_rfc3339()
                    ),
                ));
            }
            c.valid_until = Some(c.valid_until.map_or(at, |until| until.min(at)));
            Ok(c)
        },
    )
    .await
}

/// Adds a grant (a top-up of a metered feature, used after the period's limit) to a
/// customer. Its id must be new for the customer (409 otherwise).
#[utoipa::path(
    post,
    path = "/api/v1/customers/{customer}/grants",
    tag = "provisioning",
    params(
        ("customer" = String, Path, description = "The customer id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Up to 255 bytes; a repeat returns the first response"),
    ),
    request_body(content = Object, content_type = "application/json", description = "The grant: `{id, feature, amount, effective, expires, priority, recurring}`"),
    responses(
        (status = 201, body = Object, description = "The customer as stored, with the grant"),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such customer", body = Problem),
        (status = 409, description = "A grant with this id exists, or the Idempotency-Key was used for another request or is in progress", body = Problem),
        (status = 413, body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn grant(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<JsonBody<Grant>, ApiError>,
) -> ApiResult<Response> {
    caller.require(PROVISIONERS)?;
    let JsonBody(grant) = body?;
    let request = to_value(&grant)?;
    customer_action(
        state,
        caller,
        headers,
        uri,
        request,
        id,
        StatusCode::CREATED,
        move |mut c, _| {
            if c.grants.iter().any(|g| g.id == grant.id) {
                return Err(ApiError::conflict(format!(
                    "customer {:?} has a grant {:?} already",
                    c.id, grant.id
                ))
                .field("id"));
            }
            c.grants.push(grant.clone());
            let prefix = format!(".grants[{}].", c.grants.len() - 1);
            let flaws: Vec<Flaw> = c
                .problems("")
                .into_iter()
                .filter(|f| f.field.starts_with(&prefix))
                .collect();
            if !flaws.is_empty() {
                return Err(flaws_error(&flaws, &prefix));
            }
            Ok(c)
        },
    )
    .await
}

/// Removes an add-on, all its units, from a customer.
#[utoipa::path(
    delete,
    path = "/api/v1/customers/{customer}/addons/{addon}",
    tag = "provisioning",
    params(
        ("customer" = String, Path, description = "The customer id"),
        ("addon" = String, Path, description = "The add-on id"),
    ),
    responses(
        (status = 200, body = Object, description = "The customer as stored, without the add-on"),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such customer, or it does not have the add-on", body = Problem),
        (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn remove_addon(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, addon)): Path<(String, String)>,
) -> ApiResult<Json<Customer>> {
    caller.require(PROVISIONERS)?;
    let (customer, _) = state
        .definitions
        .modify_customer(&id, &actor(&caller), |current| {
            let Some(mut c) = current else {
                return Err(no_customer(&id));
            };
            let before = c.addons.len();
            c.addons.retain(|a| a.id != addon);
            if c.addons.len() == before {
                return Err(ApiError::not_found(format!(
                    "customer {id:?} does not have the add-on {addon:?}"
                ))
                .field("addon"));
            }
            Ok(c)
        })
        .await?;
    Ok(Json(customer))
}

// ---------------------------------------------------------------------------------------
// Audit

/// Audit entries, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEntries {
    /// Each: `{actor, time, kind, id, bucket, key, revision, before, after}`.
    #[schema(value_type = Vec<Object>)]
    pub entries: Vec<AuditEntry>,
}

/// The audit trail of definition changes (who, when, what, before and after), oldest
/// first. `customer` reads one customer's entries without scanning the others'.
#[utoipa::path(
    get,
    path = "/api/v1/audit",
    tag = "provisioning",
    params(
        ("customer" = Option<String>, Query, description = "One customer's entries (kind `customer`)"),
        ("kind" = Option<String>, Query, description = "`plan`, `addon`, `sku`, `meter` or `customer`"),
        ("from" = Option<String>, Query, description = "Entries at or after this time (RFC 3339)"),
        ("to" = Option<String>, Query, description = "Entries before this time (RFC 3339)"),
        ("limit" = Option<usize>, Query, description = "The most entries returned (the oldest ones): 1 to 10000, default 1000"),
    ),
    responses(
        (status = 200, body = AuditEntries),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn audit(
    State(state): State<AppState>,
    caller: Caller,
    params: Result<Query<BTreeMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<AuditEntries>> {
    caller.require(PROVISIONERS)?;
    let Query(params) = params.map_err(|e| {
        ApiError::invalid(
            "bad_request",
            format!("the query string is not valid: {}", e.body_text()),
        )
    })?;
    let filter = audit_filter(&params)?;
    let entries = state.definitions.audit_where(&filter).await?;
    Ok(Json(AuditEntries { entries }))
}

fn audit_filter(params: &BTreeMap<String, String>) -> ApiResult<AuditFilter> {
    const KINDS: [&str; 5] = ["plan", "addon", "sku", "meter", "customer"];
    if let Some(unknown) = params
        .keys()
        .find(|k| !["customer", "kind", "from", "to", "limit"].contains(&k.as_str()))
    {
        return Err(ApiError::bad_request(
            unknown.as_str(),
            format!("unknown parameter `{unknown}`: expected customer, kind, from, to or limit"),
        ));
    }
    let time = |name: &str| -> ApiResult<Option<DateTime<Utc>>> {
        params
            .get(name)
            .map(|t| {
                DateTime::parse_from_rfc3339(t)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| {
                        ApiError::bad_request(
                            name,
                            format!("{name} must be an RFC 3339 time (2026-11-01T00:00:00Z), not {t:?}: {e}"),
                        )
                    })
            })
            .transpose()
    };
    let (from, to) = (time("from")?, time("to")?);
    if let (Some(from), Some(to)) = (from, to)
        && to <= from
    {
        return Err(ApiError::bad_request("to", "to must be after from"));
    }
    let limit = match params.get("limit") {
        None => AUDIT_DEFAULT_LIMIT,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=AUDIT_MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(
                    "limit",
                    format!("limit must be a whole number from 1 to {AUDIT_MAX_LIMIT}, not {l:?}"),
                ));
            }
        },
    };
    let kind = params.get("kind").cloned();
    if let Some(k) = &kind
        && !KINDS.contains(&k.as_str())
    {
        return Err(ApiError::bad_request(
            "kind",
            format!("kind must be plan, addon, sku, meter or customer, not {k:?}"),
        ));
    }
    let id = params.get("customer").cloned();
    if let Some(customer) = &id {
        if customer.is_empty() {
            return Err(ApiError::bad_request(
                "customer",
                "customer must not be empty",
            ));
        }
        if kind.as_deref().is_some_and(|k| k != "customer") {
            return Err(ApiError::bad_request(
                "kind",
                "customer= reads a customer's entries: kind must be customer or left out",
            ));
        }
    }
    Ok(AuditFilter {
        kind: if id.is_some() {
            Some("customer".to_owned())
        } else {
            kind
        },
        id,
        from,
        to,
        limit,
    })
}
