//! Enforcement through a real nats-server: each decision recorded in the lake, upgrade
//! prompts on the notification stream, and live entitlement changes.

use crate::common;
use std::collections::BTreeMap;

use crate::common::Harness;
use tally::pipeline;
use tally_core::entitlement::{
    Catalog, Customer, Customers, Enforcement, Entitlement, Metered, Plan, Status,
};
use tally_core::subject::{self, EVENTS_STREAM, NOTIFY_STREAM};
use tally_ingest::definitions::Definitions;
use tally_query::Lakehouse;

fn metered(limit: f64, enforcement: Enforcement) -> Entitlement {
    let mut m = Metered::new(Some(limit));
    m.enforcement = enforcement;
    m.next_plan = Some("big".to_owned());
    Entitlement::Metered(m)
}

fn plan(id: &str, calls: f64, seats: Option<u32>) -> Plan {
    Plan {
        id: id.to_owned(),
        name: id.to_owned(),
        features: [
            ("calls", metered(calls, Enforcement::Hard)),
            ("storage", metered(5.0, Enforcement::Soft)),
            ("export", Entitlement::Boolean { enabled: true }),
            ("sso", Entitlement::Boolean { enabled: false }),
        ]
        .into_iter()
        .map(|(f, e)| (f.to_owned(), e))
        .collect(),
        seats,
        prices: None,
    }
}

async fn setup(h: &Harness, customers: Vec<Customer>) -> Definitions {
    let defs = Definitions::open(&h.nats.jetstream, 1).await.unwrap();
    let catalog = Catalog {
        plans: vec![plan("small", 10.0, Some(2)), plan("big", 1000.0, None)],
        ..Catalog::default()
    };
    defs.apply_catalog(&catalog, "test").await.unwrap();
    defs.apply_customers(&Customers { customers }, "test")
        .await
        .unwrap();
    defs
}

/// Publishes one event and waits for JetStream's acknowledgement.
async fn publish(h: &Harness, id: &str, customer: &str, feature: &str, quantity: f64, extra: &str) {
    let body = format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"test","type":"usage","subject":"{customer}",{extra}"data":{{"feature":"{feature}","quantity":{quantity}}}}}"#
    );
    h.nats
        .jetstream
        .publish(subject::events_subject(customer), body.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Each event's decision, from the lake.
async fn decisions(h: &Harness) -> BTreeMap<String, String> {
    by_event(h, "decision").await
}

/// A column of every event in the lake, by event id (null as "").
async fn by_event(h: &Harness, column: &str) -> BTreeMap<String, String> {
    let lake = Lakehouse::open(&h.config.lake()).await.unwrap();
    let batches = lake
        .context()
        .sql(&format!(
            "SELECT event_id, coalesce({column}, '') FROM events"
        ))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for b in &batches {
        let cast = |i: usize| {
            arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Utf8).unwrap()
        };
        let (ids, ds) = (cast(0), cast(1));
        let (ids, ds) = (
            ids.as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .unwrap(),
            ds.as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .unwrap(),
        );
        for i in 0..b.num_rows() {
            out.insert(ids.value(i).to_owned(), ds.value(i).to_owned());
        }
    }
    out
}

/// A check of `acme`'s `feature` for `quantity`, on 2026-11-10 at noon.
fn ask(feature: &str, quantity: f64) -> tally_ingest::checks::CheckRequest {
    tally_ingest::checks::CheckRequest {
        customer: "acme".to_owned(),
        feature: feature.to_owned(),
        quantity,
        time: Some("2026-11-10T12:00:00Z".parse().unwrap()),
        region: None,
        user: None,
    }
}

