//! A realistic usage workload: customers of very different sizes, popular and niche
//! features, regions, end users, event times spread over a month (or a day) in time order; optionally
//! some malformed events and some published twice. Used by `tally demo`, `tally bench`
//! and the end-to-end tests, which compare what the lake and the billing query say with
//! the totals kept here.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use futures::stream::{FuturesUnordered, StreamExt};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tally_core::subject::events_subject;

/// Feature names a SaaS catalogue might meter.
const FEATURES: [&str; 24] = [
    "api-calls",
    "storage-gb",
    "exports",
    "ai-tokens",
    "reports",
    "webhooks",
    "sso-logins",
    "emails-sent",
    "sms-sent",
    "builds",
    "build-minutes",
    "deployments",
    "seats",
    "projects",
    "dashboards",
    "alerts",
    "backups",
    "image-renders",
    "video-minutes",
    "search-queries",
    "audit-exports",
    "integrations",
    "workflows",
    "custom-domains",
];
const REGIONS: [&str; 6] = [
    "us-east",
    "eu-west",
    "ap-south",
    "us-west",
    "eu-central",
    "sa-east",
];

/// What to generate.
#[derive(Debug, Clone)]
pub struct Spec {
    pub events: u64,
    pub customers: u32,
    pub features: u32,
    pub regions: u32,
    /// Events begin at this date's midnight (UTC): a month's first day for a month of usage.
    pub start: NaiveDate,
    /// How long after `start` the events spread (ending earlier at `until`).
    pub span: Span,
    /// Events per message (1: one event per message).
    pub batch: usize,
    /// Share of events that are malformed.
    pub invalid_rate: f64,
    /// Share of valid events that are published a second time with the same id.
    pub duplicate_rate: f64,
    /// Share of messages sent as single events even when `batch` > 1.
    pub single_rate: f64,
    pub seed: u64,
    /// Send messages in the compact Arrow IPC encoding instead of JSON (where every event
    /// of the message is valid).
    pub arrow: bool,
    /// Events stop at this time if it comes before the end of the span.
    pub until: DateTime<Utc>,
    /// Each JSON event's `data` also holds properties of its own, as OpenMeter users'
    /// do: `tokens` (1 to 2,000) and `model` (one of four), for meters to read.
    pub properties: bool,
}

impl Spec {
    /// A month of usage starting at `start`.
    pub fn new(events: u64, start: NaiveDate) -> Spec {
        Spec {
            events,
            customers: 1_000,
            features: 20,
            regions: 3,
            start,
            span: Span::Month,
            batch: 100,
            invalid_rate: 0.0,
            duplicate_rate: 0.0,
            single_rate: 0.0,
            seed: 42,
            arrow: false,
            until: Utc::now(),
            properties: false,
        }
    }
}

/// How far the event times spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// One calendar month: a month of usage replayed, many date partitions.
    Month,
    /// One day: live traffic, one date partition.
    Day,
}

/// One NATS message to publish.
#[derive(Debug, Clone)]
pub struct OutMessage {
    pub subject: String,
    pub msg_id: String,
    pub payload: Bytes,
    pub events: u32,
    /// Whether the payload is Arrow IPC (sent with its `Content-Type` header).
    pub arrow: bool,
}

/// What was generated, counted the way billing should count it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// Distinct events generated (valid and malformed).
    pub events_generated: u64,
    /// Distinct valid events: what the lake must hold.
    pub events_valid: u64,
    pub events_invalid: u64,
    /// Extra copies of valid events published with the same id.
    pub duplicates_published: u64,
    /// Sum of the valid events' quantities.
    pub quantity: f64,
    /// Valid events and quantity per customer × feature.
    #[serde(skip)]
    pub by_line: BTreeMap<(String, String), (u64, f64)>,
    /// Malformed events per expected reason code.
    pub invalid_by_reason: BTreeMap<String, u64>,
}

/// The kinds of malformed event the generator makes, with the reason the worker must give.
/// `true`: still valid JSON, so it may travel inside a batch.
const INVALID_KINDS: [(&str, bool); 10] = [
    ("not_json", false),
    ("missing_field", true), // no id
    ("empty_field", true),   // empty id
    ("empty_field", true),   // empty data.feature
    ("negative_quantity", true),
    ("non_finite_quantity", true),
    ("wrong_type", true), // quantity as a word
    ("bad_time", true),
    ("unsupported_specversion", true),
    ("missing_field", true), // no subject
];

#[derive(Serialize)]
struct Data<'a> {
    feature: &'a str,
    quantity: f64,
    region: &'a str,
    user: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
}

