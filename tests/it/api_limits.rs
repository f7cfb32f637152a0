//! Limits per API key on the HTTP API, and failed authentications counted: a key over its
//! requests or body bytes per second gets 429 with `Retry-After` and a problem naming the
//! limit, other keys are unaffected, and waiting `Retry-After` is enough. Small limits set
//! in each test's configuration; no assertion about speed.

use std::time::Duration;

use reqwest::{Method, Response, StatusCode};
use serde_json::Value;
use tally_api::{ApiKeys, Role};
use tally_core::metrics as names;

use crate::common::{Harness, TestApi};
use crate::metrics::samples;

/// `GET /metrics`.
async fn scrape(api: &TestApi) -> String {
    let response = api
        .request(Method::GET, "/metrics", None)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.unwrap()
}

/// A counter's value for one label (0 when it was never incremented).
fn count(text: &str, name: &str, label: (&str, &str)) -> f64 {
    samples(text, name)
        .into_iter()
        .filter(|(labels, _)| labels.get(label.0).map(String::as_str) == Some(label.1))
        .map(|(_, v)| v)
        .sum()
}

/// Checks a 429: `Retry-After` in whole seconds, a problem naming `limit` and the key's
/// id, and never its secret. Returns `Retry-After`.
async fn rate_limited(response: Response, limit: &str, token: &str) -> u64 {
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let text = response.text().await.unwrap();
    let problem: Value = serde_json::from_str(&text).unwrap();
    let (id, secret) = token
        .strip_prefix("tally_")
        .and_then(|rest| rest.split_once('_'))
        .unwrap();
    assert_eq!(
        problem["type"], "urn:tally:problem:rate_limited",
        "{problem}"
    );
    assert_eq!(problem["title"], "Too Many Requests");
    assert_eq!(problem["status"], 429);
    assert_eq!(problem["limit"], limit);
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("key {id} ")), "{detail}");
    assert!(detail.contains(&format!("{limit} per second")), "{detail}");
    assert!(
        !text.contains(secret),
        "the secret is in the answer: {text}"
    );
    retry_after
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_request_limit_gets_429_until_retry_after_while_another_passes() {
    let mut h = Harness::start().await;
    h.config.api.key_requests_per_sec = 1;
    h.config.api.key_requests_burst = 2;
    let api = h.api().await;
    let busy = api.key(&h, Role::Provisioning, &[]).await;
    let other = api.key(&h, Role::Provisioning, &[]).await;
    let plans = |key: &str| api.request(Method::GET, "/api/v1/plans", Some(key)).send();
    let before = scrape(&api).await;

    // The burst of two passes; the third request, sent right after, does not (it would
    // take a second for the key to earn it).
    for _ in 0..2 {
        assert_eq!(plans(&busy).await.unwrap().status(), StatusCode::OK);
    }
    let wait = rate_limited(plans(&busy).await.unwrap(), "requests", &busy).await;
    assert_eq!(wait, 1, "one request a second: a second at most");
    // Another key has a budget of its own.
    for _ in 0..2 {
        assert_eq!(plans(&other).await.unwrap().status(), StatusCode::OK);
    }
    // Once `Retry-After` has passed, so does the key.
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(plans(&busy).await.unwrap().status(), StatusCode::OK);

    let after = scrape(&api).await;
    for (limit, refused) in [("requests", 1.0), ("bytes", 0.0)] {
        assert_eq!(
            count(&after, names::RATE_LIMITED, ("limit", limit))
                - count(&before, names::RATE_LIMITED, ("limit", limit)),
            refused,
            "{limit}: {after}"
        );
    }

    // The document lists the shared 429 on every route that takes a key, and only there.
    let doc: Value = api
        .request(Method::GET, "/api/v1/openapi.json", None)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let limit = &doc["components"]["schemas"]["Problem"]["properties"]["limit"];
    assert!(limit.is_object(), "the problem's `limit` is documented");
    let shared = &doc["components"]["responses"]["RateLimited"];
    assert!(shared["headers"]["Retry-After"].is_object(), "{shared}");
    assert_eq!(
        shared["content"]["application/problem+json"]["schema"]["$ref"],
        "#/components/schemas/Problem"
    );
    let mut secured = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let listed = &op["responses"]["429"];
            if op["security"].is_array() {
                secured += 1;
                assert_eq!(
                    listed["$ref"], "#/components/responses/RateLimited",
                    "{method} {path}"
                );
            } else {
                assert!(listed.is_null(), "{method} {path} takes no key");
            }
        }
    }
    assert!(secured > 20, "{secured} routes take a key");
    api.stop.cancel();
}

/// A batch of three events of `acme`, padded with spaces to exactly `len` bytes.
fn batch(name: &str, len: usize) -> Vec<u8> {
    let events: Vec<String> = (0..3)
        .map(|i| {
            format!(
                r#"{{"specversion":"1.0","id":"{name}-{i}","source":"test","type":"usage","subject":"acme","time":"2026-11-10T10:00:00Z","data":{{"feature":"calls","quantity":1}}}}"#
            )
        })
        .collect();
    let mut body = format!("[{}]", events.join(",")).into_bytes();
    assert!(body.len() <= len);
    body.resize(len, b' ');
    body
}

