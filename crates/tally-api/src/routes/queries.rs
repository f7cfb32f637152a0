//! Reports over the lake: billing, overage, adoption and read-only SQL, in the format the
//! `Accept` header asks for, streamed.
//!
//! The format is negotiated from `Accept`: `application/json` (also for `*/*`,
//! `application/*` or no header), `text/csv` (also `text/*`) or
//! `application/vnd.apache.arrow.stream`; anything else is `406`. The body is the same the
//! CLI prints (`tally billing`, `tally overage`, `tally adoption`, `tally sql`).
//!
//! **Status and streaming.** The response's status is sent with its first chunk, so a
//! handler waits for the first chunk of the [`ReportBody`] before answering: a report that
//! fails before it (a bad period, a refused query, a query past its time limit before its
//! first rows) is answered with its problem and status. A failure after the first chunk
//! cannot change the status any more: the body ends early (the connection is closed
//! before the end of the chunked body, which HTTP clients report as an incomplete body),
//! and the failure is logged. A complete JSON body always ends with `]` or `}`, and an
//! Arrow stream with its end-of-stream marker, so a cut body is also seen as such.
//!
//! **Who reads what.** Billing and overage: the `billing` role; adoption and SQL: the
//! `analyst` role (admin passes everywhere). A key limited to customers (portal) reads
//! only the billing route, and only its own customer's invoice: the `customer` parameter
//! defaults to it, and naming another is `403`. Every other route here reads across
//! customers and refuses such keys.

use axum::body::Body;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use std::time::Instant;
use tally_core::metrics as names;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use tally_query::Period;
use tally_query::analytics::DateRange;
use tally_reports::{
    AdoptionReport, AdoptionRequest, Definitions, Format, InvoiceJson, InvoiceRequest,
    OverageReport, ReportBody, ReportError,
};

use super::{Caller, body_error, parse_json, query_error};
use crate::error::{ApiError, ApiResult, Problem};
use crate::{AppState, Role};

/// The media types a report is asked for in `Accept` and sent as.
pub mod media {
    pub const JSON: &str = "application/json";
    pub const CSV: &str = "text/csv";
    pub const ARROW: &str = "application/vnd.apache.arrow.stream";
}

/// The response's `Content-Type`.
fn content_type(format: Format) -> &'static str {
    match format {
        Format::Csv => "text/csv; charset=utf-8",
        Format::Arrow => media::ARROW,
        Format::Json | Format::Table => media::JSON,
    }
}

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(billing))
        .routes(routes!(overage))
        .routes(routes!(adoption))
        .routes(routes!(sql))
        .routes(routes!(usage))
}

/// Who may read invoices: a portal key its own customer's only.
const BILLING_READERS: &[Role] = &[Role::Billing, Role::Portal];

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BillingParams {
    /// The month to bill, `YYYY-MM`.
    #[param(example = "2026-11")]
    period: String,
    /// Only this customer's invoice. A portal key reads only its own customer's, the
    /// default for it.
    customer: Option<String>,
    /// `true`: bill each customer's own billing month that starts in the period, on its
    /// anchor day, instead of the calendar month.
    #[param(value_type = Option<bool>)]
    anniversary: Option<String>,
}

