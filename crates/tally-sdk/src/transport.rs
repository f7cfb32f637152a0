//! The two ways to Tally: NATS (JetStream publishes and request-reply checks) and the HTTP
//! API. Each sends what it is given once; retrying is the flusher's job.

use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tally_core::event::DecodeLimits;
use tally_core::subject::{events_subject, partition_of, request_subject};

use crate::check::{CheckAnswer, EntitlementValue, NatsReply, NatsRequest, unknown_customer};
use crate::error::{Error, Result, with_causes};
use crate::event::Stamped;

/// Checks are requested on `tally.check.<partition>.<customer-token>`.
pub use tally_core::subject::CHECK_PREFIX;

/// A client holds one, behind an `Arc`: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Transport {
    Nats(Nats),
    Http(Http),
}

/// Tally over NATS.
pub(crate) struct Nats {
    pub(crate) client: async_nats::Client,
    pub(crate) js: async_nats::jetstream::Context,
    pub(crate) partitions: u16,
}

/// One message to publish: events of one customer.
pub(crate) struct Message {
    subject: String,
    id: String,
    payload: Bytes,
    pub(crate) events: Vec<Stamped>,
}

/// The most bytes and events a message or a request carries: the workers' own limits.
fn limits(max_payload: usize) -> (usize, usize) {
    let l = DecodeLimits::default();
    (l.max_message_bytes.min(max_payload), l.max_batch_events)
}

/// Splits events into chunks of at most `max_events` and about `max_bytes` of JSON,
/// keeping their order.
fn chunks(events: Vec<Stamped>, max_bytes: usize, max_events: usize) -> Vec<Vec<Stamped>> {
    let mut out = Vec::new();
    let mut chunk: Vec<Stamped> = Vec::new();
    let mut bytes = 2;
    for e in events {
        let full = chunk.len() >= max_events || bytes + e.json.len() + 1 > max_bytes;
        if full && !chunk.is_empty() {
            out.push(std::mem::take(&mut chunk));
            bytes = 2;
        }
        bytes += e.json.len() + 1;
        chunk.push(e);
    }
    if !chunk.is_empty() {
        out.push(chunk);
    }
    out
}

/// A JSON array of the events' encodings.
fn array(events: &[Stamped]) -> Bytes {
    let mut body = Vec::with_capacity(events.iter().map(|e| e.json.len() + 1).sum::<usize>() + 1);
    body.push(b'[');
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&e.json);
    }
    body.push(b']');
    body.into()
}

/// The message id of several events: a hash of their ids in order, so the same batch sent
/// again has the same id and JetStream drops the repeat.
pub fn batch_message_id<'a>(ids: impl IntoIterator<Item = &'a str>) -> String {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for id in ids {
        hasher.update(id.as_bytes());
        hasher.update(&[0]);
    }
    format!("sdk-{:032x}", hasher.digest128())
}

impl Nats {
    /// Groups events by customer (in the order customers first appear), one message per
    /// customer unless it would pass the workers' limits.
    pub(crate) fn messages(&self, events: Vec<Stamped>) -> Vec<Message> {
        let (max_bytes, max_events) = limits(self.client.server_info().max_payload.max(1024));
        let mut groups: Vec<(String, Vec<Stamped>)> = Vec::new();
        for e in events {
            match groups.iter_mut().find(|(c, _)| *c == e.event.customer) {
                Some((_, group)) => group.push(e),
                None => groups.push((e.event.customer.clone(), vec![e])),
            }
        }
        let mut messages = Vec::new();
        for (customer, group) in groups {
            let subject = events_subject(&customer);
            for chunk in chunks(group, max_bytes, max_events) {
                let (id, payload) = match chunk.as_slice() {
                    [one] => (one.id.clone(), one.json.clone()),
                    many => (
                        batch_message_id(many.iter().map(|e| e.id.as_str())),
                        array(many),
                    ),
                };
                messages.push(Message {
                    subject: subject.clone(),
                    id,
                    payload,
                    events: chunk,
                });
            }
        }
        messages
    }

    /// Publishes every message with its acknowledgement in flight, then waits for each:
    /// one outcome per message.
    pub(crate) async fn publish(
        &self,
        messages: &[Message],
        timeout: Duration,
    ) -> Vec<Result<(), String>> {
        let mut acks = Vec::with_capacity(messages.len());
        for m in messages {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, m.id.as_str());
            let sent = tokio::time::timeout(
                timeout,
                self.js
                    .publish_with_headers(m.subject.clone(), headers, m.payload.clone()),
            )
            .await;
            acks.push(match sent {
                Ok(Ok(ack)) => Ok(ack),
                Ok(Err(e)) => Err(format!("publish to {}: {e}", m.subject)),
                Err(_) => Err(format!("publish to {}: timed out", m.subject)),
            });
        }
        let mut outcomes = Vec::with_capacity(acks.len());
        for ack in acks {
            outcomes.push(match ack {
                Ok(ack) => match tokio::time::timeout(timeout, ack).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("not acknowledged: {e}")),
                    Err(_) => Err(format!("not acknowledged within {timeout:?}")),
                },
                Err(e) => Err(e),
            });
        }
        outcomes
    }

    pub(crate) async fn check(
        &self,
        customer: &str,
        feature: &str,
        quantity: f64,
        timeout: Duration,
    ) -> Result<CheckAnswer> {
        let partition = partition_of(customer, self.partitions);
        let subject = request_subject(CHECK_PREFIX, customer, self.partitions);
        let body = serde_json::to_vec(&NatsRequest {
            customer,
            feature,
            quantity,
        })
        .map_err(|e| Error::Protocol(e.to_string()))?;
        let reply = tokio::time::timeout(timeout, self.client.request(subject, body.into()))
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "no answer to the check within {timeout:?} (partition {partition})"
                ))
            })?
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::NoResponders => Error::Unavailable(format!(
                    "no worker answers checks for partition {partition}"
                )),
                _ => Error::Unavailable(format!("check request: {e}")),
            })?;
        serde_json::from_slice::<NatsReply>(&reply.payload)
            .map_err(|e| Error::Protocol(format!("check reply: {e}")))?
            .into_answer()
    }
}

