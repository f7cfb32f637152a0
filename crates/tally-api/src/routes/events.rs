//! `POST /api/v1/events`: what OpenMeter's ingest accepts, stored in JetStream.
//!
//! The body is one CloudEvent (`application/cloudevents+json`), an array of them
//! (`application/cloudevents-batch+json`), or either as `application/json`. Every event
//! is decoded with the workers' own decoder and limits before anything is published: a
//! batch with one bad event is refused whole, naming the event's index and field. The
//! events are then published to their customers' subjects — one message per customer
//! (split where a message would pass the workers' size or count limits), the message id
//! the event id or, for several, a hash of their ids — and the answer is `202` only once
//! JetStream acknowledged every message. A retry of the same request is dropped by
//! JetStream's duplicate window, and past it by the workers' event-id dedup: an event is
//! counted once however often it is sent.

use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use bytes::Bytes;
use serde::Serialize;
use tally_core::event::{DecodeLimits, Frame, Reason};
use tally_core::subject::events_subject;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{Caller, body_error};
use crate::error::{ApiError, ApiResult, Problem};
use crate::{AppState, Role};

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(ingest, list))
}

/// How many events were stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    pub accepted: usize,
}

/// The three content types OpenMeter's ingest takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    One,
    Batch,
    Either,
}

/// Ingest usage events.
///
/// The body is a CloudEvent or a batch of them; `202` means JetStream stored every one.
/// A bad event refuses the whole batch (`400`, naming `index` and `field`).
#[utoipa::path(
    post,
    path = "/api/v1/events",
    tag = "ingest",
    request_body(
        content = Object,
        description = "A JSON array of CloudEvents 1.0 usage events; one event alone is \
                       sent as application/cloudevents+json, and application/json takes either",
        content_type = "application/cloudevents-batch+json"
    ),
    responses(
        (status = 202, description = "Every event is stored", body = Accepted),
        (status = 400, description = "An event is malformed; `index` and `field` name it", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 413, description = "The body or the batch is over its limit", body = Problem),
        (status = 415, body = Problem),
        (status = 503, description = "NATS is unavailable; retry after `Retry-After` seconds", body = Problem),
    ),
    security(("api_key" = []))
)]
async fn ingest(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<impl IntoResponse> {
    caller.require(&[Role::Ingest, Role::Sdk])?;
    let shape = shape(&headers)?;
    let body = body.map_err(body_error)?;
    let messages = prepare(&state, &caller, shape, &body)?;
    let accepted = messages.iter().map(|m| m.events).sum();
    publish(&state, messages).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(Accepted { accepted })))
}

fn shape(headers: &HeaderMap) -> ApiResult<Shape> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(Shape::Either);
    };
    let essence = value
        .to_str()
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/cloudevents+json" => Ok(Shape::One),
        "application/cloudevents-batch+json" => Ok(Shape::Batch),
        "application/json" => Ok(Shape::Either),
        other => Err(ApiError::unsupported_media_type(format!(
            "content type {other:?} is not accepted; send application/cloudevents+json, \
             application/cloudevents-batch+json or application/json"
        ))),
    }
}

/// An event's id and its bytes in the body.
type Raw<'b> = (&'b str, &'b [u8]);

/// One message to publish: a customer's events.
struct Message {
    subject: String,
    id: String,
    payload: Bytes,
    events: usize,
}

