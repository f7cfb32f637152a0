//! The SDK over a real nats-server: per-customer messages and their ids, retries with the
//! same ids across a restart, flush on shutdown and on drop, backpressure, checks and
//! their cache, and offline license verification.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use serde_json::{Value, json};
use tally_natsd::{NatsServer, Service};
use tally_sdk::{Client, Error, Event, Options, batch_message_id};

/// A stored message: subject, `Nats-Msg-Id`, and the ids of the events it carries.
#[derive(Debug, Clone)]
struct Stored {
    subject: String,
    msg_id: String,
    ids: Vec<String>,
}

async fn events_stream(nats: &async_nats::Client) -> jetstream::stream::Stream {
    jetstream::new(nats.clone())
        .get_or_create_stream(jetstream::stream::Config {
            name: "TALLY_EVENTS".into(),
            subjects: vec!["tally.events.>".into()],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .unwrap()
}

async fn stored(nats: &async_nats::Client) -> Vec<Stored> {
    let mut stream = events_stream(nats).await;
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await.unwrap();
        let body: Value = serde_json::from_slice(&m.payload).unwrap();
        let events = match body {
            Value::Array(events) => events,
            one => vec![one],
        };
        out.push(Stored {
            subject: m.subject.to_string(),
            msg_id: m
                .headers
                .get("Nats-Msg-Id")
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default(),
            ids: events
                .iter()
                .map(|e| e["id"].as_str().unwrap().to_owned())
                .collect(),
        });
    }
    out
}

/// Every event id stored, with how often.
fn id_counts(stored: &[Stored]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for s in stored {
        for id in &s.ids {
            *counts.entry(id.clone()).or_insert(0) += 1;
        }
    }
    counts
}

async fn setup() -> (NatsServer, async_nats::Client) {
    let server = NatsServer::start_temp().expect("nats-server (scripts/install-nats.sh)");
    let nats = server.connect(Service::Admin).await.unwrap();
    events_stream(&nats).await;
    (server, nats)
}

/// Options that send only when told to.
fn manual() -> Options {
    Options {
        flush_interval: Duration::from_secs(3600),
        ..Options::default()
    }
}

/// Options that retry fast.
fn fast_retries() -> Options {
    Options {
        request_timeout: Duration::from_millis(500),
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(300),
        retry_timeout: Duration::from_secs(60),
        ..manual()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_become_one_message_per_customer_with_their_ids() {
    let (server, nats) = setup().await;
    let client = Client::nats(server.connect(Service::Admin).await.unwrap(), manual())
        .await
        .unwrap();
    let mut ids: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (customer, n) in [("cust-a", 3), ("acme corp", 1), ("cust-b", 2)] {
        for i in 0..n {
            let id = client
                .record_event(
                    Event::new(customer, "api-calls", f64::from(i + 1))
                        .user("u-1")
                        .region("eu")
                        .data("model", "small"),
                )
                .await
                .unwrap();
            assert_eq!(uuid_version(&id), 7);
            ids.entry(customer).or_default().push(id);
        }
    }
    client.flush().await.unwrap();
    let stored = stored(&nats).await;
    assert_eq!(stored.len(), 3, "{stored:?}");
    let by_subject: HashMap<_, _> = stored.iter().map(|s| (s.subject.as_str(), s)).collect();
    let a = by_subject["tally.events.cust-a"];
    assert_eq!(a.ids, ids["cust-a"]);
    assert_eq!(a.msg_id, batch_message_id(a.ids.iter().map(String::as_str)));
    // "acme corp" is not a plain token: `~` and the hex of its bytes.
    let acme = by_subject["tally.events.~61636d6520636f7270"];
    assert_eq!(acme.ids, ids["acme corp"]);
    assert_eq!(
        acme.msg_id, ids["acme corp"][0],
        "a single event's message id is its id"
    );
    assert_eq!(by_subject["tally.events.cust-b"].ids, ids["cust-b"]);
    assert_eq!(client.stats().sent, 6);
    client.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_across_a_nats_restart_sends_the_same_ids() {
    let (mut server, _nats) = setup().await;
    let client = Arc::new(
        Client::nats(
            server.connect(Service::Admin).await.unwrap(),
            fast_retries(),
        )
        .await
        .unwrap(),
    );
    client.record("cust-0", "api-calls", 1.0).await.unwrap();
    client.flush().await.unwrap();

    server.stop();
    let mut ids = vec![client.record("cust-r", "api-calls", 1.0).await.unwrap()];
    for _ in 0..2 {
        ids.push(client.record("cust-s", "api-calls", 2.0).await.unwrap());
    }
    let flushing = tokio::spawn({
        let client = client.clone();
        async move { client.flush().await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !flushing.is_finished(),
        "nothing can be acknowledged while NATS is down"
    );
    assert!(client.stats().retries > 0);
    server.restart().unwrap();
    tokio::time::timeout(Duration::from_secs(30), flushing)
        .await
        .expect("flushed after the restart")
        .unwrap()
        .unwrap();

    let nats = server.connect(Service::Admin).await.unwrap();
    let stored = stored(&nats).await;
    let counts = id_counts(&stored);
    for id in &ids {
        assert_eq!(counts.get(id), Some(&1), "{id} stored once: {stored:?}");
    }
    // However often they were sent, JetStream kept one message per message id.
    let mut msg_ids: Vec<_> = stored.iter().map(|s| s.msg_id.clone()).collect();
    msg_ids.sort();
    msg_ids.dedup();
    assert_eq!(msg_ids.len(), stored.len(), "{stored:?}");
    let single = stored
        .iter()
        .find(|s| s.subject == "tally.events.cust-r")
        .unwrap();
    assert_eq!(single.msg_id, ids[0]);
    let batch = stored
        .iter()
        .find(|s| s.subject == "tally.events.cust-s")
        .unwrap();
    assert_eq!(batch.ids, ids[1..]);
    assert_eq!(client.stats().failed, 0);
    client.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_and_drop_deliver_everything_buffered() {
    let (server, nats) = setup().await;
    let client = Client::nats(server.connect(Service::Admin).await.unwrap(), manual())
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(
            client
                .record(&format!("cust-{}", i % 5), "api-calls", 1.0)
                .await
                .unwrap(),
        );
    }
    client.shutdown().await.unwrap();
    let counts = id_counts(&stored(&nats).await);
    assert!(ids.iter().all(|id| counts.get(id) == Some(&1)));
    assert!(matches!(
        client.record("cust-0", "api-calls", 1.0).await,
        Err(Error::Closed)
    ));

    // Dropped without shutdown: the background task still sends while the runtime runs.
    let client = Client::nats(server.connect(Service::Admin).await.unwrap(), manual())
        .await
        .unwrap();
    let dropped = client.record("cust-d", "api-calls", 1.0).await.unwrap();
    drop(client);
    let mut found = false;
    for _ in 0..50 {
        if id_counts(&stored(&nats).await).contains_key(&dropped) {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(found, "the drop flushed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_makes_record_wait() {
    let (mut server, _nats) = setup().await;
    let options = Options {
        buffer_capacity: 3,
        batch_size: 1,
        ..fast_retries()
    };
    let client = Arc::new(
        Client::nats(server.connect(Service::Admin).await.unwrap(), options)
            .await
            .unwrap(),
    );
    server.stop();
    // The first event is taken by the sender (stuck retrying); the buffer then fills.
    let mut ids = Vec::new();
    let full = loop {
        match client.try_record("cust-bp", "api-calls", 1.0) {
            Ok(id) => ids.push(id),
            Err(e) => break e,
        }
        assert!(ids.len() <= 4, "the buffer is bounded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(matches!(full, Error::BufferFull { capacity: 3 }), "{full}");
    assert!(full.is_retryable());
    assert!(ids.len() >= 3);
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { client.record("cust-bp", "api-calls", 1.0).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "record waits while the buffer is full"
    );

    server.restart().unwrap();
    ids.push(
        tokio::time::timeout(Duration::from_secs(30), waiting)
            .await
            .expect("record went on once NATS was back")
            .unwrap()
            .unwrap(),
    );
    client.shutdown().await.unwrap();
    let nats = server.connect(Service::Admin).await.unwrap();
    let counts = id_counts(&stored(&nats).await);
    for id in &ids {
        assert_eq!(counts.get(id), Some(&1), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_are_answered_from_the_cache_within_the_ttl() {
    let (_server, nats) = setup().await;
    let requests = Arc::new(AtomicUsize::new(0));
    let mut subscription = nats.subscribe("tally.check.*.*").await.unwrap();
    nats.flush().await.unwrap();
    let responder = tokio::spawn({
        let (nats, requests) = (nats.clone(), requests.clone());
        async move {
            while let Some(m) = subscription.next().await {
                requests.fetch_add(1, Ordering::SeqCst);
                let request: Value = serde_json::from_slice(&m.payload).unwrap();
                let reply = if request["feature"] == "nope" {
                    json!({"error": "no feature \"nope\"", "field": "feature"})
                } else {
                    json!({
                        "customer": request["customer"], "feature": request["feature"],
                        "decision": "accepted", "has_access": true, "usage": 40.0,
                        "limit": 100.0, "remaining": 60.0 - request["quantity"].as_f64().unwrap(),
                        "resets_at": "2026-12-01T00:00:00Z",
                        "subject": m.subject.as_str(),
                    })
                };
                let body = serde_json::to_vec(&reply).unwrap();
                nats.publish(m.reply.unwrap(), body.into()).await.unwrap();
            }
        }
    });
    let options = Options {
        partitions: 4,
        check_cache_ttl: Duration::from_millis(300),
        ..manual()
    };
    let client = Client::nats(nats.clone(), options).await.unwrap();
    let answer = client.check("cust-7", "api-calls").await.unwrap();
    assert!(answer.has_access);
    assert_eq!(answer.decision, "accepted");
    assert_eq!(answer.limit, Some(100.0));
    assert_eq!(answer.remaining, Some(59.0));
    assert_eq!(
        answer.resets_at.unwrap().to_rfc3339(),
        "2026-12-01T00:00:00+00:00"
    );
    assert_eq!(requests.load(Ordering::SeqCst), 1);

    // Within the TTL: the cache answers.
    assert_eq!(client.check("cust-7", "api-calls").await.unwrap(), answer);
    assert_eq!(requests.load(Ordering::SeqCst), 1);
    // Another quantity is another question.
    let five = client
        .check_quantity("cust-7", "api-calls", 5.0)
        .await
        .unwrap();
    assert_eq!(five.remaining, Some(55.0));
    assert_eq!(requests.load(Ordering::SeqCst), 2);
    // Past the TTL: asked again.
    tokio::time::sleep(Duration::from_millis(350)).await;
    client.check("cust-7", "api-calls").await.unwrap();
    assert_eq!(requests.load(Ordering::SeqCst), 3);

    match client.check("cust-7", "nope").await {
        Err(Error::Check { field, .. }) => assert_eq!(field.as_deref(), Some("feature")),
        other => panic!("{other:?}"),
    }
    responder.abort();
    client.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_goes_to_the_customers_partition_and_no_worker_is_unavailable() {
    let (_server, nats) = setup().await;
    let partitions = 8;
    let expected = format!(
        "tally.check.{}.*",
        tally_core::subject::partition_of("cust-42", partitions)
    );
    let mut subscription = nats.subscribe(expected.clone()).await.unwrap();
    nats.flush().await.unwrap();
    let nats2 = nats.clone();
    tokio::spawn(async move {
        if let Some(m) = subscription.next().await {
            let body = json!({"customer":"cust-42","feature":"sso","decision":"accepted",
                "has_access":true,"usage":0.0,"value":{"tier":"gold"}});
            nats2
                .publish(m.reply.unwrap(), serde_json::to_vec(&body).unwrap().into())
                .await
                .unwrap();
        }
    });
    let options = Options {
        partitions,
        request_timeout: Duration::from_secs(2),
        ..manual()
    };
    let client = Client::nats(nats.clone(), options).await.unwrap();
    let answer = client.check("cust-42", "sso").await.unwrap();
    assert_eq!(answer.value, Some(json!({"tier": "gold"})));
    // Nobody listens on another customer's partition.
    let other = (0..100)
        .map(|i| format!("c-{i}"))
        .find(|c| {
            format!(
                "tally.check.{}.*",
                tally_core::subject::partition_of(c, partitions)
            ) != expected
        })
        .unwrap();
    let refused = client.check(&other, "sso").await.unwrap_err();
    assert!(matches!(refused, Error::Unavailable(_)), "{refused}");
    client.shutdown().await.unwrap();
}

#[test]
fn licenses_verify_offline_round_trip() {
    use chrono::{Duration as Days, Utc};
    use tally_license::SigningKey;
    use tally_sdk::{KeySet, License, PublishedKey, VerifyError, verify, verify_license};

    let key = SigningKey::generate().unwrap();
    let keys = KeySet {
        keys: vec![PublishedKey::active(&key.public(), Utc::now())],
    };
    let now = Utc::now();
    let license = License {
        customer: "cust-00001".into(),
        plan: "pro".into(),
        features: [("sso".to_owned(), json!({"kind": "boolean"}))].into(),
        seats: Some(10),
        regions: vec![],
        issued_at: now - Days::minutes(1),
        not_before: now - Days::minutes(1),
        expires_at: now + Days::days(30),
        key_id: String::new(),
    };
    let token = key.sign(&license).unwrap();
    let verified = verify_license(&token, &keys).unwrap();
    assert_eq!(verified.customer, "cust-00001");
    assert_eq!(verified.seats, Some(10));
    assert_eq!(verified.key_id, key.key_id());
    assert!(matches!(
        verify(&token, &keys, now + Days::days(31)),
        Err(VerifyError::Expired { .. })
    ));
    let other = SigningKey::generate().unwrap();
    let other_keys = KeySet {
        keys: vec![PublishedKey::active(&other.public(), Utc::now())],
    };
    assert!(matches!(
        verify_license(&token, &other_keys),
        Err(VerifyError::UnknownKey { .. })
    ));
}

fn uuid_version(id: &str) -> usize {
    // The version is the first hex digit of the third group.
    let group = id.split('-').nth(2).unwrap();
    usize::from_str_radix(&group[..1], 16).unwrap()
}