/// Tally's HTTP API.
pub(crate) struct Http {
    pub(crate) client: reqwest::Client,
    pub(crate) base: reqwest::Url,
    pub(crate) key: String,
}

/// What became of one `POST /api/v1/events`.
pub(crate) enum Posted {
    /// `2xx`: every event stored.
    Accepted,
    /// `400` naming the event at fault: nothing was stored.
    BadEvent { index: usize, reason: String },
    /// Another `4xx`: nothing was stored, and sending again would not help.
    Refused(String),
    /// A `5xx`, `408`, `429` or no answer: nothing or everything may be stored; send the
    /// same events again.
    Transient(String),
}

/// RFC 9457 problem details, as the API answers errors.
#[derive(Debug, Deserialize)]
struct Problem {
    #[serde(default)]
    detail: Option<String>,
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    index: Option<usize>,
}

fn problem(status: reqwest::StatusCode, body: &str) -> (String, Option<String>, Option<usize>) {
    match serde_json::from_str::<Problem>(body) {
        Ok(p) => (
            format!("{status}: {}", p.detail.unwrap_or_default()),
            p.field,
            p.index,
        ),
        Err(_) => (
            format!("{status}: {}", body.chars().take(200).collect::<String>()),
            None,
            None,
        ),
    }
}

/// Appends path segments (percent-encoded) to a base URL.
pub(crate) fn endpoint(base: &reqwest::Url, segments: &[&str]) -> Result<reqwest::Url> {
    let mut url = base.clone();
    url.path_segments_mut()
        .map_err(|()| Error::Options(format!("{base} cannot be a base URL")))?
        .pop_if_empty()
        .extend(segments);
    Ok(url)
}

impl Http {
    /// Splits events into requests the API takes (its workers' message limits).
    pub(crate) fn requests(events: Vec<Stamped>) -> Vec<Vec<Stamped>> {
        let (max_bytes, max_events) = limits(usize::MAX);
        chunks(events, max_bytes, max_events)
    }

    pub(crate) async fn post(&self, events: &[Stamped], timeout: Duration) -> Result<Posted> {
        let url = endpoint(&self.base, &["api", "v1", "events"])?;
        let sent = self
            .client
            .post(url)
            .bearer_auth(&self.key)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/cloudevents-batch+json",
            )
            .timeout(timeout)
            .body(array(events))
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                let cause = with_causes(&e);
                return Ok(Posted::Transient(format!("POST /api/v1/events: {cause}")));
            }
        };
        let status = response.status();
        if status.is_success() {
            return Ok(Posted::Accepted);
        }
        let body = response.text().await.unwrap_or_default();
        let (reason, _, index) = problem(status, &body);
        let code = status.as_u16();
        Ok(if status.is_server_error() || code == 408 || code == 429 {
            Posted::Transient(reason)
        } else if let (400, Some(index)) = (code, index) {
            Posted::BadEvent { index, reason }
        } else {
            Posted::Refused(reason)
        })
    }

    pub(crate) async fn check(
        &self,
        customer: &str,
        feature: &str,
        quantity: f64,
        timeout: Duration,
    ) -> Result<CheckAnswer> {
        let mut url = endpoint(
            &self.base,
            &["api", "v1", "customers", customer, "entitlements", feature],
        )?;
        url.query_pairs_mut()
            .append_pair("quantity", &quantity.to_string());
        let response = self
            .client
            .get(url)
            .bearer_auth(&self.key)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| Error::Unavailable(format!("entitlement check: {}", with_causes(&e))))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|e| Error::Unavailable(format!("entitlement check: {}", with_causes(&e))))?;
        if status.is_success() {
            return serde_json::from_str::<EntitlementValue>(&body)
                .map(CheckAnswer::from)
                .map_err(|e| Error::Protocol(format!("entitlement value: {e}")));
        }
        let (message, field, _) = problem(status, &body);
        match status.as_u16() {
            404 if field.as_deref() == Some("customer") => Ok(unknown_customer()),
            400 => Err(Error::Check { message, field }),
            code if status.is_server_error() || code == 408 || code == 429 => {
                Err(Error::Unavailable(message))
            }
            code => Err(Error::Refused {
                status: code,
                message,
            }),
        }
    }
}
