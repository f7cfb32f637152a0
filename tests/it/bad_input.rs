//! Every kind of malformed input, sent through a real nats-server: each gets its own
//! reason in a dead letter, and the good events beside it still land in the lake.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::common::{Harness, parquet_files};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tally::pipeline;
use tally::workload::{self, OutMessage};
use tally_core::subject::events_subject;

fn message(customer: &str, id: &str, payload: impl Into<Vec<u8>>, events: u32) -> OutMessage {
    OutMessage {
        subject: events_subject(customer),
        msg_id: id.to_owned(),
        payload: bytes::Bytes::from(payload.into()),
        events,
        arrow: false,
    }
}

fn event(id: &str, customer: &str, quantity: &str) -> String {
    format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"t","type":"usage","subject":"{customer}","time":"2026-11-03T10:00:00Z","data":{{"feature":"api-calls","quantity":{quantity}}}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_malformed_kind_is_dead_lettered_with_its_reason() {
    let mut h = Harness::start().await;
    h.config.ingest.limits.max_batch_events = 100;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();

    // At run time: a build cache shared between checkouts must not point at another's files.
    let examples =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap()).join("schemas/examples");
    let mut messages = Vec::new();
    let mut expected = BTreeSet::new();
    let mut valid_events = 0u64;

    // The schema's invalid examples, one message each; the file name is the reason.
    for entry in std::fs::read_dir(examples.join("invalid")).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let (reason, field) = match stem.split_once("__") {
            Some((r, f)) => (r.to_owned(), Some(f.to_owned())),
            None => (stem.clone(), None),
        };
        let body = std::fs::read(&path).unwrap();
        // Publish on the subject's customer where there is one, so only the named flaw counts.
        let customer = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["subject"].as_str().map(str::to_owned))
            .filter(|s| !s.is_empty() && s.len() <= 256)
            .unwrap_or_else(|| "acme".to_owned());
        messages.push(message(&customer, &stem, body, 1));
        expected.insert((reason, field, None));
    }
    // The valid examples land.
    for entry in std::fs::read_dir(examples.join("valid")).unwrap() {
        let path = entry.unwrap().path();
        let body = std::fs::read(&path).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let first = if v.is_array() { &v[0] } else { &v };
        let n = v.as_array().map_or(1, Vec::len);
        valid_events += n as u64;
        let customer = first["subject"].as_str().unwrap().to_owned();
        let id = path.file_stem().unwrap().to_str().unwrap().to_owned();
        messages.push(message(&customer, &id, body, n as u32));
    }
    // Message-level flaws.
    let big: Vec<String> = (0..8_000)
        .map(|i| event(&format!("big-{i}"), "acme", "1"))
        .collect();
    let big = format!("[{}]", big.join(","));
    assert!(big.len() > 1024 * 1024 && big.len() < 8 * 1024 * 1024);
    messages.push(message("acme", "too-large", big, 8_000));
    expected.insert(("too_large".to_owned(), None, None));
    let many: Vec<String> = (0..101)
        .map(|i| event(&format!("many-{i}"), "acme", "1"))
        .collect();
    messages.push(message(
        "acme",
        "too-many",
        format!("[{}]", many.join(",")),
        101,
    ));
    expected.insert(("too_many_events".to_owned(), None, None));
    messages.push(message("acme", "empty-batch", "[]", 0));
    expected.insert(("empty_batch".to_owned(), None, None));
    messages.push(message(
        "acme",
        "mismatch",
        event("mismatch-1", "globex", "1"),
        1,
    ));
    expected.insert((
        "subject_mismatch".to_owned(),
        Some("subject".to_owned()),
        None,
    ));
    // An event dated further ahead than `limits.max_future_secs` (300 s) of its arrival.
    let ahead = (chrono::Utc::now() + chrono::Duration::hours(2)).to_rfc3339();
    messages.push(message(
        "acme",
        "future",
        event("future-1", "acme", "1").replace("2026-11-03T10:00:00Z", &ahead),
        1,
    ));
    expected.insert(("future_time".to_owned(), Some("time".to_owned()), None));
    // One bad event inside a batch: its neighbours still count.
    let bad_in_batch = event("mixed-bad", "acme", "-5");
    let mixed = format!(
        "[{},{},{}]",
        event("mixed-1", "acme", "2"),
        bad_in_batch,
        event("mixed-2", "acme", "3")
    );
    messages.push(message("acme", "mixed", mixed, 3));
    expected.insert((
        "negative_quantity".to_owned(),
        Some("data.quantity".to_owned()),
        Some(1),
    ));
    valid_events += 2;
    // The compact encoding: a bad row is refused alone; a body that is not Arrow, whole.
    let json = format!(
        "[{},{},{}]",
        event("arrow-1", "acme", "1"),
        event("arrow-bad", "acme", "1"),
        event("arrow-2", "acme", "4")
    );
    let frame = tally_core::Frame::decode(json.as_bytes(), &Default::default()).unwrap();
    let mut rows: Vec<_> = frame.events.into_iter().map(Result::unwrap).collect();
    rows[1].quantity = f64::INFINITY;
    let mut arrow = message(
        "acme",
        "arrow",
        tally_core::columnar::encode(&rows).unwrap(),
        3,
    );
    arrow.arrow = true;
    messages.push(arrow);
    expected.insert((
        "non_finite_quantity".to_owned(),
        Some("data.quantity".to_owned()),
        Some(1),
    ));
    valid_events += 2;
    let mut not_arrow = message("acme", "not-arrow", event("na", "acme", "1"), 1);
    not_arrow.arrow = true;
    messages.push(not_arrow);
    expected.insert(("not_arrow".to_owned(), None, None));

    workload::publish(&h.nats.jetstream, &messages, 64, |_| {})
        .await
        .unwrap();
    h.drain(&pipeline, valid_events).await;
    pipeline.shutdown().await.unwrap();

    let dead = h.dead_letters().await;
    let got: BTreeSet<_> = dead
        .iter()
        .map(|d| (d.reason.clone(), d.field.clone(), d.index))
        .collect();
    assert_eq!(got, expected);
    assert_eq!(dead.len(), expected.len(), "one dead letter per flaw");
    let in_batch = dead.iter().find(|d| d.index == Some(1)).unwrap();
    assert_eq!(
        in_batch.body,
        bad_in_batch.as_bytes(),
        "the dead letter keeps the original event"
    );
    assert!(
        in_batch.error.contains("data.quantity"),
        "{}",
        in_batch.error
    );

    let mut ids = Vec::new();
    for path in parquet_files(&h.lake_events()) {
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for b in reader {
            let b = b.unwrap();
            use arrow::array::AsArray;
            ids.extend(
                b.column(0)
                    .as_string::<i32>()
                    .iter()
                    .map(|s| s.unwrap().to_owned()),
            );
        }
    }
    assert_eq!(ids.len() as u64, valid_events);
    for id in ["mixed-1", "mixed-2", "arrow-1", "arrow-2"] {
        assert!(ids.contains(&id.to_owned()), "{id} missing from the lake");
    }
    assert!(
        !ids.iter()
            .any(|i| i.starts_with("big-") || i.starts_with("many-"))
    );
}