/// Every notification: (subject, body).
async fn notifications(h: &Harness) -> Vec<(String, serde_json::Value)> {
    let stream = h.nats.jetstream.get_stream(NOTIFY_STREAM).await.unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await.unwrap();
        out.push((
            m.subject.to_string(),
            serde_json::from_slice(&m.payload).unwrap(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_is_recorded_with_its_event_and_prompts_are_sent_once() {
    let h = Harness::start().await;
    let mut acme = Customer::new("acme", "small");
    acme.regions = vec!["eu".to_owned()];
    let mut old = Customer::new("old", "small");
    old.valid_until = Some("2026-01-01T00:00:00Z".parse().unwrap());
    let mut paused = Customer::new("paused", "small");
    paused.status = Status::Suspended;
    setup(&h, vec![acme, old, paused]).await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();

    let at = |t: &str, region: &str, user: &str| {
        format!(r#""time":"{t}","data":{{"region":"{region}","user":"{user}","#)
    };
    let nov = |user| at("2026-11-10T10:00:00Z", "eu", user);
    // (id, customer, feature, quantity, time/region/user, the decision it must get)
    let cases: Vec<(&str, &str, &str, f64, String, &str)> = vec![
        ("e01", "acme", "calls", 6.0, nov("u1"), "accepted"),
        ("e02", "acme", "calls", 6.0, nov("u1"), "limit_reached"),
        ("e03", "acme", "storage", 7.0, nov("u1"), "overage"),
        ("e04", "acme", "sso", 1.0, nov("u1"), "not_entitled"),
        (
            "e05",
            "acme",
            "export",
            1.0,
            at("2026-11-10T10:00:00Z", "us", "u1"),
            "region_blocked",
        ),
        ("e06", "old", "export", 1.0, nov("u1"), "expired"),
        ("e07", "paused", "export", 1.0, nov("u1"), "expired"),
        (
            "e08",
            "nobody",
            "export",
            1.0,
            nov("u1"),
            "unknown_customer",
        ),
        ("e09", "acme", "export", 1.0, nov("u2"), "accepted"),
        ("e10", "acme", "export", 1.0, nov("u3"), "seat_limit"),
        (
            "e11",
            "acme",
            "calls",
            1.0,
            at("2026-10-31T23:00:00Z", "eu", "u1"),
            "late",
        ),
        ("e12", "acme", "calls", 4.0, nov("u2"), "accepted"),
    ];
    for (id, customer, feature, q, extra, _) in &cases {
        // `extra` opens the data object; the helper closes it with feature and quantity.
        let (time, data) = extra.split_once(r#""data":{"#).unwrap();
        let body = format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"test","type":"usage","subject":"{customer}",{time}"data":{{{data}"feature":"{feature}","quantity":{q}}}}}"#
        );
        h.nats
            .jetstream
            .publish(subject::events_subject(customer), body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    h.drain(&pipeline, cases.len() as u64).await;
    let got = decisions(&h).await;
    for (id, _, _, _, _, want) in &cases {
        assert_eq!(got.get(*id).map(String::as_str), Some(*want), "{id}");
    }

    // Prompts: storage crossed 80 % and 100 % (7 of 5) in one event; calls was refused
    // (first refusal of the period) and later reached 100 % exactly (6 + 4 of 10).
    let mut sent: Vec<(String, String, Option<u64>)> = notifications(&h)
        .await
        .into_iter()
        .map(|(subject, body)| {
            assert_eq!(body["customer"], "acme");
            assert_eq!(body["period_start"], "2026-11-01T00:00:00+00:00");
            assert_eq!(body["next_plan"], "big");
            (
                subject,
                body["feature"].as_str().unwrap().to_owned(),
                body["threshold"].as_u64(),
            )
        })
        .collect();
    sent.sort();
    assert_eq!(
        sent,
        [
            (
                "tally.notify.limit_reached.acme".to_owned(),
                "calls".to_owned(),
                None
            ),
            (
                "tally.notify.threshold.acme".to_owned(),
                "calls".to_owned(),
                Some(80)
            ),
            (
                "tally.notify.threshold.acme".to_owned(),
                "calls".to_owned(),
                Some(100)
            ),
            (
                "tally.notify.threshold.acme".to_owned(),
                "storage".to_owned(),
                Some(80)
            ),
            (
                "tally.notify.threshold.acme".to_owned(),
                "storage".to_owned(),
                Some(100)
            ),
        ]
    );

    // NATS put each customer's events in the partition Tally computes for it.
    let stream = h.nats.jetstream.get_stream(EVENTS_STREAM).await.unwrap();
    for seq in 1..=cases.len() as u64 {
        let m = stream.get_raw_message(seq).await.unwrap();
        let stored = subject::parse_partitioned(&m.subject).unwrap();
        let customer = subject::customer_from_token(stored.token).unwrap();
        // At every count the stream can grow to.
        let levels = subject::partition_levels(h.config.ingest.partitions);
        for (level, &count) in levels.iter().enumerate() {
            assert_eq!(
                stored.partition(level),
                Some(subject::partition_of(&customer, count))
            );
        }
    }
    pipeline.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_applies_to_the_first_event_after_the_write_is_acknowledged() {
    let mut h = Harness::start().await;
    let defs = setup(&h, vec![Customer::new("grow", "small")]).await;
    // The worker's watch applies each change 300 ms late: the event published right after
    // the write reaches the worker first, which must wait for the change.
    h.config.ingest.definitions_apply_delay_ms = 300;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    let time = r#""time":"2026-11-10T10:00:00Z","#;

    // Each change is written once the worker has decided every event before it; the next
    // event is published the moment the write is acknowledged.
    let stats = pipeline.stats.clone();
    let decided = |n: u64| {
        let stats = stats.clone();
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while tally_ingest::Stats::get(&stats.events_valid) < n {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{n} events not decided"
                );
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        }
    };
    let change = |customer: Customer| {
        let defs = defs.clone();
        async move {
            let customers = Customers {
                customers: vec![customer],
            };
            defs.apply_customers(&customers, "crm").await.unwrap();
        }
    };
    publish(&h, "g1", "grow", "calls", 10.0, time).await;
    publish(&h, "g2", "grow", "calls", 1.0, time).await;
    decided(2).await;
    change(Customer::new("grow", "big")).await;
    publish(&h, "g3", "grow", "calls", 1.0, time).await;
    decided(3).await;
    // Down again below the usage (11 of 10 counted): refused, nothing undone.
    change(Customer::new("grow", "small")).await;
    publish(&h, "g4", "grow", "calls", 1.0, time).await;
    decided(4).await;
    // Suspended: expired at once.
    let mut suspended = Customer::new("grow", "big");
    suspended.status = Status::Suspended;
    change(suspended).await;
    publish(&h, "g5", "grow", "calls", 1.0, time).await;

    h.drain(&pipeline, 5).await;
    let got = decisions(&h).await;
    let got: Vec<&str> = ["g1", "g2", "g3", "g4", "g5"]
        .iter()
        .map(|id| got[*id].as_str())
        .collect();
    assert_eq!(
        got,
        [
            "accepted",
            "limit_reached",
            "accepted",
            "limit_reached",
            "expired"
        ]
    );
    // Each event is recorded with the plan that decided it: billing rates it with that
    // plan's prices, so a change inside a period splits the usage between the plans.
    let plans = by_event(&h, "plan").await;
    let plans: Vec<&str> = ["g1", "g2", "g3", "g4", "g5"]
        .iter()
        .map(|id| plans[*id].as_str())
        .collect();
    assert_eq!(plans, ["small", "small", "big", "small", "big"]);
    // Each change made while the worker ran was announced once; the definition it found
    // at start was not.
    let changes: Vec<(String, String)> = notifications(&h)
        .await
        .into_iter()
        .filter(|(subject, _)| subject == "tally.notify.entitlement_changed.grow")
        .map(|(_, body)| {
            (
                body["plan"].as_str().unwrap().to_owned(),
                body["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [("big", "active"), ("small", "active"), ("big", "suspended")]
        .map(|(p, s)| (p.to_owned(), s.to_owned()));
    assert_eq!(changes, expected);
    pipeline.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_are_answered_by_the_owning_worker_and_record_nothing() {
    use tally_ingest::checks::{CheckRequest, check, check_subject};
    let h = Harness::start().await;
    setup(&h, vec![Customer::new("acme", "small")]).await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    let partitions = h.config.ingest.partitions;
    let timeout = std::time::Duration::from_secs(5);
    let client = &h.nats.client;

    let fresh = check(client, partitions, &ask("calls", 1.0), timeout)
        .await
        .unwrap();
    assert_eq!(
        (fresh.decision.as_str(), fresh.has_access),
        ("accepted", true)
    );
    assert_eq!(
        (fresh.usage, fresh.limit, fresh.remaining),
        (0.0, Some(10.0), Some(10.0))
    );
    assert_eq!(
        fresh.resets_at.unwrap().to_rfc3339(),
        "2026-12-01T00:00:00+00:00"
    );
    // Checking twice records nothing.
    assert_eq!(
        check(client, partitions, &ask("calls", 1.0), timeout)
            .await
            .unwrap(),
        fresh
    );

    publish(
        &h,
        "c1",
        "acme",
        "calls",
        6.0,
        r#""time":"2026-11-10T10:00:00Z","#,
    )
    .await;
    h.drain(&pipeline, 1).await;
    let after = check(client, partitions, &ask("calls", 5.0), timeout)
        .await
        .unwrap();
    assert_eq!(
        (after.decision.as_str(), after.has_access),
        ("limit_reached", false)
    );
    assert_eq!((after.usage, after.remaining), (6.0, Some(4.0)));
    let sso = check(client, partitions, &ask("sso", 1.0), timeout)
        .await
        .unwrap();
    assert_eq!(sso.decision, "not_entitled");
    let nobody = CheckRequest {
        customer: "nobody".to_owned(),
        ..ask("calls", 1.0)
    };
    assert_eq!(
        check(client, partitions, &nobody, timeout)
            .await
            .unwrap()
            .decision,
        "unknown_customer"
    );

    // Malformed requests and a request to the wrong partition name what is wrong.
    let client = h.nats.client.clone();
    let raw = |subject: String, body: &'static str| {
        let client = client.clone();
        async move {
            let reply = client.request(subject, body.into()).await.unwrap();
            serde_json::from_slice::<serde_json::Value>(&reply.payload).unwrap()
        }
    };
    let subject = check_subject("acme", partitions);
    let bad = raw(
        subject.clone(),
        r#"{"customer":"acme","feature":"calls","quantity":"lots"}"#,
    )
    .await;
    assert_eq!(bad["field"], "quantity", "{bad}");
    let bad = raw(subject.clone(), r#"{"customer":"acme"}"#).await;
    assert_eq!(bad["field"], "feature", "{bad}");
    let other = (0..partitions)
        .map(|p| format!("tally.check.{p}.acme"))
        .find(|s| *s != subject)
        .unwrap();
    let wrong = raw(other, r#"{"customer":"acme","feature":"calls"}"#).await;
    assert_eq!(wrong["field"], "customer", "{wrong}");
    assert!(
        wrong["error"].as_str().unwrap().contains(&subject),
        "{wrong}"
    );

    // A request about another customer than its subject names is refused: NATS
    // permissions limit an application's key by the subject.
    let smuggled = raw(
        subject.clone(),
        r#"{"customer":"globex","feature":"calls"}"#,
    )
    .await;
    assert_eq!(smuggled["field"], "customer", "{smuggled}");
    assert!(
        smuggled["error"]
            .as_str()
            .unwrap()
            .contains("not the customer this request was sent for"),
        "{smuggled}"
    );

    // `tally check` asks the same way.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "check",
            "acme",
            "calls",
            "--format",
            "json",
            "--nats-url",
            &h.server.url(),
        ])
        .arg("--data-dir")
        .arg(h.dir.path())
        .env("TALLY_NATS_CREDENTIALS", h.server.credentials().dir())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let cli: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(cli["customer"], "acme");
    assert!(cli["decision"].is_string());
    pipeline.shutdown().await.unwrap();
}

/// A burst of notices larger than the worker's publish slots goes through: a partition
/// awaits the notices it holds instead of waiting for a slot that only the seal of its own
/// batch would free (nothing is sealed by age here while the burst is handled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_notices_beyond_the_publish_slots_goes_through() {
    let mut h = Harness::start().await;
    h.config.ingest.publishes_in_flight = 4;
    h.config.ingest.flush_age_ms = 60_000;
    let customers = (0..12)
        .map(|i| Customer::new(format!("c{i}"), "small"))
        .collect();
    setup(&h, customers).await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    // Each customer's event uses the whole limit of 10 calls: 80 % and 100 % reached, two
    // notices each, 24 in all, against 4 slots.
    for i in 0..12 {
        publish(
            &h,
            &format!("e{i}"),
            &format!("c{i}"),
            "calls",
            10.0,
            r#""time":"2026-11-10T10:00:00Z","#,
        )
        .await;
    }
    common::until("24 notices published", || async {
        notifications(&h).await.len() == 24
    })
    .await;
    let notices = notifications(&h).await;
    for i in 0..12 {
        let subject = format!("tally.notify.threshold.c{i}");
        let theirs = notices.iter().filter(|(s, _)| *s == subject).count();
        assert_eq!(theirs, 2, "c{i}: {notices:?}");
    }
    pipeline.shutdown().await.unwrap();
    let decided = decisions(&h).await;
    assert_eq!(decided.len(), 12);
    assert!(decided.values().all(|d| d == "accepted"), "{decided:?}");
}

/// Checks are answered on a thread of their own: with every thread of the runtime the
/// worker ingests on blocked, a check sent over another connection is answered before the
/// block ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_are_answered_while_the_ingest_runtime_is_blocked() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tally_ingest::checks::check;
    let h = Harness::start().await;
    setup(&h, vec![Customer::new("acme", "small")]).await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    let partitions = h.config.ingest.partitions;
    let request = ask("calls", 1.0);
    // Both of the runtime's threads sleep in a task of their own (a thread runs one task
    // at a time, so two asleep at once are on both threads); the worker, its partitions
    // and its connection run on this runtime.
    let block = std::time::Duration::from_secs(5);
    let (asleep, done) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let blockers: Vec<_> = (0..2)
        .map(|_| {
            let (asleep, done) = (asleep.clone(), done.clone());
            tokio::spawn(async move {
                asleep.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(block);
                done.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    // This test's body runs on a thread of its own, outside the runtime's two.
    let deadline = std::time::Instant::now() + block / 2;
    while asleep.load(Ordering::SeqCst) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the runtime's threads never both slept"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let url = h.server.url();
    let seed = h
        .server
        .credentials()
        .seed(tally_natsd::Service::Admin)
        .unwrap();
    let (answer, done_when_answered) = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let client = async_nats::ConnectOptions::with_nkey(seed)
                .connect(url)
                .await
                .unwrap();
            let answer = check(&client, partitions, &request, block - block / 5).await;
            (answer, done.load(Ordering::SeqCst))
        })
    })
    .join()
    .unwrap();
    let answer = answer.unwrap();
    assert_eq!(
        (answer.decision.as_str(), answer.has_access),
        ("accepted", true)
    );
    assert_eq!(
        done_when_answered, 0,
        "answered only once the runtime was free"
    );
    for b in blockers {
        b.await.unwrap();
    }
    pipeline.shutdown().await.unwrap();
}

/// A partition has no owner for a moment while a worker starts or hands it over: a check
/// sent then waits for the owner instead of failing, and one nobody takes up fails with
/// the time it waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_sent_before_any_worker_owns_the_partition_is_answered_once_one_does() {
    use tally_ingest::checks::check;
    let h = Harness::start().await;
    setup(&h, vec![Customer::new("acme", "small")]).await;
    let partitions = h.config.ingest.partitions;
    let request = ask("calls", 1.0);
    let short = std::time::Duration::from_millis(300);
    let unanswered = check(&h.nats.client, partitions, &request, short)
        .await
        .unwrap_err();
    assert!(
        unanswered.to_string().contains("no worker answered within"),
        "{unanswered}"
    );

    let client = h.nats.client.clone();
    let waiting = {
        let request = request.clone();
        tokio::spawn(async move {
            check(
                &client,
                partitions,
                &request,
                std::time::Duration::from_secs(30),
            )
            .await
        })
    };
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    let answer = waiting.await.unwrap().unwrap();
    assert_eq!(
        (answer.decision.as_str(), answer.has_access),
        ("accepted", true)
    );
    pipeline.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_and_record_returns_the_decision_the_event_was_recorded_with() {
    use tally_ingest::record::record;
    let h = Harness::start().await;
    setup(&h, vec![Customer::new("acme", "small")]).await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    let partitions = h.config.ingest.partitions;
    let timeout = std::time::Duration::from_secs(10);
    let event = |id: &str, quantity: f64| {
        format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"app","type":"usage","subject":"acme","time":"2026-11-10T10:00:00Z","data":{{"feature":"calls","quantity":{quantity}}}}}"#
        )
        .into_bytes()
    };
    let client = &h.nats.client;

    let first = record(client, partitions, "acme", event("r1", 6.0), timeout)
        .await
        .unwrap();
    assert_eq!(
        (first.decision.as_deref(), first.has_access),
        (Some("accepted"), true)
    );
    let second = record(client, partitions, "acme", event("r2", 6.0), timeout)
        .await
        .unwrap();
    assert_eq!(
        (second.decision.as_deref(), second.has_access),
        (Some("limit_reached"), false)
    );
    // The same event again counts nothing.
    let again = record(client, partitions, "acme", event("r1", 6.0), timeout)
        .await
        .unwrap();
    assert!(again.duplicate && !again.has_access, "{again:?}");
    // A malformed event is refused, naming the field, and nothing is stored.
    let bad = br#"{"specversion":"1.0","id":"r3","source":"app","type":"usage","subject":"acme","data":{"feature":"calls","quantity":-1}}"#;
    let refused = record(client, partitions, "acme", bad.to_vec(), timeout)
        .await
        .unwrap();
    assert_eq!(
        refused.field.as_deref(),
        Some("data.quantity"),
        "{refused:?}"
    );

    // The lake holds each event once, with the decision the app was told.
    h.drain(&pipeline, 2).await;
    let got = decisions(&h).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got["r1"], "accepted");
    assert_eq!(got["r2"], "limit_reached");
    pipeline.shutdown().await.unwrap();
}

/// A worker killed after its rows are durable but before it acknowledged them: the next
/// one takes the partition over from the lake. The redelivered messages are not counted
/// again, the counter goes on where it stood, and each threshold notifies exactly once.
/// After a clean stop, the next worker starts from the checkpoint the stop wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_counts_nothing_twice_and_notifies_exactly_once() {
    let h = Harness::start().await;
    setup(&h, vec![Customer::new("acme", "small")]).await;
    let flush = ("TALLY_INGEST__FLUSH_AGE_MS", "50");
    let mut first =
        common::serve_with(&h, &[flush, ("TALLY_INGEST__FAULT_ACK_DELAY_MS", "600000")]);
    common::until("consumers exist", || async {
        common::consumer_backlog_ready(&h).await.is_some()
    })
    .await;
    // 9 of a hard limit of 10: the 80 % threshold is crossed by the 8th.
    for i in 0..9 {
        publish(&h, &format!("e{i:02}"), "acme", "calls", 1.0, "").await;
    }
    common::until("9 rows durable", || async { common::lake_rows(&h) == 9 }).await;
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    assert_eq!(
        common::consumer_backlog(&h).await,
        (0, 9),
        "durable, never acknowledged"
    );

    let second = common::serve_with(&h, &[flush]);
    // With nothing published after them, the redelivered messages the lake already holds
    // are acknowledged all the same, and not stored again.
    common::until("the 9 redelivered messages acknowledged", || async {
        common::consumer_backlog(&h).await == (0, 0)
    })
    .await;
    assert_eq!(common::lake_rows(&h), 9);
    for i in 9..13 {
        publish(&h, &format!("e{i:02}"), "acme", "calls", 1.0, "").await;
    }
    common::until("13 rows, all acknowledged", || async {
        common::lake_rows(&h) == 13 && common::consumer_backlog(&h).await == (0, 0)
    })
    .await;
    common::terminate(second);
    let partition = subject::partition_of("acme", h.config.ingest.partitions);
    let checkpoints = h
        .config
        .lake_dir()
        .join(format!("checkpoints/p{partition:03}"));
    assert!(
        std::fs::read_dir(&checkpoints).unwrap().count() > 0,
        "a clean stop leaves a checkpoint"
    );

    let third = common::serve_with(&h, &[flush]);
    publish(&h, "e13", "acme", "calls", 1.0, "").await;
    common::until("14 rows", || async { common::lake_rows(&h) == 14 }).await;
    common::terminate(third);

    assert_eq!(common::lake_rows(&h), 14, "no event stored twice");
    let got = decisions(&h).await;
    for i in 0..14 {
        let want = if i < 10 { "accepted" } else { "limit_reached" };
        assert_eq!(got[&format!("e{i:02}")], want, "e{i:02}");
    }
    let mut sent: Vec<(String, Option<u64>)> = notifications(&h)
        .await
        .into_iter()
        .map(|(subject, body)| (subject, body["threshold"].as_u64()))
        .collect();
    sent.sort();
    assert_eq!(
        sent,
        [
            ("tally.notify.limit_reached.acme".to_owned(), None),
            ("tally.notify.threshold.acme".to_owned(), Some(80)),
            ("tally.notify.threshold.acme".to_owned(), Some(100)),
        ]
    );
}