/// The models of [`Spec::properties`].
pub const MODELS: [&str; 4] = ["gpt-4o", "gpt-4o-mini", "claude", "llama"];

#[derive(Serialize)]
struct Event<'a> {
    specversion: &'a str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    subject: &'a str,
    time: &'a str,
    data: Data<'a>,
}

fn malformed(kind: usize, id: &str, customer: &str, time: &str) -> String {
    let good = |id: &str, subject: &str, time: &str, data: &str, spec: &str| {
        let id = if id == "-" {
            String::new()
        } else {
            format!(r#""id":"{id}","#)
        };
        let subject = if subject == "-" {
            String::new()
        } else {
            format!(r#""subject":"{subject}","#)
        };
        format!(
            r#"{{"specversion":"{spec}",{id}"source":"demo-app","type":"usage",{subject}"time":"{time}","data":{data}}}"#
        )
    };
    let data = r#"{"feature":"api-calls","quantity":1}"#;
    match kind {
        0 => format!(
            r#"{{"specversion":"1.0","id":"{id}","subject":"{customer}","data":{{"feature""#
        ),
        1 => good("-", customer, time, data, "1.0"),
        2 => good("", customer, time, data, "1.0"),
        3 => good(id, customer, time, r#"{"feature":"","quantity":1}"#, "1.0"),
        4 => good(
            id,
            customer,
            time,
            r#"{"feature":"api-calls","quantity":-2}"#,
            "1.0",
        ),
        5 => good(
            id,
            customer,
            time,
            r#"{"feature":"api-calls","quantity":"NaN"}"#,
            "1.0",
        ),
        6 => good(
            id,
            customer,
            time,
            r#"{"feature":"api-calls","quantity":"three"}"#,
            "1.0",
        ),
        7 => good(id, customer, "last tuesday", data, "1.0"),
        8 => good(id, customer, time, data, "0.3"),
        _ => good(id, "-", time, data, "1.0"),
    }
}

/// Generates the workload's messages and the totals the pipeline must reproduce.
/// Draws `0..n` with weight `1 / (k + 1)^s`: a few large ones, a long tail.
pub struct PowerLaw(Vec<f64>);

impl PowerLaw {
    pub fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        Self(
            (0..n.max(1))
                .map(|k| {
                    acc += 1.0 / ((k + 1) as f64).powf(s);
                    acc
                })
                .collect(),
        )
    }

    pub fn pick(&self, rng: &mut SmallRng) -> usize {
        let total = self.0[self.0.len() - 1];
        let x = rng.random::<f64>() * total;
        self.0.partition_point(|w| *w < x).min(self.0.len() - 1)
    }
}

/// The id of the generator's `i`-th customer.
pub fn customer_id(i: u32) -> String {
    format!("cust-{i:05}")
}

/// The features a workload of `n` features uses.
pub fn features(n: u32) -> &'static [&'static str] {
    &FEATURES[..(n as usize).clamp(1, FEATURES.len())]
}

/// The regions a workload of `n` regions uses.
pub fn regions(n: u32) -> &'static [&'static str] {
    &REGIONS[..(n as usize).clamp(1, REGIONS.len())]
}

pub fn generate(spec: &Spec) -> (Vec<OutMessage>, Totals) {
    generate_with_progress(spec, |_| {})
}

