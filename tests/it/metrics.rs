//! `GET /metrics` after real traffic: the decision counters, dead letters, partitions
//! owned and consumer lag, as Prometheus scrapes them. One test in this binary: the
//! recorder is global to the process, so its counters are this test's alone.

use crate::common;
use std::collections::BTreeMap;

use crate::common::Harness;
use chrono::{DateTime, NaiveDate};
use reqwest::Method;
use tally::pipeline;
use tally::workload::{self, Spec};
use tally_core::decision::Decision;
use tally_core::metrics as names;

/// Every sample of `name` in a Prometheus text exposition: its labels and value.
pub(crate) fn samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(rest) => {
                let (labels, value) = rest.split_once('}').unwrap();
                (labels, value)
            }
            None if rest.starts_with(' ') => ("", rest),
            None => continue,
        };
        let labels = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.to_owned(), v.trim_matches('"').to_owned())
            })
            .collect();
        out.push((labels, value.trim().parse().unwrap()));
    }
    out
}

fn value(text: &str, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    samples(text, name)
        .into_iter()
        .find(|(labels, _)| label.is_none_or(|(k, v)| labels.get(k).map(String::as_str) == Some(v)))
        .map(|(_, v)| v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_decisions_dead_letters_and_partitions_owned() {
    let h = Harness::start().await;
    h.entitle_everyone(50).await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    let api = h.api().await;
    let mut spec = Spec::new(5_000, NaiveDate::from_ymd_opt(2026, 8, 1).unwrap());
    spec.customers = 50;
    spec.batch = 50;
    spec.invalid_rate = 0.02;
    spec.until = DateTime::from_timestamp(4_000_000_000, 0).unwrap();
    let (messages, totals) = workload::generate(&spec);
    assert!(totals.events_invalid > 0);
    workload::publish(&h.nats.jetstream, &messages, 512, |_| {})
        .await
        .unwrap();
    h.drain(&pipeline, totals.events_valid).await;

    let scrape = || async {
        let response = api
            .request(Method::GET, "/metrics", None)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "no key needed");
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        response.text().await.unwrap()
    };
    let partitions = f64::from(h.config.ingest.partitions);
    // The lag gauges are sampled every few seconds: a sample taken while the events were
    // being published still shows them pending, and the next one, after the drain, must
    // show every partition's lag gone.
    common::until(
        "consumer lag sampled as nothing pending for every partition",
        || async {
            let text = scrape().await;
            let lags = samples(&text, names::CONSUMER_PENDING);
            lags.len() == usize::from(h.config.ingest.partitions)
                && lags.iter().all(|(_, pending)| *pending == 0.0)
                && value(&text, names::PARTITIONS_OWNED, None) == Some(partitions)
        },
    )
    .await;
    let text = scrape().await;

    // Everyone is entitled without limit: every valid event is accepted.
    assert_eq!(
        value(&text, names::EVENTS, Some(("decision", "accepted"))),
        Some(totals.events_valid as f64),
        "{text}"
    );
    for (i, d) in Decision::ALL.into_iter().enumerate() {
        let counted = value(&text, names::EVENTS, Some(("decision", d.as_str()))).unwrap_or(0.0);
        assert_eq!(
            counted,
            tally_ingest::Stats::get(&pipeline.stats.decided[i]) as f64,
            "{}",
            d.as_str()
        );
    }
    let dead: f64 = samples(&text, names::DEAD_LETTERS)
        .iter()
        .map(|(_, v)| v)
        .sum();
    assert_eq!(
        dead,
        tally_ingest::Stats::get(&pipeline.stats.dead_letters) as f64
    );
    assert!(dead > 0.0);
    for (labels, _) in samples(&text, names::DEAD_LETTERS) {
        assert!(labels.contains_key("reason"));
    }
    assert_eq!(
        value(&text, names::PARTITIONS_OWNED, None),
        Some(partitions)
    );
    // Drained: nothing pending anywhere.
    for (labels, pending) in samples(&text, names::CONSUMER_PENDING) {
        assert_eq!(pending, 0.0, "partition {labels:?}");
    }
    assert_eq!(
        value(&text, names::ROWS_DURABLE, None),
        Some(totals.events_valid as f64)
    );
    assert_eq!(value(&text, names::NATS_CONNECTED, None), Some(1.0));
    // Histograms are real Prometheus histograms.
    assert!(value(&text, &format!("{}_count", names::FLUSH_SECONDS), None).unwrap() >= 1.0);
    assert!(value(&text, &format!("{}_bucket", names::FLUSH_ROWS), None).is_some());
    assert!(
        value(
            &text,
            &format!("{}_count", names::STORED_TO_DURABLE_SECONDS),
            None
        )
        .unwrap()
            >= 1.0
    );
    // The scrapes themselves were counted, by route template and status.
    let scraped = samples(&text, names::HTTP_REQUESTS)
        .into_iter()
        .find(|(l, _)| {
            l.get("route").map(String::as_str) == Some("/metrics")
                && l.get("status").map(String::as_str) == Some("200")
        });
    assert!(scraped.is_some_and(|(_, n)| n >= 1.0), "{text}");

    pipeline.shutdown().await.unwrap();
    api.stop.cancel();
}