/// Every customer's invoice for a period, rated with the plans' prices.
///
/// JSON: an array of invoices, exactly as `tally billing --format json` prints it
/// (amounts as strings, exact). CSV: one row per invoice line (and per late, unbilled
/// usage), as `tally billing --format csv`. Arrow: the CSV's rows and columns, `events`
/// as int64 and the others as strings (amounts stay exact decimals). If the report fails
/// after its first bytes were sent, the body is cut short (see the module's notes).
#[utoipa::path(
    get,
    path = "/api/v1/billing",
    tag = "reports",
    params(BillingParams),
    responses(
        (status = 200, description = "The invoices, in the format `Accept` asks for", content(
            (Vec<InvoiceJson> = "application/json"),
            (String = "text/csv"),
            (Vec<u8> = "application/vnd.apache.arrow.stream"),
        )),
        (status = 400, description = "A parameter is not valid; `field` names it", body = Problem),
        (status = 401, body = Problem),
        (status = 403, description = "The key's role is not billing, or it is a portal key and another customer was asked", body = Problem),
        (status = 406, description = "`Accept` names none of the three formats", body = Problem),
        (status = 500, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn billing(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    params: Result<Query<BillingParams>, QueryRejection>,
) -> ApiResult<Response> {
    caller.require(BILLING_READERS)?;
    let format = negotiate(&headers)?;
    let Query(params) = params.map_err(query_error)?;
    let customer = match (caller.scope(), params.customer) {
        (_, Some(customer)) => {
            caller.require_for(BILLING_READERS, &customer)?;
            Some(customer)
        }
        (None, None) => None,
        (Some([only]), None) => Some(only.clone()),
        (Some(_), None) => {
            return Err(ApiError::bad_request(
                "customer",
                "this key is limited to several customers: name one with `customer`",
            ));
        }
    };
    let anniversary = match params.anniversary.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "anniversary",
                format!("anniversary must be true or false, not {other:?}"),
            ));
        }
    };
    let request = InvoiceRequest {
        period: parse_period(&params.period)?,
        customer,
        anniversary,
    };
    let started = Instant::now();
    let body = match definitions(&state).await {
        Ok(defs) => state.reports.billing(defs, request, format).await,
        Err(e) => Err(e),
    };
    observed("billing", started, respond(body, format).await)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct OverageParams {
    /// The month, `YYYY-MM`.
    #[param(example = "2026-11")]
    period: String,
}

