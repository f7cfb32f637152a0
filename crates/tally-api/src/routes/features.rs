//! Features bound to meters in OpenMeter's shapes: create, list, get and archive them. A
//! plan's metered entitlement to a feature's key then counts what the feature's meter
//! reads of each event (`tally_core::meter::Feature`).
//!
//! **Who.** Features are defined with the `provisioning` role and read by the meters'
//! readers.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use tally_core::meter::Feature;
use tally_ingest::definitions::FeatureRefused;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::meters::{Params, READERS};
use super::provisioning::actor;
use super::{Caller, body_error, parse_json};
use crate::error::{ApiError, ApiResult, Problem};
use crate::{AppState, Role};

/// Who defines features (admin always may).
const DEFINERS: &[Role] = &[Role::Provisioning];

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(get_one, archive))
}

/// Every feature bound to a meter, by key (`includeArchived=true`: the archived ones too;
/// `meterSlug`: only those of these meters, repeated).
#[utoipa::path(
    get,
    path = "/api/v1/features",
    tag = "features",
    params(
        ("includeArchived" = Option<bool>, Query, description = "List archived features too"),
        ("meterSlug" = Option<Vec<String>>, Query, description = "Only features of these meters (repeat)"),
    ),
    responses(
        (status = 200, description = "The features, OpenMeter's `Feature` objects", body = Vec<Object>),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    uri: Uri,
) -> ApiResult<Json<Vec<Feature>>> {
    caller.require(READERS)?;
    let params = Params::of(&uri, &["includeArchived", "meterSlug"])?;
    let archived = params.flag("includeArchived")?;
    let meters = params.all("meterSlug");
    let features = state
        .definitions
        .load_catalog()
        .await?
        .features
        .into_iter()
        .filter(|f| archived || !f.is_archived())
        .filter(|f| meters.is_empty() || meters.contains(&f.meter_slug))
        .collect();
    Ok(Json(features))
}

/// Creates a feature: OpenMeter's `FeatureCreateInputs` (`key`, `name`, `meterSlug`,
/// `meterGroupByFilters`, `metadata`). 409 when a live feature has that key; 400 naming
/// `meterSlug` when the meter does not exist or aggregates by `AVG` or `MIN`.
#[utoipa::path(
    post,
    path = "/api/v1/features",
    tag = "features",
    request_body(content = Object, content_type = "application/json", description = "OpenMeter's FeatureCreateInputs"),
    responses(
        (status = 201, description = "The feature as stored, with its id", body = Object),
        (status = 400, description = "A field is not valid; `field` names it", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 409, description = "A feature of that key exists", body = Problem),
        (status = 413, body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Feature>)> {
    caller.require(DEFINERS)?;
    let mut feature: Feature = parse_json(&body.map_err(body_error)?)?;
    feature.id.clear();
    feature.created_at = None;
    feature.updated_at = None;
    feature.archived_at = None;
    let (stored, _) = state
        .definitions
        .put_feature(&feature, "", &actor(&caller), true)
        .await
        .map_err(refused)?;
    Ok((StatusCode::CREATED, Json(stored)))
}

/// One feature, by key or id.
#[utoipa::path(
    get,
    path = "/api/v1/features/{featureId}",
    tag = "features",
    params(("featureId" = String, Path, description = "The feature's key or id")),
    responses(
        (status = 200, description = "The feature", body = Object),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such feature", body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Feature>> {
    caller.require(READERS)?;
    Ok(Json(live(&state, &id).await?))
}

/// Archives a feature (OpenMeter's delete): kept, marked `archivedAt`, binding nothing;
/// its key may be defined again.
#[utoipa::path(
    delete,
    path = "/api/v1/features/{featureId}",
    tag = "features",
    params(("featureId" = String, Path, description = "The feature's key or id")),
    responses(
        (status = 204, description = "Archived"),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "No such feature", body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn archive(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require(DEFINERS)?;
    let feature = live(&state, &id).await?;
    match state
        .definitions
        .archive_feature(&feature.key, &actor(&caller))
        .await?
    {
        Some(_) => Ok(StatusCode::NO_CONTENT),
        None => Err(no_feature(&id)),
    }
}

async fn live(state: &AppState, id: &str) -> ApiResult<Feature> {
    state
        .definitions
        .live_feature(id)
        .await?
        .ok_or_else(|| no_feature(id))
}

fn no_feature(id: &str) -> ApiError {
    ApiError::not_found(format!("no feature {id:?}")).field("featureId")
}

fn refused(e: FeatureRefused) -> ApiError {
    match e {
        FeatureRefused::Exists(_) => ApiError::conflict(e.to_string()).field("key"),
        FeatureRefused::Invalid(p) => ApiError::bad_request(p.field, p.message),
        FeatureRefused::Missing => ApiError::not_found(e.to_string()).field("featureId"),
        FeatureRefused::Definitions(e) => e.into(),
    }
}