/// [`generate`], telling `progress` how many events are made so far every few thousand.
pub fn generate_with_progress(
    spec: &Spec,
    mut progress: impl FnMut(u64),
) -> (Vec<OutMessage>, Totals) {
    let mut rng = SmallRng::seed_from_u64(spec.seed);
    let customers: Vec<String> = (0..spec.customers.max(1)).map(customer_id).collect();
    // Customer sizes follow a power law: a few large customers, a long tail.
    let customer_weights = PowerLaw::new(customers.len(), 0.9);
    let nfeatures = (spec.features as usize).clamp(1, FEATURES.len());
    let feature_weights = PowerLaw::new(nfeatures, 1.1);
    let nregions = (spec.regions as usize).clamp(1, REGIONS.len());
    let pick = |rng: &mut SmallRng, weights: &PowerLaw| weights.pick(rng);

    let start = spec
        .start
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc();
    let span_end = match spec.span {
        Span::Month => spec
            .start
            .checked_add_months(chrono::Months::new(1))
            .unwrap_or(spec.start)
            .and_hms_opt(0, 0, 0)
            .unwrap_or_default()
            .and_utc(),
        Span::Day => start + Duration::days(1),
    };
    let end = span_end.min(spec.until.max(start + Duration::minutes(1)));
    let span_us = (end - start).num_microseconds().unwrap_or(1).max(1);

    let mut totals = Totals::default();
    let mut out = Vec::new();
    // Per customer, the events waiting to fill a batch: (id, JSON).
    let mut open: Vec<Vec<(String, String)>> = vec![Vec::new(); customers.len()];
    let mut valid_seen: Vec<(usize, String, String)> = Vec::new();
    let batch = spec.batch.max(1);
    let n = spec.events;

    let emit = |out: &mut Vec<OutMessage>, c: usize, mut events: Vec<(String, String)>| {
        let count = events.len() as u32;
        let (msg_id, payload) = if count == 1 {
            // A single event's message id is its event id, as an SDK would send it.
            let (id, json) = events.pop().unwrap_or_default();
            (id, json)
        } else {
            let jsons: Vec<String> = events.into_iter().map(|(_, j)| j).collect();
            (
                format!("batch-{}", uuid::Uuid::now_v7()),
                format!("[{}]", jsons.join(",")),
            )
        };
        let msg_id = if msg_id.is_empty() {
            format!("raw-{}", uuid::Uuid::now_v7())
        } else {
            msg_id
        };
        let arrow = spec.arrow.then(|| to_arrow(&payload)).flatten();
        out.push(OutMessage {
            subject: events_subject(&customers[c]),
            msg_id,
            arrow: arrow.is_some(),
            payload: Bytes::from(arrow.unwrap_or_else(|| payload.into_bytes())),
            events: count,
        });
    };

    for i in 0..n {
        if i % 4096 == 0 {
            progress(i);
        }
        let c = pick(&mut rng, &customer_weights);
        let customer = &customers[c];
        let t = start
            + Duration::microseconds(((i as i128 * span_us as i128) / n.max(1) as i128) as i64);
        let time = t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
        let id = uuid::Uuid::now_v7().to_string();
        totals.events_generated += 1;
        let invalid = rng.random::<f64>() < spec.invalid_rate;
        let json = if invalid {
            let kind = rng.random_range(0..INVALID_KINDS.len());
            let (reason, batchable) = INVALID_KINDS[kind];
            totals.events_invalid += 1;
            *totals
                .invalid_by_reason
                .entry(reason.to_owned())
                .or_default() += 1;
            let json = malformed(kind, &id, customer, &time);
            if !batchable {
                emit(&mut out, c, vec![(id, json)]);
                continue;
            }
            json
        } else {
            let feature = FEATURES[pick(&mut rng, &feature_weights)];
            // Whole units, except storage in half gigabytes: sums stay exact in f64.
            let quantity = if feature == "storage-gb" {
                f64::from(rng.random_range(1..=40u32)) * 0.5
            } else {
                f64::from(rng.random_range(1..=10u32))
            };
            let region = if rng.random::<f64>() < 0.9 {
                REGIONS[c % nregions]
            } else {
                REGIONS[rng.random_range(0..nregions)]
            };
            let user = format!("user-{}", rng.random_range(0..(3 + c % 50)));
            let (tokens, model) = if spec.properties {
                (
                    Some(rng.random_range(1..=2000u32)),
                    Some(MODELS[rng.random_range(0..MODELS.len())]),
                )
            } else {
                (None, None)
            };
            let json = serde_json::to_string(&Event {
                specversion: "1.0",
                id: &id,
                source: "demo-app",
                event_type: "usage",
                subject: customer,
                time: &time,
                data: Data {
                    feature,
                    quantity,
                    region,
                    user: &user,
                    tokens,
                    model,
                },
            })
            .unwrap_or_default();
            totals.events_valid += 1;
            totals.quantity += quantity;
            let line = totals
                .by_line
                .entry((customer.clone(), feature.to_owned()))
                .or_default();
            line.0 += 1;
            line.1 += quantity;
            if spec.duplicate_rate > 0.0 {
                valid_seen.push((c, id.clone(), json.clone()));
            }
            json
        };
        if batch == 1 || rng.random::<f64>() < spec.single_rate {
            emit(&mut out, c, vec![(id, json)]);
        } else {
            open[c].push((id, json));
            if open[c].len() >= batch {
                emit(&mut out, c, std::mem::take(&mut open[c]));
            }
        }
        if !valid_seen.is_empty() && rng.random::<f64>() < spec.duplicate_rate {
            let (dc, dup_id, dup) = valid_seen[rng.random_range(0..valid_seen.len())].clone();
            totals.duplicates_published += 1;
            if batch == 1 || rng.random::<bool>() {
                emit(&mut out, dc, vec![(dup_id, dup)]);
            } else {
                open[dc].push((dup_id, dup));
            }
        }
    }
    for (c, events) in open.into_iter().enumerate() {
        if !events.is_empty() {
            emit(&mut out, c, events);
        }
    }
    progress(n);
    (out, totals)
}