/// The month's upgrade candidates: usage past the allowance, refusals by hard limits per
/// day, and the plan that would have covered them.
///
/// JSON: one object, as `tally overage --format json` prints it. CSV: one table per part,
/// each with a header whose first column is `section`, separated by a blank line. Arrow:
/// one table of every part's rows, `section` naming the part, then `period`, then the
/// parts' columns (in name order), null where a part has no such column. The schema is
/// declared, the same for any rows: counts int64, quantities float64, days date32,
/// instants timestamps (UTC), money as exact decimal strings.
#[utoipa::path(
    get,
    path = "/api/v1/overage",
    tag = "reports",
    params(OverageParams),
    responses(
        (status = 200, description = "The report, in the format `Accept` asks for", content(
            (OverageReport = "application/json"),
            (String = "text/csv"),
            (Vec<u8> = "application/vnd.apache.arrow.stream"),
        )),
        (status = 400, description = "A parameter is not valid; `field` names it", body = Problem),
        (status = 401, body = Problem),
        (status = 403, description = "The key's role is not billing, or it is limited to customers", body = Problem),
        (status = 406, description = "`Accept` names none of the three formats", body = Problem),
        (status = 500, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn overage(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    params: Result<Query<OverageParams>, QueryRejection>,
) -> ApiResult<Response> {
    caller.require(&[Role::Billing])?;
    every_customer(&caller)?;
    let format = negotiate(&headers)?;
    let Query(params) = params.map_err(query_error)?;
    let period = parse_period(&params.period)?;
    let started = Instant::now();
    let body = match definitions(&state).await {
        Ok(defs) => state.reports.overage(defs, period, format).await,
        Err(e) => Err(e),
    };
    observed("overage", started, respond(body, format).await)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AdoptionParams {
    /// First day of the range, `YYYY-MM-DD` (UTC).
    #[param(example = "2026-11-01")]
    from: String,
    /// Last day of the range, `YYYY-MM-DD` (UTC), included (as `tally adoption --to`).
    #[param(example = "2026-11-30")]
    to: String,
    /// Only this feature.
    feature: Option<String>,
    /// The plans whose customers are the free tier, separated by commas; default `free`.
    free_plans: Option<String>,
}

/// Adoption per feature over a range of days: entitled, active and activated customers,
/// first uses, free-tier customers without an advanced feature, use by region, distinct
/// users per day, week and month.
///
/// JSON: one object, as `tally adoption --format json` prints it. CSV: as
/// `tally adoption --format csv` (one table per part, first column `section`). Arrow: one
/// table of every part's rows, `section` naming the part, then `from` and `to`, then the
/// parts' columns (in name order), with a declared schema as the overage report's.
#[utoipa::path(
    get,
    path = "/api/v1/adoption",
    tag = "reports",
    params(AdoptionParams),
    responses(
        (status = 200, description = "The report, in the format `Accept` asks for", content(
            (AdoptionReport = "application/json"),
            (String = "text/csv"),
            (Vec<u8> = "application/vnd.apache.arrow.stream"),
        )),
        (status = 400, description = "A parameter is not valid; `field` names it", body = Problem),
        (status = 401, body = Problem),
        (status = 403, description = "The key's role is not analyst, or it is limited to customers", body = Problem),
        (status = 406, description = "`Accept` names none of the three formats", body = Problem),
        (status = 500, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn adoption(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    params: Result<Query<AdoptionParams>, QueryRejection>,
) -> ApiResult<Response> {
    caller.require(&[Role::Analyst])?;
    every_customer(&caller)?;
    let format = negotiate(&headers)?;
    let Query(params) = params.map_err(query_error)?;
    let (from, to) = (
        parse_day("from", &params.from)?,
        parse_day("to", &params.to)?,
    );
    let range = DateRange::new(from, to)
        .ok_or_else(|| ApiError::bad_request("to", format!("to {to} is before from {from}")))?;
    let mut request = AdoptionRequest::new(range);
    request.feature = params.feature;
    let free_plans: std::collections::BTreeSet<String> = params
        .free_plans
        .iter()
        .flat_map(|p| p.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    if !free_plans.is_empty() {
        request.free_plans = free_plans;
    }
    let started = Instant::now();
    let body = match definitions(&state).await {
        Ok(defs) => state.reports.adoption(defs, request, format).await,
        Err(e) => Err(e),
    };
    observed("adoption", started, respond(body, format).await)
}

/// A read-only SQL query.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SqlRequest {
    /// One query (`SELECT …` or `WITH … SELECT …`) over the tables `events`, `rollups`,
    /// `decisions`, `plans`, `prices`, `customers` and `customer_addons`.
    #[schema(example = "SELECT customer, SUM(quantity) AS quantity FROM events GROUP BY customer")]
    pub query: String,
}

/// Runs one read-only SQL query over the lake and streams its result.
///
/// The body is `{"query": "…"}` (`application/json`), or the query itself (`text/plain`
/// or `application/sql`). Only queries run: DDL, DML, `COPY`, `SET`, `EXPLAIN`, several
/// statements and table functions that read files are refused (`400`, field `query`),
/// as `tally sql` refuses them. The query runs under a memory limit (512 MiB unless the
/// server says otherwise; past it: `400` of type `memory_limit`, field `query`) and a
/// time limit (60 s, planning and the whole result; past it: `504`), on a runtime of its
/// own rather than the one serving requests.
///
/// The result streams batch by batch: JSON is one array of row objects (nulls as null),
/// CSV has one header row, Arrow is an IPC stream. A limit reached after the first rows
/// were sent cuts the body short (see the module's notes): a JSON body without its
/// closing `]` or an Arrow stream without its end-of-stream marker is incomplete.
#[utoipa::path(
    post,
    path = "/api/v1/sql",
    tag = "reports",
    request_body(
        description = "The query, as JSON or as the body's text",
        content(
            (SqlRequest = "application/json"),
            (String = "text/plain"),
            (String = "application/sql"),
        )
    ),
    responses(
        (status = 200, description = "The result, streamed in the format `Accept` asks for", content(
            (Object = "application/json"),
            (String = "text/csv"),
            (Vec<u8> = "application/vnd.apache.arrow.stream"),
        )),
        (status = 400, description = "The query is refused, does not parse or plan, or needs more memory than the limit (type `memory_limit`); `field` is `query`", body = Problem),
        (status = 401, body = Problem),
        (status = 403, description = "The key's role is not analyst, or it is limited to customers", body = Problem),
        (status = 406, description = "`Accept` names none of the three formats", body = Problem),
        (status = 413, body = Problem),
        (status = 415, description = "The body is not JSON, text/plain or application/sql", body = Problem),
        (status = 500, body = Problem),
        (status = 504, description = "The query ran past its time limit and was cancelled", body = Problem),
    ),
    security(("api_key" = []))
)]
async fn sql(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    caller.require(&[Role::Analyst])?;
    // A customer's key never reads the lake as a whole: SQL cannot be limited to it.
    every_customer(&caller)?;
    let format = negotiate(&headers)?;
    let body = body.map_err(body_error)?;
    let query = sql_text(&headers, &body)?;
    let started = Instant::now();
    let body = state
        .reports
        .sql(query, format, state.definitions.clone())
        .await;
    observed("sql", started, respond(body, format).await)
}

/// The query of a SQL request's body.
fn sql_text(headers: &HeaderMap, body: &[u8]) -> ApiResult<String> {
    let essence = headers
        .get(header::CONTENT_TYPE)
        .map(|v| {
            v.to_str()
                .unwrap_or_default()
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|| media::JSON.to_owned());
    match essence.as_str() {
        "application/json" => parse_json::<SqlRequest>(body).map(|r| r.query),
        "text/plain" | "application/sql" => String::from_utf8(body.to_vec())
            .map_err(|_| ApiError::bad_request("query", "the query is not valid UTF-8")),
        other => Err(ApiError::unsupported_media_type(format!(
            "content type {other:?} is not accepted; send application/json \
             ({{\"query\": \"…\"}}), text/plain or application/sql"
        ))),
    }
}

/// Refuses a key limited to customers on a route that reads across customers.
fn every_customer(caller: &Caller) -> ApiResult<()> {
    match caller.scope() {
        None => Ok(()),
        Some(customers) => Err(ApiError::forbidden(format!(
            "key {} is limited to {}: this route reads every customer's data",
            caller.0.id,
            customers.join(", ")
        ))),
    }
}

/// The format `Accept` asks for: the acceptable media range with the highest `q` (the
/// first of equals); JSON without the header.
pub(crate) fn negotiate(headers: &HeaderMap) -> ApiResult<Format> {
    let values: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{fffd}"))
        .filter(|v| !v.trim().is_empty())
        .collect();
    if values.is_empty() {
        return Ok(Format::Json);
    }
    let mut best: Option<(f32, Format)> = None;
    for range in values.iter().flat_map(|v| v.split(',')) {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        let format = match media.as_str() {
            media::JSON | "application/*" | "*/*" => Format::Json,
            media::CSV | "text/*" => Format::Csv,
            media::ARROW => Format::Arrow,
            _ => continue,
        };
        if q > 0.0 && best.is_none_or(|(b, _)| q > b) {
            best = Some((q, format));
        }
    }
    best.map(|(_, f)| f).ok_or_else(|| {
        ApiError::not_acceptable(format!(
            "Accept {:?} names no format this route sends: ask for {}, {} or {}",
            values.join(", "),
            media::JSON,
            media::CSV,
            media::ARROW
        ))
    })
}

/// The response of a report: its problem if it failed before its first chunk, else `200`
/// and the chunks as they come.
/// Records a report's latency (to its first rows, or its error) and its failures.
fn observed(
    report: &'static str,
    started: Instant,
    out: ApiResult<Response>,
) -> ApiResult<Response> {
    metrics::histogram!(names::QUERY_SECONDS, "report" => report)
        .record(started.elapsed().as_secs_f64());
    if out.is_err() {
        metrics::counter!(names::QUERY_FAILURES, "report" => report).increment(1);
    }
    out
}

async fn respond(body: Result<ReportBody, ReportError>, format: Format) -> ApiResult<Response> {
    let mut body = body.map_err(report_error)?;
    let first = match body.next().await {
        Some(Ok(chunk)) => Some(chunk),
        Some(Err(e)) => return Err(report_error(e)),
        None => None,
    };
    let chunks = futures::stream::iter(first.map(Ok))
        .chain(body)
        .inspect_err(|e| {
            // The status is sent: the client sees the body end early.
            tracing::warn!(error = %e, "report failed after its first bytes: the body is cut short");
        });
    let mut response = Response::new(Body::from_stream(chunks));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(format)),
    );
    headers.insert(header::VARY, HeaderValue::from_static("accept"));
    Ok(response)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageParams {
    /// First day, `YYYY-MM-DD` (UTC), included; default the first of the current month.
    #[param(example = "2026-11-01")]
    from: Option<String>,
    /// Last day, `YYYY-MM-DD` (UTC), included; default today.
    #[param(example = "2026-11-30")]
    to: Option<String>,
}

/// A customer's usage per day and feature (what the portal charts): rows `day, feature,
/// events, quantity` of the usage decided `accepted` or `overage`, from the lake (so
/// events still in flight to it are not counted yet). Billing keys read any customer's; a
/// portal key its own customer's only.
#[utoipa::path(
    get,
    path = "/api/v1/customers/{customer}/usage",
    tag = "portal",
    params(("customer" = String, Path, description = "The customer id"), UsageParams),
    responses(
        (status = 200, description = "The rows, in the format `Accept` asks for", content(
            (Object = "application/json"),
            (String = "text/csv"),
            (Vec<u8> = "application/vnd.apache.arrow.stream"),
        )),
        (status = 400, description = "A parameter is not valid; `field` names it", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 406, description = "`Accept` names none of the three formats", body = Problem),
        (status = 500, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn usage(
    State(state): State<AppState>,
    caller: Caller,
    axum::extract::Path(customer): axum::extract::Path<String>,
    headers: HeaderMap,
    params: Result<Query<UsageParams>, QueryRejection>,
) -> ApiResult<Response> {
    caller.require_for(BILLING_READERS, &customer)?;
    let format = negotiate(&headers)?;
    let Query(params) = params.map_err(query_error)?;
    let today = chrono::Utc::now().date_naive();
    let from = params
        .from
        .unwrap_or_else(|| today.format("%Y-%m-01").to_string());
    let to = params
        .to
        .unwrap_or_else(|| today.format("%Y-%m-%d").to_string());
    let (from, to) = (parse_day("from", &from)?, parse_day("to", &to)?);
    let body = state.reports.usage(&customer, from, to, format).await;
    respond(body, format).await
}

/// A report's failure as the API answers it.
pub(crate) fn report_error(e: ReportError) -> ApiError {
    match e {
        ReportError::BadRequest { field, message } => ApiError::bad_request(field, message),
        ReportError::Timeout(message) => ApiError::timeout(message),
        // The query itself is at fault (the limit is per query): the same request fails
        // again, so not a 5xx a client would retry.
        ReportError::TooMuchMemory(message) => {
            ApiError::invalid("memory_limit", message).field("query")
        }
        ReportError::Internal(cause) => ApiError::internal(cause),
    }
}

/// The definitions as they are now, read through the API's own connection.
async fn definitions(state: &AppState) -> Result<Definitions, ReportError> {
    Definitions::load(&state.definitions)
        .await
        .map_err(|e| ReportError::Internal(format!("reading the definitions: {e}")))
}

/// A month parameter, `YYYY-MM`.
fn parse_period(period: &str) -> ApiResult<Period> {
    period
        .parse()
        .map_err(|e| ApiError::bad_request("period", format!("{e}, such as 2026-11")))
}

/// A day parameter, `YYYY-MM-DD`.
fn parse_day(field: &str, day: &str) -> ApiResult<chrono::NaiveDate> {
    chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").map_err(|_| {
        ApiError::bad_request(
            field,
            format!("bad {field} {day:?}: expected a day, YYYY-MM-DD, such as 2026-11-01"),
        )
    })
}
