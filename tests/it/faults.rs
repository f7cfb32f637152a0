//! Faults a running worker must ride out without an operator: nats-server restarting
//! under it, and a lake that refuses writes for a while. Nothing acknowledged to a
//! publisher is lost or stored twice.

use crate::common;
use std::time::{Duration, Instant};

use crate::common::Harness;
use chrono::NaiveDate;
use tally::pipeline;
use tally::workload::{self, OutMessage, Spec, Totals};

fn phase(seed: u64) -> (Vec<OutMessage>, Totals) {
    let mut spec = Spec::new(3_000, NaiveDate::from_ymd_opt(2026, 10, 1).unwrap());
    spec.customers = 50;
    spec.batch = 20;
    spec.seed = seed;
    spec.duplicate_rate = 0.01;
    workload::generate(&spec)
}

/// Publishes until JetStream acknowledged every message (a retry after a failure sends
/// the same message ids, which JetStream's duplicate window drops).
async fn publish(h: &Harness, messages: &[OutMessage]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = workload::publish(&h.nats.jetstream, messages, 256, |_| {}).await {
        assert!(Instant::now() < deadline, "publishing never succeeded: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn until_lake_holds(h: &Harness, rows: u64) {
    common::until(
        &format!("the lake holds {rows} rows, all acknowledged"),
        || async { common::read_lake(h).1 >= rows && common::consumer_backlog(h).await == (0, 0) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_rides_out_a_nats_restart_and_an_unwritable_lake() {
    let mut h = Harness::start().await;
    h.entitle_everyone(50).await;
    let mut config = h.config.clone();
    config.ingest.flush_age_ms = 50;
    let pipeline = pipeline::start(&config, &h.nats, None).await.unwrap();
    let (a, ta) = phase(1);
    let (b, tb) = phase(2);
    let (c, tc) = phase(3);

    publish(&h, &a).await;
    until_lake_holds(&h, ta.events_valid).await;

    // nats-server goes down and comes back on the same port and store.
    h.server.restart().unwrap();
    publish(&h, &b).await;
    until_lake_holds(&h, ta.events_valid + tb.events_valid).await;

    // The lake refuses writes: a file stands where the events directory should be.
    let events = h.lake_events();
    let away = events.with_extension("away");
    std::fs::rename(&events, &away).unwrap();
    std::fs::write(&events, b"not a directory").unwrap();
    publish(&h, &c).await;
    let failures = &pipeline.writer_stats.write_failures;
    common::until("writes refused", || async {
        failures.load(std::sync::atomic::Ordering::Relaxed) >= 3
    })
    .await;
    assert!(!pipeline.is_finished(), "the worker keeps running");
    let (_, unacked) = common::consumer_backlog(&h).await;
    assert!(
        unacked > 0,
        "nothing is acknowledged while the lake refuses writes"
    );
    std::fs::remove_file(&events).unwrap();
    put_back(&away, &events);

    let total = ta.events_valid + tb.events_valid + tc.events_valid;
    until_lake_holds(&h, total).await;
    pipeline.shutdown().await.unwrap();
    let (ids, rows, quantity) = common::read_lake(&h);
    assert_eq!(rows, total, "every event once");
    assert_eq!(ids.len() as u64, total);
    assert_eq!(quantity, ta.quantity + tb.quantity + tc.quantity);
}

/// Moves the table at `away` back to `table`. A write retried since the blocking file went
/// may have made `table` a directory again, holding what it could not commit without the
/// table's log: that directory is moved aside, out of the lake, until the rename finds
/// `table` absent or empty.
fn put_back(away: &std::path::Path, table: &std::path::Path) {
    for stray in 0..100 {
        if std::fs::rename(away, table).is_ok() {
            return;
        }
        std::fs::rename(table, table.with_extension(format!("stray{stray}"))).unwrap();
    }
    panic!("cannot put {} back", table.display());
}

/// Deliveries that never reach the worker (the connection dropped them, or the server cut
/// the worker off as a slow consumer) must not be acknowledged by the ack of a later
/// batch. Here a second pull on the partition's consumer takes some deliveries and never
/// acknowledges them: to the worker they are lost on the way. It notices the gap in the
/// consumer's delivery numbers and pulls again from its ack floor; every event lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_lost_on_the_way_are_pulled_again_not_acknowledged_unread() {
    use async_nats::jetstream::consumer::PullConsumer;
    use futures::StreamExt;

    let mut h = Harness::start().await;
    h.config.ingest.partitions = 1;
    h.entitle_everyone(50).await;
    let mut config = h.config.clone();
    config.ingest.flush_age_ms = 50;
    // Small pulls, so that the other pull's turn comes between two of the worker's.
    config.ingest.fetch_messages = 10;
    let pipeline = pipeline::start(&config, &h.nats, None).await.unwrap();
    let stream = h.nats.jetstream.get_stream("TALLY_EVENTS").await.unwrap();
    let consumer: PullConsumer = stream
        .get_consumer(&tally_core::subject::partition_consumer(0))
        .await
        .unwrap();
    common::until("the worker's pull waits at the server", || {
        let mut consumer = consumer.clone();
        async move { consumer.info().await.is_ok_and(|i| i.num_waiting >= 1) }
    })
    .await;
    let mut taken = consumer
        .fetch()
        .max_messages(5)
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .unwrap();
    let (messages, totals) = phase(4);
    publish(&h, &messages).await;
    let mut lost = 0;
    while lost < 5 {
        match tokio::time::timeout(Duration::from_secs(10), taken.next()).await {
            Ok(Some(Ok(_))) => lost += 1,
            _ => break,
        }
    }
    assert!(
        lost > 0,
        "the other pull took no delivery: the test proves nothing"
    );

    until_lake_holds(&h, totals.events_valid).await;
    let gaps = pipeline
        .stats
        .delivery_gaps
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(gaps >= 1, "the worker noticed the lost deliveries");
    pipeline.shutdown().await.unwrap();
    let (ids, rows, quantity) = common::read_lake(&h);
    assert_eq!(rows, totals.events_valid, "every event once");
    assert_eq!(ids.len() as u64, totals.events_valid);
    assert_eq!(quantity, totals.quantity);
}

/// A dead letter or a notice published again when its message is handled again (after a
/// crash, a take-over) is dropped for a day, not only within the events stream's two
/// minutes: one made by an older Tally with two minutes is raised, the events stream's
/// own window stays as configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_and_notices_are_deduplicated_for_a_day() {
    use async_nats::jetstream::stream;
    use tally_core::subject::{DEAD_LETTER_STREAM, EVENTS_STREAM, NOTIFY_STREAM};
    let h = Harness::start().await;
    let js = &h.nats.jetstream;
    js.create_stream(stream::Config {
        name: DEAD_LETTER_STREAM.to_owned(),
        subjects: vec![format!("{}.>", tally_core::subject::DEAD_LETTER_PREFIX)],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap();
    tally_ingest::topology::ensure_streams(js, &h.config.ingest)
        .await
        .unwrap();
    let window = |name: &'static str| async move {
        let mut s = js.get_stream(name).await.unwrap();
        s.info().await.unwrap().config.duplicate_window
    };
    let day = tally_ingest::topology::OUTPUT_DUPLICATE_WINDOW;
    assert_eq!(day, Duration::from_secs(86_400));
    assert_eq!(window(DEAD_LETTER_STREAM).await, day);
    assert_eq!(window(NOTIFY_STREAM).await, day);
    assert_eq!(
        window(EVENTS_STREAM).await,
        Duration::from_secs(h.config.ingest.duplicate_window_secs)
    );
    // The same dead letter twice: stored once.
    for _ in 0..2 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", "dl-7-0");
        js.publish_with_headers(
            format!("{}.not_json", tally_core::subject::DEAD_LETTER_PREFIX),
            headers,
            "x".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let mut s = js.get_stream(DEAD_LETTER_STREAM).await.unwrap();
    assert_eq!(s.info().await.unwrap().state.messages, 1);
}
