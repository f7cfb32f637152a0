//! Meters in OpenMeter's shapes: create, list, get, update and delete them; query their
//! usage by window, customer and group-by (`GET` with OpenMeter's query string, or
//! `POST` with its body); list a group-by's values; and the portal's query of its own
//! customer's usage. An OpenMeter client pointed at Tally calls the same paths with the
//! same parameters and reads the same fields.
//!
//! Definitions go through [`Definitions`](tally_ingest::definitions::Definitions) like
//! plans: validated, stored in the catalogue bucket, audited with the key that made them.
//! Queries run over the lake ([`tally_query::meters`]).
//!
//! **Who.** Meters are defined with the `provisioning` role; they are read and queried by
//! `provisioning`, `billing`, `analyst` and `sdk` keys (a key limited to customers reads
//! only theirs); the portal route answers a portal key for its own customer.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use tally_core::meter::{Meter, Tz, WindowSize};
use tally_ingest::definitions::MeterRefused;
use tally_query::meters::{BadMeterQuery, MeterQuery};
use tally_reports::meters::{MeterQueryResult, named_group_by};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::provisioning::{actor, flaws_error};
use super::queries::{media, report_error};
use super::{Caller, body_error, parse_json};
use crate::error::{ApiError, ApiResult, Problem};
use crate::{AppState, Role};

/// Who defines meters (admin always may).
const DEFINERS: &[Role] = &[Role::Provisioning];
/// Who reads meters and their usage.
pub(crate) const READERS: &[Role] = &[Role::Provisioning, Role::Billing, Role::Analyst, Role::Sdk];

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(get_one, update, delete))
        .routes(routes!(query_get, query_post))
        .routes(routes!(group_by_values))
        .routes(routes!(portal_query))
}

/// Every meter, by slug (`includeDeleted=true`: the deleted ones too).
#[utoipa::path(
    get,
    path = "/api/v1/meters",
    tag = "meters",
    params(
        ("includeDeleted" = Option<bool>, Query, description = "List deleted meters too"),
        ("orderBy" = Option<String>, Query, description = "`key` (the slug, default), `name`, `aggregation`, `createdAt` or `updatedAt`"),
        ("order" = Option<String>, Query, description = "`ASC` (default) or `DESC`"),
        ("page" = Option<u32>, Query, description = "From 1; with `pageSize`"),
        ("pageSize" = Option<u32>, Query, description = "1 to 1000"),
    ),
    responses(
        (status = 200, description = "The meters, OpenMeter's `Meter` objects", body = Vec<Object>),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    uri: Uri,
) -> ApiResult<Json<Vec<Meter>>> {
    caller.require(READERS)?;
    let params = Params::of(
        &uri,
        &["includeDeleted", "orderBy", "order", "page", "pageSize"],
    )?;
    let deleted = params.flag("includeDeleted")?;
    let mut meters: Vec<Meter> = state
        .definitions
        .load_catalog()
        .await?
        .meters
        .into_iter()
        .filter(|m| deleted || !m.is_deleted())
        .collect();
    match params.one("orderBy").unwrap_or("key") {
        "key" | "slug" => {}
        "name" => meters.sort_by(|a, b| a.name.cmp(&b.name)),
        "aggregation" => meters.sort_by_key(|m| m.aggregation.as_str()),
        "createdAt" => meters.sort_by_key(|m| m.created_at),
        "updatedAt" => meters.sort_by_key(|m| m.updated_at),
        other => {
            return Err(ApiError::bad_request(
                "orderBy",
                format!("orderBy is key, name, aggregation, createdAt or updatedAt, not {other:?}"),
            ));
        }
    }
    match params.one("order").unwrap_or("ASC") {
        "ASC" | "asc" => {}
        "DESC" | "desc" => meters.reverse(),
        other => {
            return Err(ApiError::bad_request(
                "order",
                format!("order is ASC or DESC, not {other:?}"),
            ));
        }
    }
    let page = params.number("page", 1, u32::MAX)?;
    let size = params.number("pageSize", 1, 1000)?;
    if page.is_some() || size.is_some() {
        let size = size.unwrap_or(100) as usize;
        let skip = (page.unwrap_or(1) as usize - 1).saturating_mul(size);
        meters = meters.into_iter().skip(skip).take(size).collect();
    }
    Ok(Json(meters))
}