/// The same events as Arrow IPC, when every one of them is valid.
fn to_arrow(json: &str) -> Option<Vec<u8>> {
    let frame =
        tally_core::Frame::decode(json.as_bytes(), &tally_core::DecodeLimits::default()).ok()?;
    let events = frame
        .events
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    tally_core::columnar::encode(&events).ok()
}

/// What the publisher saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Published {
    pub messages: u64,
    pub events: u64,
    /// Messages JetStream reported as duplicates of an earlier message id.
    pub duplicate_messages: u64,
}

/// The most publish acknowledgements kept outstanding. async-nats holds a permit (5,000
/// by default) for each until its future completes, and those futures are only polled
/// here: waiting for a permit with more than that outstanding would wait forever.
pub const MAX_ACKS_IN_FLIGHT: usize = 4_096;
/// The most payload bytes awaiting acknowledgement: large batches otherwise queue enough
/// work in the server that acknowledgements outlast the client's timeout.
pub const MAX_BYTES_IN_FLIGHT: usize = 8 * 1024 * 1024;

/// Publishes messages with up to `in_flight` (at most [`MAX_ACKS_IN_FLIGHT`])
/// acknowledgements outstanding; every message counts only once JetStream acknowledged
/// it. `progress` is told the events acknowledged.
pub async fn publish(
    js: &async_nats::jetstream::Context,
    messages: &[OutMessage],
    in_flight: usize,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<Published> {
    let in_flight = in_flight.clamp(1, MAX_ACKS_IN_FLIGHT);
    let mut pending = FuturesUnordered::new();
    let mut bytes = 0usize;
    let mut report = Published::default();
    let mut settle =
        |ack: async_nats::jetstream::publish::PublishAck, events: u32, report: &mut Published| {
            report.messages += 1;
            report.events += u64::from(events);
            if ack.duplicate {
                report.duplicate_messages += 1;
            }
            progress(u64::from(events));
        };
    for m in messages {
        let mut publish = async_nats::jetstream::message::PublishMessage::build()
            .payload(m.payload.clone())
            .message_id(&m.msg_id);
        if m.arrow {
            publish = publish.header(
                tally_core::columnar::CONTENT_TYPE_HEADER,
                tally_core::columnar::ARROW_CONTENT_TYPE,
            );
        }
        let ack = js.send_publish(m.subject.clone(), publish).await?;
        let (events, size) = (m.events, m.payload.len());
        bytes += size;
        pending.push(async move { (ack.await, events, size) });
        while pending.len() >= in_flight || bytes >= MAX_BYTES_IN_FLIGHT {
            if let Some((ack, events, size)) = pending.next().await {
                bytes -= size;
                settle(ack?, events, &mut report);
            }
        }
    }
    while let Some((ack, events, _)) = pending.next().await {
        settle(ack?, events, &mut report);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::{DecodeLimits, Frame};

    #[test]
    fn totals_agree_with_what_the_decoder_sees() {
        let mut spec = Spec::new(5_000, NaiveDate::from_ymd_opt(2026, 10, 1).unwrap());
        spec.customers = 50;
        spec.batch = 10;
        spec.invalid_rate = 0.02;
        spec.duplicate_rate = 0.01;
        spec.single_rate = 0.2;
        let (messages, totals) = generate(&spec);
        let mut valid = std::collections::HashSet::new();
        let mut quantity = 0.0;
        let mut invalid = 0;
        for m in &messages {
            match Frame::decode(&m.payload, &DecodeLimits::default()) {
                Err(_) => invalid += 1,
                Ok(frame) => {
                    for e in frame.events {
                        match e {
                            Ok(e) => {
                                assert!(m.subject.ends_with(e.subject.as_ref()));
                                if valid.insert(e.id.to_string()) {
                                    quantity += e.quantity;
                                }
                            }
                            Err(_) => invalid += 1,
                        }
                    }
                }
            }
        }
        assert_eq!(valid.len() as u64, totals.events_valid);
        assert_eq!(invalid, totals.events_invalid);
        assert_eq!(quantity, totals.quantity);
        assert!(totals.duplicates_published > 0 && totals.events_invalid > 0);
        assert_eq!(
            totals.events_generated,
            totals.events_valid + totals.events_invalid
        );
        let by_line: u64 = totals.by_line.values().map(|v| v.0).sum();
        assert_eq!(by_line, totals.events_valid);
    }
}