/// Decodes and checks every event, then groups them into messages; nothing is published
/// unless every event is good.
fn prepare(
    state: &AppState,
    caller: &Caller,
    shape: Shape,
    body: &[u8],
) -> ApiResult<Vec<Message>> {
    let limits = &state.limits;
    // A request may be larger than one message (`api.max_body_bytes`, checked as the
    // body was read); its events are split into messages the workers take.
    let request_limits = DecodeLimits {
        max_message_bytes: state.config.max_body_bytes,
        ..*limits
    };
    let frame = Frame::decode(body, &request_limits).map_err(|invalid| {
        let e = match invalid.reason {
            Reason::TooLarge | Reason::TooManyEvents => ApiError::too_large(invalid.message),
            reason => ApiError::invalid(reason.as_str(), invalid.message),
        };
        match invalid.field {
            Some(field) => e.field(field),
            None => e,
        }
    })?;
    match (shape, frame.is_batch) {
        (Shape::One, true) => {
            return Err(ApiError::invalid(
                "not_an_object",
                "application/cloudevents+json carries one event; send an array as application/cloudevents-batch+json",
            ));
        }
        (Shape::Batch, false) => {
            return Err(ApiError::invalid(
                "not_an_object",
                "application/cloudevents-batch+json carries a JSON array of events",
            ));
        }
        _ => {}
    }
    let now = chrono::Utc::now().timestamp_micros();
    let raws = if frame.is_batch {
        Frame::raw_events(body)
    } else {
        vec![body]
    };
    // Customers in the order they first appear, each with its events in order.
    let mut groups: Vec<(String, Vec<Raw<'_>>)> = Vec::new();
    let mut index_of: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (index, (event, raw)) in frame.events.iter().zip(&raws).enumerate() {
        let event = match event {
            Ok(event) => event,
            Err(invalid) => {
                let e = ApiError::invalid(
                    invalid.reason.as_str(),
                    format!("event {index}: {}", invalid.message),
                )
                .index(index);
                return Err(match invalid.field.clone() {
                    Some(field) => e.field(field),
                    None => e,
                });
            }
        };
        if let Err(invalid) = limits.check_time(event.time, now) {
            return Err(ApiError::invalid(
                invalid.reason.as_str(),
                format!("event {index}: {}", invalid.message),
            )
            .index(index)
            .field("time"));
        }
        if !caller.0.covers(&event.subject) {
            return Err(ApiError::forbidden(format!(
                "event {index}: key {} may not send events for customer {:?}",
                caller.0.id, event.subject
            ))
            .index(index)
            .field("subject"));
        }
        let customer: &str = &event.subject;
        let at = *index_of.entry(customer).or_insert_with(|| {
            groups.push((customer.to_owned(), Vec::new()));
            groups.len() - 1
        });
        groups[at].1.push((&event.id, raw));
    }
    let mut messages = Vec::new();
    for (customer, events) in groups {
        let subject = events_subject(&customer);
        let mut chunk: Vec<Raw<'_>> = Vec::new();
        let mut bytes = 2;
        for (id, raw) in events {
            let full = chunk.len() >= limits.max_batch_events
                || bytes + raw.len() + 1 > limits.max_message_bytes;
            if full && !chunk.is_empty() {
                messages.push(message(&subject, &chunk));
                chunk.clear();
                bytes = 2;
            }
            bytes += raw.len() + 1;
            chunk.push((id, raw));
        }
        if !chunk.is_empty() {
            messages.push(message(&subject, &chunk));
        }
    }
    Ok(messages)
}

fn message(subject: &str, events: &[Raw<'_>]) -> Message {
    if let [(id, raw)] = events {
        return Message {
            subject: subject.to_owned(),
            id: (*id).to_owned(),
            payload: Bytes::copy_from_slice(raw),
            events: 1,
        };
    }
    let mut payload =
        Vec::with_capacity(events.iter().map(|(_, r)| r.len() + 1).sum::<usize>() + 1);
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    payload.push(b'[');
    for (i, (id, raw)) in events.iter().enumerate() {
        if i > 0 {
            payload.push(b',');
        }
        payload.extend_from_slice(raw);
        hasher.update(id.as_bytes());
        hasher.update(&[0]);
    }
    payload.push(b']');
    Message {
        subject: subject.to_owned(),
        id: format!("http-{:032x}", hasher.digest128()),
        payload: payload.into(),
        events: events.len(),
    }
}

/// Publishes every message with its acknowledgement in flight, then waits for them all.
async fn publish(state: &AppState, messages: Vec<Message>) -> ApiResult<()> {
    use async_nats::connection::State as Connection;
    if state.client.connection_state() != Connection::Connected {
        return Err(ApiError::unavailable(
            "NATS is unavailable; nothing was stored, send the same request again",
        ));
    }
    let timeout = std::time::Duration::from_millis(state.config.publish_timeout_ms);
    let sent = async {
        let mut acks = Vec::with_capacity(messages.len());
        for m in messages {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, m.id.as_str());
            let ack = state
                .js
                .publish_with_headers(m.subject, headers, m.payload)
                .await
                .map_err(|e| e.to_string())?;
            acks.push(ack.into_future());
        }
        for ack in futures::future::join_all(acks).await {
            ack.map_err(|e| e.to_string())?;
        }
        Ok::<(), String>(())
    };
    match tokio::time::timeout(timeout, sent).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "events not stored");
            Err(ApiError::unavailable(format!(
                "NATS did not store the events ({e}); send the same request again: nothing is counted twice"
            )))
        }
        Err(_) => Err(ApiError::unavailable(format!(
            "NATS did not acknowledge the events within {timeout:?}; send the same request again: nothing is counted twice"
        ))),
    }
}