/// Creates a meter: OpenMeter's `MeterCreate` (`slug`, `eventType`, `aggregation`,
/// `valueProperty` unless `COUNT`, `groupBy`, `name`, `description`, `eventFrom`,
/// `metadata`). 409 when a meter of that slug exists.
#[utoipa::path(
    post,
    path = "/api/v1/meters",
    tag = "meters",
    request_body(content = Object, content_type = "application/json", description = "OpenMeter's MeterCreate"),
    responses(
        (status = 201, description = "The meter as stored, with its id", body = Object),
        (status = 400, description = "A field is not valid; `field` names it", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 409, description = "A meter of that slug exists", body = Problem),
        (status = 413, body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Meter>)> {
    caller.require(DEFINERS)?;
    let mut meter: Meter = parse_json(&body.map_err(body_error)?)?;
    meter.id.clear();
    meter.created_at = None;
    meter.updated_at = None;
    meter.deleted_at = None;
    let flaws = meter.problems("");
    if !flaws.is_empty() {
        return Err(flaws_error(&flaws, ""));
    }
    let (stored, _) = state
        .definitions
        .put_meter(&meter, &actor(&caller), true)
        .await
        .map_err(refused)?;
    Ok((StatusCode::CREATED, Json(stored)))
}

/// One meter, by slug or id.
#[utoipa::path(
    get,
    path = "/api/v1/meters/{meterIdOrSlug}",
    tag = "meters",
    params(("meterIdOrSlug" = String, Path, description = "The meter's slug or id")),
    responses(
        (status = 200, description = "The meter", body = Object),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such meter", body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Meter>> {
    caller.require(READERS)?;
    Ok(Json(live(&state, &id).await?))
}

/// What a meter's update may change: OpenMeter's `MeterUpdate`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeterUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
    #[serde(default)]
    pub group_by: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// Changes a meter's name, description, group-bys or metadata (what it measures cannot
/// change: delete it and create it again).
#[utoipa::path(
    put,
    path = "/api/v1/meters/{meterIdOrSlug}",
    tag = "meters",
    params(("meterIdOrSlug" = String, Path, description = "The meter's slug or id")),
    request_body(content = MeterUpdate, content_type = "application/json"),
    responses(
        (status = 200, description = "The meter as stored", body = Object),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such meter", body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Meter>> {
    caller.require(DEFINERS)?;
    let change: MeterUpdate = parse_json(&body.map_err(body_error)?)?;
    let mut meter = live(&state, &id).await?;
    if let Some(name) = change.name {
        meter.name = Some(name);
    }
    if let Some(description) = change.description {
        meter.description = Some(description);
    }
    if let Some(group_by) = change.group_by {
        meter.group_by = group_by;
    }
    if let Some(metadata) = change.metadata {
        meter.metadata = metadata;
    }
    let flaws = meter.problems("");
    if !flaws.is_empty() {
        return Err(flaws_error(&flaws, ""));
    }
    let (stored, _) = state
        .definitions
        .put_meter(&meter, &actor(&caller), false)
        .await
        .map_err(refused)?;
    Ok(Json(stored))
}

/// Deletes a meter: it is kept, marked `deletedAt`, and reads nothing; its slug may be
/// used again (a new meter, with a new id).
#[utoipa::path(
    delete,
    path = "/api/v1/meters/{meterIdOrSlug}",
    tag = "meters",
    params(("meterIdOrSlug" = String, Path, description = "The meter's slug or id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such meter", body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(DEFINERS)?;
    let meter = live(&state, &id).await?;
    match state
        .definitions
        .delete_meter(&meter.slug, &actor(&caller))
        .await?
    {
        Some(_) => Ok(StatusCode::NO_CONTENT),
        None => Err(no_meter(&id)),
    }
}

/// A meter's usage: OpenMeter's query string (`from`, `to`, `windowSize`,
/// `windowTimeZone`, `subject` and `filterCustomerId` repeated, `groupBy` repeated,
/// `filterGroupBy[name]=value`). JSON, or CSV when `Accept` asks for `text/csv`.
#[utoipa::path(
    get,
    path = "/api/v1/meters/{meterIdOrSlug}/query",
    tag = "meters",
    params(
        ("meterIdOrSlug" = String, Path, description = "The meter's slug or id"),
        ("from" = Option<String>, Query, description = "RFC 3339; events at or after"),
        ("to" = Option<String>, Query, description = "RFC 3339; events before"),
        ("windowSize" = Option<String>, Query, description = "MINUTE, HOUR, DAY or MONTH; none: one window per group"),
        ("windowTimeZone" = Option<String>, Query, description = "IANA time zone the windows follow (default UTC)"),
        ("subject" = Option<Vec<String>>, Query, description = "Only these customers (repeat)"),
        ("filterCustomerId" = Option<Vec<String>>, Query, description = "Only these customers (repeat)"),
        ("groupBy" = Option<Vec<String>>, Query, description = "`subject`, `customer_id` or the meter's group-by names (repeat)"),
        ("filterGroupBy" = Option<Object>, Query, style = DeepObject, description = "`filterGroupBy[name]=value`: only events with that value"),
    ),
    responses(
        (status = 200, description = "The usage", content(
            (MeterQueryResult = "application/json"),
            (String = "text/csv"),
        )),
        (status = 400, description = "A parameter is not valid; `field` names it", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such meter", body = Problem),
        (status = 406, body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn query_get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    caller.require(READERS)?;
    let format = accepted(&headers)?;
    let meter = live(&state, &id).await?;
    let query = from_params(&Params::of(&uri, QUERY_PARAMS)?)?;
    answer(&state, &caller, meter, query, format).await
}

/// OpenMeter's `MeterQueryRequest`, the body of `POST …/query`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeterQueryRequest {
    /// OpenMeter's id to follow a query's progress by: checked, otherwise unused.
    pub client_id: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub window_size: Option<String>,
    pub window_time_zone: Option<String>,
    #[serde(default)]
    pub subject: Vec<String>,
    #[serde(default)]
    pub filter_customer_id: Vec<String>,
    #[serde(default)]
    pub filter_group_by: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub group_by: Vec<String>,
}

/// The same query with a JSON body, for filters too long for a URL.
#[utoipa::path(
    post,
    path = "/api/v1/meters/{meterIdOrSlug}/query",
    tag = "meters",
    params(("meterIdOrSlug" = String, Path, description = "The meter's slug or id")),
    request_body(content = MeterQueryRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The usage", content(
            (MeterQueryResult = "application/json"),
            (String = "text/csv"),
        )),
        (status = 400, description = "A field is not valid; `field` names it", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such meter", body = Problem),
        (status = 406, body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn query_post(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    caller.require(READERS)?;
    let format = accepted(&headers)?;
    let request: MeterQueryRequest = parse_json(&body.map_err(body_error)?)?;
    client_id(request.client_id.as_deref())?;
    let meter = live(&state, &id).await?;
    let mut customers = request.subject;
    customers.extend(request.filter_customer_id);
    let query = MeterQuery {
        from: time("from", request.from.as_deref())?,
        to: time("to", request.to.as_deref())?,
        window: window("windowSize", request.window_size.as_deref())?,
        time_zone: zone(request.window_time_zone.as_deref())?,
        customers,
        group_by: request.group_by,
        filter_group_by: request.filter_group_by,
    };
    answer(&state, &caller, meter, query, format).await
}

/// The values a meter's group-by took: `from` and `to` (RFC 3339) bound the events read.
#[utoipa::path(
    get,
    path = "/api/v1/meters/{meterIdOrSlug}/group-by/{groupByKey}/values",
    tag = "meters",
    params(
        ("meterIdOrSlug" = String, Path, description = "The meter's slug or id"),
        ("groupByKey" = String, Path, description = "A group-by name of the meter, or `subject`"),
        ("from" = Option<String>, Query, description = "RFC 3339; events at or after"),
        ("to" = Option<String>, Query, description = "RFC 3339; events before"),
    ),
    responses(
        (status = 200, description = "The distinct values, sorted", body = Vec<String>),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such meter or group-by", body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn group_by_values(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, key)): Path<(String, String)>,
    uri: Uri,
) -> ApiResult<Json<Vec<String>>> {
    caller.require(READERS)?;
    let meter = live(&state, &id).await?;
    let params = Params::of(&uri, &["from", "to"])?;
    let (from, to) = (
        time("from", params.one("from"))?,
        time("to", params.one("to"))?,
    );
    let scoped = caller.scope().is_some();
    let reserved = tally_core::meter::RESERVED_GROUP_BY.contains(&key.as_str());
    if !reserved && !meter.group_by.contains_key(&key) {
        return Err(
            ApiError::not_found(format!("meter {:?} has no group-by {key:?}", meter.slug))
                .field("groupByKey"),
        );
    }
    if scoped {
        return Err(ApiError::forbidden(
            "a key limited to customers reads meters through their query",
        ));
    }
    let values = state
        .reports
        .group_by_values(meter, key, from, to)
        .await
        .map_err(report_error)?;
    Ok(Json(values))
}

/// A portal key's own customer's usage of a meter (OpenMeter's portal query): the same
/// parameters as the meter query, the customer always the key's.
#[utoipa::path(
    get,
    path = "/api/v1/portal/meters/{meterSlug}/query",
    tag = "meters",
    params(
        ("meterSlug" = String, Path, description = "The meter's slug"),
        ("from" = Option<String>, Query), ("to" = Option<String>, Query),
        ("windowSize" = Option<String>, Query), ("windowTimeZone" = Option<String>, Query),
        ("groupBy" = Option<Vec<String>>, Query),
        ("filterGroupBy" = Option<Object>, Query, style = DeepObject),
    ),
    responses(
        (status = 200, description = "The usage", body = MeterQueryResult),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, description = "Not a portal key", body = Problem),
        (status = 404, description = "No such meter", body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn portal_query(
    State(state): State<AppState>,
    caller: Caller,
    Path(slug): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    caller.require(&[Role::Portal])?;
    let format = accepted(&headers)?;
    let meter = live(&state, &slug).await?;
    let params = Params::of(
        &uri,
        &[
            "from",
            "to",
            "windowSize",
            "windowTimeZone",
            "groupBy",
            "filterGroupBy",
            "subject",
        ],
    )?;
    let mut query = from_params(&params)?;
    // A portal key is for one customer: always its own (an admin key reads any).
    if let Some(scope) = caller.scope() {
        let [customer] = scope else {
            return Err(ApiError::forbidden(
                "the portal's meter query needs a portal key, which is for one customer",
            ));
        };
        if query.customers.iter().any(|c| c != customer) {
            return Err(ApiError::forbidden(format!(
                "a portal key reads only its own customer's usage ({customer:?})"
            )));
        }
        query.customers = vec![customer.clone()];
    }
    answer(&state, &caller, meter, query, format).await
}

/// The parameters of the GET query route.
const QUERY_PARAMS: &[&str] = &[
    "clientId",
    "from",
    "to",
    "windowSize",
    "windowTimeZone",
    "subject",
    "filterCustomerId",
    "filterGroupBy",
    "groupBy",
];

/// Checks and runs a meter query, and writes its answer.
async fn answer(
    state: &AppState,
    caller: &Caller,
    meter: Meter,
    mut query: MeterQuery,
    format: Format,
) -> ApiResult<Response> {
    // A key limited to customers queries only them (all of them when it names none).
    if let Some(scope) = caller.scope() {
        if let Some(other) = query.customers.iter().find(|c| !scope.contains(c)) {
            return Err(ApiError::forbidden(format!(
                "key {} may not read customer {other:?}",
                caller.0.id
            )));
        }
        if query.customers.is_empty() {
            query.customers = scope.to_vec();
        }
    }
    query.check(&meter).map_err(bad_query)?;
    let rows = state
        .reports
        .meter_query(meter, query.clone())
        .await
        .map_err(report_error)?;
    let result = MeterQueryResult::new(&query, rows);
    Ok(match format {
        Format::Json => Json(result).into_response(),
        Format::Csv => (
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            result.to_csv(&named_group_by(&query)),
        )
            .into_response(),
    })
}

#[derive(Debug, Clone, Copy)]
enum Format {
    Json,
    Csv,
}

/// JSON unless `Accept` prefers CSV; 406 for neither.
fn accepted(headers: &HeaderMap) -> ApiResult<Format> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(Format::Json);
    };
    for kind in accept
        .split(',')
        .map(|k| k.split(';').next().unwrap_or("").trim())
    {
        match kind {
            media::JSON | "*/*" | "application/*" | "" => return Ok(Format::Json),
            media::CSV | "text/*" => return Ok(Format::Csv),
            _ => {}
        }
    }
    Err(ApiError::not_acceptable(format!(
        "a meter query is sent as application/json or text/csv, not {accept:?}"
    )))
}

/// The live meter known by `id` (slug or id), or 404.
async fn live(state: &AppState, id: &str) -> ApiResult<Meter> {
    state
        .definitions
        .live_meter(id)
        .await?
        .ok_or_else(|| no_meter(id))
}

fn no_meter(id: &str) -> ApiError {
    ApiError::not_found(format!("no meter {id:?}")).field("meterIdOrSlug")
}

fn refused(e: MeterRefused) -> ApiError {
    match e {
        MeterRefused::Exists(_) => ApiError::conflict(e.to_string()).field("slug"),
        MeterRefused::MeasureChanged(_) => ApiError::conflict(e.to_string()).field("slug"),
        MeterRefused::Missing => ApiError::not_found(e.to_string()).field("meterIdOrSlug"),
        MeterRefused::Definitions(e) => e.into(),
    }
}

fn bad_query(e: BadMeterQuery) -> ApiError {
    ApiError::bad_request(e.field, e.message)
}

/// A query string read as OpenMeter's clients write it: repeated names for lists,
/// `name[key]=value` for maps.
pub(crate) struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    /// The query of `uri`; a name not in `known` (nor `known[…]`) is refused.
    pub(crate) fn of(uri: &Uri, known: &[&str]) -> ApiResult<Params> {
        let pairs: Vec<(String, String)> =
            url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        for (name, _) in &pairs {
            let base = name.split('[').next().unwrap_or(name);
            if !known.contains(&base) {
                return Err(ApiError::bad_request(
                    base,
                    format!(
                        "unknown parameter `{base}`: expected one of {}",
                        known.join(", ")
                    ),
                ));
            }
        }
        Ok(Params { pairs })
    }

    pub(crate) fn all(&self, name: &str) -> Vec<String> {
        self.pairs
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub(crate) fn one(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn flag(&self, name: &str) -> ApiResult<bool> {
        match self.one(name) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(other) => Err(ApiError::bad_request(
                name,
                format!("{name} is true or false, not {other:?}"),
            )),
        }
    }

    pub(crate) fn number(&self, name: &str, min: u32, max: u32) -> ApiResult<Option<u32>> {
        self.one(name)
            .map(|v| match v.parse::<u32>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(ApiError::bad_request(
                    name,
                    format!("{name} is a whole number from {min} to {max}, not {v:?}"),
                )),
            })
            .transpose()
    }

    /// `name[key]=value` pairs, values of one key gathered.
    fn map(&self, name: &str) -> ApiResult<BTreeMap<String, Vec<String>>> {
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, v) in &self.pairs {
            let Some(rest) = k.strip_prefix(name) else {
                continue;
            };
            let key = rest
                .strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .filter(|key| !key.is_empty() && !key.contains(['[', ']']))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        name,
                        format!("{name} is written {name}[<group-by>]=<value>, not {k:?}"),
                    )
                })?;
            map.entry(key.to_owned()).or_default().push(v.clone());
        }
        Ok(map)
    }
}