async fn post_events(api: &TestApi, key: &str, body: Vec<u8>) -> Response {
    api.request(Method::POST, "/api/v1/events", Some(key))
        .header("content-type", "application/cloudevents-batch+json")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Posts `body` to `/api/v1/events` in chunks, with no `Content-Length` (reqwest declares
/// one for every body it holds), over a plain socket; the response's status.
async fn post_chunked(api: &TestApi, key: &str, body: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = api.base.strip_prefix("http://").unwrap();
    let mut request = format!(
        "POST /api/v1/events HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {key}\r\n\
         content-type: application/cloudevents-batch+json\r\ntransfer-encoding: chunked\r\n\
         connection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in body.chunks(128) {
        request.extend(format!("{:x}\r\n", chunk.len()).bytes());
        request.extend(chunk);
        request.extend(b"\r\n");
    }
    request.extend(b"0\r\n\r\n");
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(&request).await.unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    // Up to the end, or to an error once the status line is in.
    while let Ok(n @ 1..) = socket.read(&mut buf).await {
        response.extend(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&response);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .unwrap_or_else(|| panic!("{text}"));
    status[..3].parse().unwrap()
}

async fn stored_messages(h: &Harness) -> u64 {
    let mut stream = h.nats.jetstream.get_stream("TALLY_EVENTS").await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_bytes_limit_is_refused_before_the_body_is_read() {
    let mut h = Harness::start().await;
    h.config.api.max_body_bytes = 1024;
    // Two bodies of 1,000 bytes fit the burst; a third needs 3.7 s more.
    h.config.api.key_bytes_per_sec = 256;
    h.config.api.key_bytes_burst = 2048;
    let api = h.api().await;
    let busy = api.key(&h, Role::Ingest, &[]).await;
    let other = api.key(&h, Role::Ingest, &[]).await;
    let before = scrape(&api).await;

    for name in ["busy-1", "busy-2"] {
        let response = post_events(&api, &busy, batch(name, 1000)).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    let refused = post_events(&api, &busy, batch("busy-3", 1000)).await;
    let wait = rate_limited(refused, "bytes", &busy).await;
    assert!(
        wait <= 4,
        "3,000 bytes at 256 a second past a 2,048 burst: {wait}"
    );
    // Another key's body passes meanwhile.
    let response = post_events(&api, &other, batch("other-1", 1000)).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    // The refused body was not taken: one message per accepted request, none for it.
    assert_eq!(stored_messages(&h).await, 3);
    // After `Retry-After`, the same body passes.
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let response = post_events(&api, &busy, batch("busy-3", 1000)).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(stored_messages(&h).await, 4);

    // A body of undeclared length is counted as it is read: three pass (the third while
    // the key is still within its burst), and the fourth finds the key 3,000 bytes in.
    let chunked = api.key(&h, Role::Ingest, &[]).await;
    for i in 0..3 {
        let body = batch(&format!("chunked-{i}"), 1000);
        assert_eq!(post_chunked(&api, &chunked, &body).await, 202, "body {i}");
    }
    assert_eq!(
        post_chunked(&api, &chunked, &batch("chunked-3", 1000)).await,
        429
    );

    let after = scrape(&api).await;
    for (limit, refused) in [("requests", 0.0), ("bytes", 2.0)] {
        assert_eq!(
            count(&after, names::RATE_LIMITED, ("limit", limit))
                - count(&before, names::RATE_LIMITED, ("limit", limit)),
            refused,
            "{limit}: {after}"
        );
    }
    api.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_are_counted_by_reason() {
    let h = Harness::start().await;
    let api = h.api().await;
    let keys = ApiKeys::open(&h.nats.jetstream, 1).await.unwrap();
    let good = api.key(&h, Role::Billing, &[]).await;
    // The last character changed (to one it is not).
    let last = if good.ends_with('0') { '1' } else { '0' };
    let wrong = format!("{}{last}", &good[..good.len() - 1]);
    let revoked = keys
        .create(Role::Billing, Vec::new(), String::new())
        .await
        .unwrap();
    keys.revoke(&revoked.record.id).await.unwrap();
    let expired = keys
        .create_expiring(
            Role::Portal,
            vec!["acme".to_owned()],
            String::new(),
            Some("2000-01-01T00:00:00Z".parse().unwrap()),
        )
        .await
        .unwrap()
        .token;
    let before = scrape(&api).await;

    // Each reason a different number of times, so that no two can be taken for each other.
    let bearer = |token: &str| format!("Bearer {token}");
    let tries: [(&str, Vec<Option<String>>); 6] = [
        ("missing", vec![None]),
        (
            "malformed",
            vec![
                Some("Basic dXNlcjpwYXNz".to_owned()),
                Some(bearer("tally_nope")),
            ],
        ),
        (
            "unknown",
            vec![Some(bearer("tally_0123456789abcdef_00")); 3],
        ),
        ("wrong_secret", vec![Some(bearer(&wrong)); 4]),
        ("revoked", vec![Some(bearer(&revoked.token)); 5]),
        ("expired", vec![Some(bearer(&expired)); 6]),
    ];
    for (reason, headers) in &tries {
        for header in headers {
            let mut request = api.request(Method::GET, "/api/v1/overage?period=2026-11", None);
            if let Some(value) = header {
                request = request.header("authorization", value);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{reason}");
        }
    }
    // A valid key is no failure.
    let response = api
        .request(Method::GET, "/api/v1/overage?period=2026-11", Some(&good))
        .send()
        .await
        .unwrap();
    assert_ne!(response.status(), StatusCode::UNAUTHORIZED);

    let after = scrape(&api).await;
    for (reason, headers) in &tries {
        assert_eq!(
            count(&after, names::AUTH_FAILURES, ("reason", reason))
                - count(&before, names::AUTH_FAILURES, ("reason", reason)),
            headers.len() as f64,
            "{reason}: {after}"
        );
    }
    let total: f64 = samples(&after, names::AUTH_FAILURES)
        .iter()
        .map(|(_, v)| v)
        .sum::<f64>()
        - samples(&before, names::AUTH_FAILURES)
            .iter()
            .map(|(_, v)| v)
            .sum::<f64>();
    assert_eq!(total, 21.0, "{after}");
    api.stop.cancel();
}
