//! The SDK over HTTP, against a tiny axum server that records what it receives: the batch
//! body, its content type and key, retries of a 503 with the same ids, a refused event
//! taken out of its batch, checks in OpenMeter's shape with the cache, license keys.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tally_sdk::{Client, Error, Event, FailureKind, Options};

#[derive(Debug, Clone)]
struct Request {
    content_type: String,
    auth: String,
    body: Value,
}

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Request>>,
    /// Statuses and bodies to answer `POST /api/v1/events` with, then 202.
    script: Mutex<VecDeque<(u16, Value)>>,
    checks: Mutex<Vec<String>>,
    keys: Mutex<String>,
}

type Shared = Arc<Recorder>;

async fn events(State(r): State<Shared>, headers: HeaderMap, body: Bytes) -> (StatusCode, String) {
    let text = |h| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    r.events.lock().unwrap().push(Request {
        content_type: text(header::CONTENT_TYPE),
        auth: text(header::AUTHORIZATION),
        body: serde_json::from_slice(&body).unwrap(),
    });
    let (status, body) = r
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or((202, json!({"accepted": 0})));
    (StatusCode::from_u16(status).unwrap(), body.to_string())
}

async fn entitlement(
    State(r): State<Shared>,
    Path((customer, feature)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> (StatusCode, String) {
    r.checks.lock().unwrap().push(format!(
        "{customer}/{feature}?{}",
        query.unwrap_or_default()
    ));
    if customer != "cust-00001" {
        let problem = json!({"type":"urn:tally:problem:not_found","title":"Not found","status":404,
            "detail": format!("no customer {customer:?}"),"field":"customer"});
        return (StatusCode::NOT_FOUND, problem.to_string());
    }
    let value = json!({"hasAccess": true, "balance": 750.0, "usage": 250.0, "overage": 0.0,
        "limit": 1000.0, "resetsAt": "2026-12-01T00:00:00Z", "decision": "accepted"});
    (StatusCode::OK, value.to_string())
}

async fn license_keys(State(r): State<Shared>) -> String {
    r.keys.lock().unwrap().clone()
}

async fn serve() -> (String, Shared) {
    let recorder = Shared::default();
    let app = Router::new()
        .route("/api/v1/events", post(events))
        .route(
            "/api/v1/customers/{customer}/entitlements/{feature}",
            get(entitlement),
        )
        .route("/api/v1/license-keys", get(license_keys))
        .with_state(recorder.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), recorder)
}

fn options() -> Options {
    Options {
        flush_interval: Duration::from_secs(3600),
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(100),
        ..Options::default()
    }
}

fn ids(body: &Value) -> Vec<String> {
    body.as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_flush_is_one_cloudevents_batch_request() {
    let (url, recorder) = serve().await;
    let client = Client::http(&url, "secret-key", options()).await.unwrap();
    let mut sent = Vec::new();
    sent.push(client.record("cust-00001", "api-calls", 3.0).await.unwrap());
    sent.push(
        client
            .record_event(Event::new("cust-00002", "ai-tokens", 1200.0).user("u-9"))
            .await
            .unwrap(),
    );
    sent.push(client.record("cust-00001", "api-calls", 1.0).await.unwrap());
    client.flush().await.unwrap();
    let requests = recorder.events.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.content_type, "application/cloudevents-batch+json");
    assert_eq!(r.auth, "Bearer secret-key");
    assert_eq!(ids(&r.body), sent);
    let second = &r.body[1];
    assert_eq!(second["specversion"], "1.0");
    assert_eq!(second["subject"], "cust-00002");
    assert_eq!(second["data"]["feature"], "ai-tokens");
    assert_eq!(second["data"]["quantity"], 1200.0);
    assert_eq!(second["data"]["user"], "u-9");
    assert!(second["time"].is_string());
    client.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_503_is_retried_with_the_same_ids() {
    let (url, recorder) = serve().await;
    recorder.script.lock().unwrap().extend([
        (503, json!({"status": 503, "detail": "NATS is unavailable"})),
        (503, json!({"status": 503, "detail": "NATS is unavailable"})),
        (202, json!({"accepted": 2})),
    ]);
    let client = Client::http(&url, "k", options()).await.unwrap();
    client.record("cust-00001", "api-calls", 1.0).await.unwrap();
    client.record("cust-00003", "api-calls", 2.0).await.unwrap();
    client.flush().await.unwrap();
    let requests = recorder.events.lock().unwrap().clone();
    assert_eq!(requests.len(), 3);
    assert_eq!(ids(&requests[0].body), ids(&requests[2].body));
    assert_eq!(
        requests[0].body, requests[2].body,
        "the same bytes, ids and times"
    );
    let stats = client.stats();
    assert_eq!((stats.sent, stats.failed, stats.retries), (2, 0, 2));
    client.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_refused_event_is_reported_and_the_rest_delivered() {
    let (url, recorder) = serve().await;
    recorder.script.lock().unwrap().push_back((
        400,
        json!({"type":"urn:tally:problem:bad_time","status":400,"detail":"event 1: bad","field":"time","index":1}),
    ));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let options = options().on_failure({
        let failures = failures.clone();
        move |f| failures.lock().unwrap().push(f.clone())
    });
    let client = Client::http(&url, "k", options).await.unwrap();
    let a = client.record("cust-00001", "api-calls", 1.0).await.unwrap();
    let b = client.record("cust-00001", "api-calls", 2.0).await.unwrap();
    let c = client.record("cust-00001", "api-calls", 3.0).await.unwrap();
    match client.flush().await {
        Err(Error::Undelivered { failed: 1, reason }) => {
            assert!(reason.contains("bad"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let requests = recorder.events.lock().unwrap().clone();
    assert_eq!(
        requests.len(),
        2,
        "a 4xx is not retried, the rest is sent again"
    );
    assert_eq!(ids(&requests[1].body), vec![a, c]);
    let reported = failures.lock().unwrap().clone();
    assert_eq!(reported.len(), 1);
    assert_eq!(reported[0].kind, FailureKind::Refused);
    assert_eq!(reported[0].events[0].id.as_deref(), Some(b.as_str()));
    assert_eq!(client.stats().failed, 1);
    // Reported once: the next flush is clean.
    client.flush().await.unwrap();

    // A refusal without an index (a key without the role) refuses the batch whole.
    recorder
        .script
        .lock()
        .unwrap()
        .push_back((403, json!({"status":403,"detail":"key may not ingest"})));
    client.record("cust-00001", "api-calls", 1.0).await.unwrap();
    assert!(matches!(
        client.flush().await,
        Err(Error::Undelivered { failed: 1, .. })
    ));
    assert_eq!(failures.lock().unwrap().len(), 2);
    client.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_full_buffer_refuses_try_record_and_invalid_events_are_not_buffered() {
    let (url, recorder) = serve().await;
    // The server answers 503 until told otherwise: the sender holds its batch.
    recorder
        .script
        .lock()
        .unwrap()
        .extend(std::iter::repeat_n((503, json!({"status":503})), 1000));
    let options = Options {
        buffer_capacity: 2,
        batch_size: 1,
        ..options()
    };
    let client = Arc::new(Client::http(&url, "k", options).await.unwrap());
    let mut accepted = 0;
    while client.try_record("cust-00001", "api-calls", 1.0).is_ok() {
        accepted += 1;
        assert!(accepted <= 3);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { client.record("cust-00001", "api-calls", 1.0).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished());
    recorder.script.lock().unwrap().clear();
    waiting.await.unwrap().unwrap();
    client.flush().await.unwrap();
    assert_eq!(client.stats().sent, accepted + 1);

    for bad in [
        Event::new("", "api-calls", 1.0),
        Event::new("cust-00001", "", 1.0),
        Event::new("cust-00001", "api-calls", -2.0),
        Event::new("cust-00001", "api-calls", f64::NAN),
    ] {
        let e = client.record_event(bad).await.unwrap_err();
        assert!(
            matches!(e, Error::InvalidEvent { .. }) && !e.is_retryable(),
            "{e}"
        );
    }
    client.shutdown().await.unwrap();
}

#[tokio::test]
async fn checks_read_the_entitlement_value_and_are_cached() {
    let (url, recorder) = serve().await;
    let options = Options {
        check_cache_ttl: Duration::from_millis(200),
        ..options()
    };
    let client = Client::http(&url, "k", options).await.unwrap();
    let answer = client.check("cust-00001", "api-calls").await.unwrap();
    assert!(answer.has_access);
    assert_eq!(answer.decision, "accepted");
    assert_eq!(
        (answer.usage, answer.limit, answer.remaining),
        (250.0, Some(1000.0), Some(750.0))
    );
    client.check("cust-00001", "api-calls").await.unwrap();
    assert_eq!(
        recorder.checks.lock().unwrap().len(),
        1,
        "the cache answered"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    client
        .check_quantity("cust-00001", "api-calls", 7.0)
        .await
        .unwrap();
    client.check("cust-00001", "api-calls").await.unwrap();
    let checks = recorder.checks.lock().unwrap().clone();
    assert_eq!(
        checks,
        [
            "cust-00001/api-calls?quantity=1",
            "cust-00001/api-calls?quantity=7",
            "cust-00001/api-calls?quantity=1"
        ]
    );
    let unknown = client.check("nobody here", "api-calls").await.unwrap();
    assert_eq!(unknown.decision, "unknown_customer");
    assert!(!unknown.has_access);
    assert_eq!(
        recorder.checks.lock().unwrap()[3],
        "nobody here/api-calls?quantity=1"
    );
    client.shutdown().await.unwrap();
}

#[tokio::test]
async fn license_keys_are_fetched_once_and_verify_offline() {
    use chrono::{Duration as Days, Utc};
    use tally_license::SigningKey;
    use tally_sdk::{KeySet, License, PublishedKey};

    let (url, recorder) = serve().await;
    let key = SigningKey::generate().unwrap();
    let set = KeySet {
        keys: vec![PublishedKey::active(&key.public(), Utc::now())],
    };
    *recorder.keys.lock().unwrap() = serde_json::to_string(&set).unwrap();
    let now = Utc::now();
    let token = key
        .sign(&License {
            customer: "cust-00001".into(),
            plan: "pro".into(),
            features: Default::default(),
            seats: None,
            regions: vec!["eu".into()],
            issued_at: now,
            not_before: now - Days::minutes(5),
            expires_at: now + Days::days(1),
            key_id: String::new(),
        })
        .unwrap();
    let keys = tally_sdk::fetch_license_keys(&url).await.unwrap();
    let license = tally_sdk::verify_license(&token, &keys).unwrap();
    assert_eq!(
        (license.customer.as_str(), license.plan.as_str()),
        ("cust-00001", "pro")
    );
    assert_eq!(license.regions, ["eu"]);
}
