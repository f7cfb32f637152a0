//! Reserve-and-record: an app that must know the decision before doing the work sends
//! its event as a NATS request and gets back the decision the event was recorded with.
//!
//! The request goes to `tally.record.<partition>` (the customer's partition; queue group
//! `tally-record`) with one CloudEvents JSON event as its body. The worker that owns the
//! partition publishes it to the events stream like any event (message id: the event id),
//! waits until its own partition loop has decided it, and replies with that decision: the
//! one stored in the lake. An event id seen before is answered as a duplicate, counted
//! nothing. Malformed events, and events whose value a meter bound to a feature cannot
//! read, are answered with the reason and field, and nothing is published.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::{Client, HeaderMap};
use serde::{Deserialize, Serialize};
use tally_core::subject::{events_subject, partition_of, request_subject};
use tally_core::{Decision, DecodeLimits, Frame};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::entitlements::Entitlements;
use crate::{Error, Result};

/// Events to record are requested on `tally.record.<partition>`.
pub use tally_core::subject::RECORD_PREFIX;
const QUEUE: &str = "tally-record";
/// How long a request waits for its event to be decided.
const DECIDE_TIMEOUT: Duration = Duration::from_secs(10);

/// The answer to a record request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordReply {
    pub id: String,
    /// The decision recorded with the event; `None` with `duplicate` or `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// Whether the app may do the work (accepted or overage).
    pub has_access: bool,
    /// The event id was recorded before: nothing was counted now.
    #[serde(default)]
    pub duplicate: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Requests waiting for their event's decision, by event id.
#[derive(Default)]
pub struct Waiters {
    waiting: Mutex<HashMap<String, Vec<oneshot::Sender<Option<Decision>>>>>,
    /// How many are waiting: the worker looks at the map only when this is not zero.
    count: AtomicUsize,
}

impl std::fmt::Debug for Waiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiters")
            .field("count", &self.count.load(Ordering::Relaxed))
            .finish()
    }
}

impl Waiters {
    fn wait(&self, id: &str) -> oneshot::Receiver<Option<Decision>> {
        let (tx, rx) = oneshot::channel();
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        waiting.entry(id.to_owned()).or_default().push(tx);
        self.count.fetch_add(1, Ordering::AcqRel);
        rx
    }

    fn forget(&self, id: &str) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(senders) = waiting.remove(id) {
            self.count.fetch_sub(senders.len(), Ordering::AcqRel);
        }
    }

    /// Called by the worker for every first-seen (`Some`) or repeated (`None`) event id.
    pub fn decided(&self, id: &str, decision: Option<Decision>) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let senders = {
            let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            waiting.remove(id)
        };
        for tx in senders.into_iter().flatten() {
            self.count.fetch_sub(1, Ordering::AcqRel);
            let _ = tx.send(decision);
        }
    }
}

/// Subscribes to the record requests of the owned partitions (the server has the
/// subscriptions when this returns) and answers them until `cancel`.
pub async fn serve(
    js: Context,
    entitlements: Arc<Entitlements>,
    partitions: Vec<u16>,
    counts: &tally_core::partitions::Partitions,
    limits: DecodeLimits,
    cancel: CancellationToken,
) -> Result<tokio::task::JoinSet<()>> {
    let total = counts.current();
    let subscriptions =
        crate::checks::subscribe(&js.client(), RECORD_PREFIX, QUEUE, &partitions).await?;
    let requests = crate::checks::Requests {
        client: js.client(),
        prefix: RECORD_PREFIX,
        partitions: counts.clone(),
    };
    Ok(crate::checks::answer_each(
        subscriptions,
        &tokio::runtime::Handle::current(),
        requests,
        cancel,
        move |p, token, reply_to, payload| {
            // Each request waits for its own decision: answer them side by side.
            let (js, entitlements) = (js.clone(), entitlements.clone());
            tokio::spawn(async move {
                let reply =
                    record_one(&js, &entitlements, p, total, &token, &limits, &payload).await;
                let body = serde_json::to_vec(&reply).unwrap_or_default();
                if let Err(e) = js.client().publish(reply_to, body.into()).await {
                    tracing::warn!(partition = p, error = %e, "cannot answer a record request");
                }
            });
            std::future::ready(())
        },
    ))
}