/// One stored event, as OpenMeter's `IngestedEvent`, with Tally's decision.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngestedEvent {
    /// The CloudEvent: `data` holds the event's own properties and Tally's as it read
    /// them (`quantity` unless 1, `feature` unless the type, `region`, `user`).
    #[schema(value_type = Object)]
    pub event: serde_json::Value,
    pub customer_id: String,
    /// The decision it was stored with: `accepted`, `overage`, `limit_reached`, …
    pub decision: String,
    /// Why a meter of its type reads nothing of it (its value missing or not a number),
    /// naming the field; absent when every meter reads it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_error: Option<String>,
    pub ingested_at: String,
    /// The time the worker received it, as `ingestedAt`: Tally keeps no other (its batch
    /// was durable within `ingest.flush_age_ms` of it, before it was acknowledged).
    pub stored_at: String,
}

/// The latest stored events (the lake's), newest first: OpenMeter's filters `id` and
/// `subject` (parts of them), `customerId` (repeat), `from` / `to` (event time),
/// `ingestedAtFrom` / `ingestedAtTo`, `limit` (1 to 100, default 100).
#[utoipa::path(
    get,
    path = "/api/v1/events",
    tag = "events",
    params(
        ("id" = Option<String>, Query, description = "Events whose id contains this"),
        ("subject" = Option<String>, Query, description = "Events whose customer contains this"),
        ("customerId" = Option<Vec<String>>, Query, description = "Events of these customers (repeat)"),
        ("from" = Option<String>, Query, description = "RFC 3339; event time at or after"),
        ("to" = Option<String>, Query, description = "RFC 3339; event time at or before"),
        ("ingestedAtFrom" = Option<String>, Query), ("ingestedAtTo" = Option<String>, Query),
        ("limit" = Option<u32>, Query, description = "1 to 100 (default 100)"),
        ("clientId" = Option<String>, Query),
    ),
    responses(
        (status = 200, description = "The events, newest first", body = Vec<IngestedEvent>),
        (status = 400, description = "A parameter is not valid; `field` names it", body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 503, body = Problem),
    ),
    security(("api_key" = []))
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    uri: axum::http::Uri,
) -> ApiResult<axum::Json<Vec<IngestedEvent>>> {
    use super::meters::{Params, client_id, time};
    caller.require(super::meters::READERS)?;
    let params = Params::of(
        &uri,
        &[
            "id",
            "subject",
            "customerId",
            "from",
            "to",
            "ingestedAtFrom",
            "ingestedAtTo",
            "limit",
            "clientId",
        ],
    )?;
    client_id(params.one("clientId"))?;
    let mut customers = params.all("customerId");
    if let Some(scope) = caller.scope() {
        if let Some(other) = customers.iter().find(|c| !scope.contains(c)) {
            return Err(ApiError::forbidden(format!(
                "key {} may not read customer {other:?}",
                caller.0.id
            )));
        }
        if customers.is_empty() {
            customers = scope.to_vec();
        }
    }
    let filter = tally_query::meters::EventFilter {
        id: params.one("id").map(str::to_owned),
        subject: params.one("subject").map(str::to_owned),
        customers,
        from: time("from", params.one("from"))?,
        to: time("to", params.one("to"))?,
        ingested_from: time("ingestedAtFrom", params.one("ingestedAtFrom"))?,
        ingested_to: time("ingestedAtTo", params.one("ingestedAtTo"))?,
        limit: params.number("limit", 1, 100)?.unwrap_or(100) as usize,
    };
    let stamp =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    let meters: Vec<_> = state
        .definitions
        .load_catalog()
        .await?
        .meters
        .into_iter()
        .filter(|m| !m.is_deleted())
        .collect();
    let events = state
        .reports
        .list_events(filter)
        .await
        .map_err(super::queries::report_error)?
        .into_iter()
        .map(|e| {
            let data = serde_json::Value::Object(e.data.clone());
            let problems: Vec<String> = meters
                .iter()
                .filter(|m| m.event_type == e.event_type)
                .filter_map(|m| m.validation_error(&data))
                .collect();
            IngestedEvent {
                event: serde_json::json!({
                    "specversion": "1.0",
                    "id": e.id,
                    "source": e.source,
                    "type": e.event_type,
                    "subject": e.customer,
                    "time": stamp(e.time),
                    "data": e.data,
                }),
                customer_id: e.customer,
                decision: e.decision,
                validation_error: (!problems.is_empty()).then(|| problems.join("; ")),
                ingested_at: stamp(e.ingested_at),
                stored_at: stamp(e.ingested_at),
            }
        })
        .collect();
    Ok(axum::Json(events))
}