/// OpenMeter's `clientId`: 1 to 36 characters.
pub(crate) fn client_id(id: Option<&str>) -> ApiResult<()> {
    match id {
        Some(id) if id.is_empty() || id.chars().count() > 36 => Err(ApiError::bad_request(
            "clientId",
            "clientId is 1 to 36 characters",
        )),
        _ => Ok(()),
    }
}

fn from_params(params: &Params) -> ApiResult<MeterQuery> {
    client_id(params.one("clientId"))?;
    let mut customers = params.all("subject");
    customers.extend(params.all("filterCustomerId"));
    Ok(MeterQuery {
        from: time("from", params.one("from"))?,
        to: time("to", params.one("to"))?,
        window: window("windowSize", params.one("windowSize"))?,
        time_zone: zone(params.one("windowTimeZone"))?,
        customers,
        group_by: params.all("groupBy"),
        filter_group_by: params.map("filterGroupBy")?,
    })
}

pub(crate) fn time(name: &str, value: Option<&str>) -> ApiResult<Option<DateTime<Utc>>> {
    value
        .map(|t| {
            DateTime::parse_from_rfc3339(t)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| {
                    ApiError::bad_request(
                        name,
                        format!(
                            "{name} must be an RFC 3339 time (2026-11-01T00:00:00Z), not {t:?}: {e}"
                        ),
                    )
                })
        })
        .transpose()
}

fn window(name: &str, value: Option<&str>) -> ApiResult<Option<WindowSize>> {
    value
        .map(|w| {
            WindowSize::parse(w).ok_or_else(|| {
                ApiError::bad_request(
                    name,
                    format!("{name} is MINUTE, HOUR, DAY or MONTH, not {w:?}"),
                )
            })
        })
        .transpose()
}

fn zone(value: Option<&str>) -> ApiResult<Tz> {
    match value {
        None => Ok(Tz::UTC),
        Some(z) => z.parse::<Tz>().map_err(|_| {
            ApiError::bad_request(
                "windowTimeZone",
                format!("windowTimeZone must be an IANA time zone (Europe/Berlin), not {z:?}"),
            )
        }),
    }
}