async fn record_one(
    js: &Context,
    entitlements: &Entitlements,
    partition: u16,
    total: u16,
    token: &str,
    limits: &DecodeLimits,
    payload: &bytes::Bytes,
) -> RecordReply {
    let refuse = |id: String, error: String, field: Option<&str>| RecordReply {
        id,
        decision: None,
        has_access: false,
        duplicate: false,
        error: Some(error),
        field: field.map(str::to_owned),
    };
    let event = match Frame::decode(payload, limits) {
        Err(invalid) => return refuse(String::new(), invalid.message, invalid.field.as_deref()),
        Ok(frame) if frame.is_batch => {
            return refuse(
                String::new(),
                "send one event, not a batch".to_owned(),
                None,
            );
        }
        Ok(frame) => match frame.events.into_iter().next() {
            Some(Ok(event)) => event,
            Some(Err(invalid)) => {
                return refuse(String::new(), invalid.message, invalid.field.as_deref());
            }
            None => return refuse(String::new(), "no event".to_owned(), None),
        },
    };
    let id = event.id.to_string();
    if let Err(invalid) = limits.check_time(event.time, chrono::Utc::now().timestamp_micros()) {
        return refuse(id, invalid.message, invalid.field.as_deref());
    }
    if let Err(e) = crate::checks::sent_for(token, &event.subject) {
        return refuse(id, e.error, Some("subject"));
    }
    let owner = partition_of(&event.subject, total);
    if owner != partition {
        return refuse(
            id,
            format!(
                "customer {:?} belongs to partition {owner}; send to {}",
                event.subject,
                request_subject(RECORD_PREFIX, &event.subject, total)
            ),
            Some("subject"),
        );
    }
    // A value a bound meter cannot read: refused here, naming the field, where the worker
    // would dead-letter the event.
    let bindings = entitlements
        .engine(partition)
        .and_then(|engine| engine.bindings(&event.event_type));
    if let Some(bindings) = bindings {
        let time = event
            .time
            .unwrap_or_else(chrono::Utc::now)
            .timestamp_micros();
        if let Err(invalid) = tally_quota::readings(&bindings, &event, time) {
            return refuse(id, invalid.message, invalid.field.as_deref());
        }
    }
    let waiters = &entitlements.waiters;
    let decided = waiters.wait(&id);
    let mut headers = HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
    let stored = match js
        .publish_with_headers(events_subject(&event.subject), headers, payload.clone())
        .await
    {
        Ok(ack) => ack.await,
        Err(e) => Err(e),
    };
    match stored {
        Err(e) => {
            waiters.forget(&id);
            return refuse(id, format!("the event was not stored: {e}"), None);
        }
        // JetStream dropped it as a repeat of a message id in its window.
        Ok(ack) if ack.duplicate => {
            waiters.forget(&id);
            return RecordReply {
                id,
                decision: None,
                has_access: false,
                duplicate: true,
                error: None,
                field: None,
            };
        }
        Ok(_) => {}
    }
    match tokio::time::timeout(DECIDE_TIMEOUT, decided).await {
        Ok(Ok(decision)) => RecordReply {
            decision: decision.map(|d| d.as_str().to_owned()),
            has_access: decision.is_some_and(Decision::is_billable),
            duplicate: decision.is_none(),
            id,
            error: None,
            field: None,
        },
        _ => {
            waiters.forget(&id);
            refuse(
                id,
                format!("stored, but not decided within {DECIDE_TIMEOUT:?}"),
                None,
            )
        }
    }
}

/// Records one event and returns its decision; `Err` when no worker answers in time.
pub async fn record(
    client: &Client,
    partitions: u16,
    customer: &str,
    event_json: Vec<u8>,
    timeout: Duration,
) -> Result<RecordReply> {
    let subject = request_subject(RECORD_PREFIX, customer, partitions);
    let reply =
        crate::checks::ask_owner(client, subject, event_json.into(), timeout, "record").await?;
    serde_json::from_slice(&reply.payload)
        .map_err(|e| Error::Check(format!("unreadable record reply: {e}")))
}
