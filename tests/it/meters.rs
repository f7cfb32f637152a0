//! Meters through OpenMeter's routes over real HTTP: definitions created, listed, changed
//! and deleted as an OpenMeter client expects; every aggregation queried by customer, by
//! day in a time zone with a DST change, by a group-by and filtered by one, each answer
//! equal to what the test works out by hand from the events it sent; every bad input
//! refused naming its field; and the entitlement-value paths an OpenMeter client calls.

use std::collections::BTreeMap;

use crate::common::{Harness, TestApi};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tally::pipeline;
use tally_api::Role;

const CATALOG: &str = r#"
    [[plans]]
    id = "ai"
    name = "AI"
    [plans.features.prompt]
    kind = "metered"

    [[meters]]
    slug = "prompts"
    name = "Prompts"
    event_type = "prompt"
    aggregation = "COUNT"
    group_by = { model = "$.model" }
"#;

const CUSTOMERS: &str = r#"
    [[customers]]
    id = "ana"
    plan = "ai"

    [[customers]]
    id = "bo"
    plan = "ai"
"#;

/// One event as sent, with the New York day its time falls on (worked out by hand:
/// EDT is UTC-4 until 2026-11-01 06:00 UTC, EST UTC-5 after).
struct Sent {
    customer: &'static str,
    time: &'static str,
    ny_day: &'static str,
    tokens: Value,
    model: &'static str,
    user: &'static str,
}

fn sent() -> Vec<Sent> {
    let e = |customer, time, ny_day, tokens: Value, model, user| Sent {
        customer,
        time,
        ny_day,
        tokens,
        model,
        user,
    };
    vec![
        e(
            "ana",
            "2026-10-31T12:00:00Z",
            "2026-10-31",
            json!("100"),
            "gpt-4o",
            "u1",
        ),
        e(
            "ana",
            "2026-11-01T03:30:00Z",
            "2026-10-31",
            json!(50),
            "claude",
            "u1",
        ),
        // 01:30 New York time twice: EDT, then EST after the clocks went back.
        e(
            "ana",
            "2026-11-01T05:30:00Z",
            "2026-11-01",
            json!("7.5"),
            "gpt-4o",
            "u2",
        ),
        e(
            "ana",
            "2026-11-01T06:30:00Z",
            "2026-11-01",
            json!(12),
            "gpt-4o",
            "u1",
        ),
        e(
            "ana",
            "2026-11-02T04:30:00Z",
            "2026-11-01",
            json!("lots"),
            "claude",
            "u3",
        ),
        e(
            "ana",
            "2026-11-02T05:00:00Z",
            "2026-11-02",
            json!(3),
            "claude",
            "u2",
        ),
        e(
            "bo",
            "2026-11-01T12:00:00Z",
            "2026-11-01",
            json!(40),
            "gpt-4o",
            "b1",
        ),
        e(
            "bo",
            "2026-11-02T02:00:00Z",
            "2026-11-01",
            Value::Null,
            "gpt-4o",
            "b1",
        ),
        e(
            "bo",
            "2026-11-03T02:00:00Z",
            "2026-11-02",
            json!("8"),
            "claude",
            "b2",
        ),
    ]
}

/// The events as OpenMeter's clients send them: `data` of their own, `tokens` a string
/// or a number (or missing), no `feature` (the type names it) and no `quantity`.
fn cloud_events() -> Vec<Value> {
    let mut events: Vec<Value> = sent()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut data = json!({"model": s.model, "user_id": s.user});
            if !s.tokens.is_null() {
                data["tokens"] = s.tokens.clone();
            }
            json!({
                "specversion": "1.0", "id": format!("ev-{i}"), "source": "app",
                "type": "prompt", "subject": s.customer, "time": s.time, "data": data,
            })
        })
        .collect();
    // Not metered: a customer Tally does not know, and another type.
    events.push(json!({
        "specversion": "1.0", "id": "ev-zed", "source": "app", "type": "prompt",
        "subject": "zed", "time": "2026-11-01T12:00:00Z", "data": {"tokens": 1000, "model": "gpt-4o"},
    }));
    events.push(json!({
        "specversion": "1.0", "id": "ev-other", "source": "app", "type": "login",
        "subject": "ana", "time": "2026-11-01T12:00:00Z", "data": {"tokens": 1000},
    }));
    events
}

/// `tokens` as a number, where it is one.
fn tokens(s: &Sent) -> Option<f64> {
    match &s.tokens {
        Value::Number(n) => n.as_f64(),
        Value::String(t) => t.parse().ok(),
        _ => None,
    }
}

/// The value an aggregation gives over `events`, worked out here apart from Tally's
/// code; `None` where no event has a value.
fn expected(aggregation: &str, events: &[&Sent]) -> Option<f64> {
    let values: Vec<f64> = events.iter().filter_map(|s| tokens(s)).collect();
    match aggregation {
        "COUNT" => Some(events.len() as f64),
        "UNIQUE_COUNT" => {
            let users: std::collections::BTreeSet<_> = events.iter().map(|s| s.user).collect();
            Some(users.len() as f64)
        }
        _ if values.is_empty() => None,
        "SUM" => Some(values.iter().sum()),
        "AVG" => Some(values.iter().sum::<f64>() / values.len() as f64),
        "MIN" => values.iter().copied().reduce(f64::min),
        "MAX" => values.iter().copied().reduce(f64::max),
        "LATEST" => events
            .iter()
            .filter(|s| tokens(s).is_some())
            .max_by_key(|s| s.time)
            .and_then(|s| tokens(s)),
        other => panic!("{other}"),
    }
}

async fn call(
    api: &TestApi,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    call_as(api, &api.admin, method, path, body).await
}

async fn call_as(
    api: &TestApi,
    key: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut r = api.request(method, path, Some(key));
    if let Some(b) = body {
        r = r.json(&b);
    }
    let response = r.send().await.unwrap();
    let status = response.status();
    let bytes = response.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// A 400 naming `field`.
async fn refused(api: &TestApi, method: Method, path: &str, body: Option<Value>, field: &str) {
    let (status, problem) = call(api, method, path, body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {problem}");
    assert_eq!(problem["field"], field, "{path}: {problem}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meters_are_created_listed_changed_and_deleted_as_openmeter_clients_expect() {
    let h = Harness::start().await;
    let defs = h.define(CATALOG, CUSTOMERS).await;
    let api = h.api().await;

    // The file's meter is there, with an id and times given when it was stored.
    let (status, listed) = call(&api, Method::GET, "/api/v1/meters", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["slug"], "prompts");
    assert_eq!(listed[0]["eventType"], "prompt");
    assert_eq!(listed[0]["aggregation"], "COUNT");
    assert_eq!(listed[0]["id"].as_str().unwrap().len(), 26);
    assert!(listed[0]["createdAt"].is_string());

    let tokens = json!({
        "slug": "tokens", "name": "Tokens", "eventType": "prompt", "aggregation": "SUM",
        "valueProperty": "$.tokens", "groupBy": {"model": "$.model"},
    });
    let (status, created) = call(&api, Method::POST, "/api/v1/meters", Some(tokens.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["valueProperty"], "$.tokens");
    let (status, again) = call(&api, Method::POST, "/api/v1/meters", Some(tokens.clone())).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert_eq!(again["field"], "slug");
    for path in [
        "/api/v1/meters/tokens".to_owned(),
        format!("/api/v1/meters/{id}"),
    ] {
        let (status, got) = call(&api, Method::GET, &path, None).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(got, created, "{path}");
    }

    // Its name and group-bys change in place; what it measures cannot.
    let (status, changed) = call(
        &api,
        Method::PUT,
        "/api/v1/meters/tokens",
        Some(json!({"name": "LLM tokens", "groupBy": {"model": "$.model", "user": "$.user_id"}})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_eq!(changed["id"], id.as_str());
    assert_eq!(changed["name"], "LLM tokens");
    assert_eq!(changed["groupBy"]["user"], "$.user_id");
    assert_eq!(changed["createdAt"], created["createdAt"]);
    refused(
        &api,
        Method::PUT,
        "/api/v1/meters/tokens",
        Some(json!({"aggregation": "MAX"})),
        "aggregation",
    )
    .await;
    let mut other_measure = tokens.clone();
    other_measure["aggregation"] = json!("MAX");
    let file: tally_core::entitlement::Catalog =
        serde_json::from_value(json!({"meters": [other_measure]})).unwrap();
    let e = defs.apply_catalog(&file, "test").await.unwrap_err();
    assert!(e.to_string().contains("measures something else"), "{e}");

    // Each flaw names its field.
    let bad = |change: Value| {
        let mut m = json!({"slug": "x", "eventType": "prompt", "aggregation": "SUM", "valueProperty": "$.tokens"});
        for (k, v) in change.as_object().unwrap() {
            if v.is_null() {
                m.as_object_mut().unwrap().remove(k);
            } else {
                m[k] = v.clone();
            }
        }
        m
    };
    for (body, field) in [
        (bad(json!({"valueProperty": null})), "valueProperty"),
        (bad(json!({"valueProperty": "tokens"})), "valueProperty"),
        (bad(json!({"valueProperty": "$..tokens"})), "valueProperty"),
        (bad(json!({"aggregation": "COUNT"})), "valueProperty"),
        (bad(json!({"aggregation": "MEDIAN"})), "aggregation"),
        (bad(json!({"slug": "Not-A-Slug"})), "slug"),
        (bad(json!({"eventType": ""})), "eventType"),
        (bad(json!({"eventType": null})), "eventType"),
        (
            bad(json!({"groupBy": {"subject": "$.s"}})),
            "groupBy.subject",
        ),
        (bad(json!({"groupBy": {"model": "$[*]"}})), "groupBy.model"),
        (bad(json!({"window": "DAY"})), "window"),
    ] {
        refused(
            &api,
            Method::POST,
            "/api/v1/meters",
            Some(body.clone()),
            field,
        )
        .await;
    }

    // Deleted: gone from reads, kept for the record; its slug makes a new meter.
    let (status, _) = call(&api, Method::DELETE, "/api/v1/meters/tokens", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call(&api, Method::GET, "/api/v1/meters/tokens", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(&api, Method::DELETE, "/api/v1/meters/tokens", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, live) = call(&api, Method::GET, "/api/v1/meters", None).await;
    assert_eq!(live.as_array().unwrap().len(), 1);
    let (_, all) = call(
        &api,
        Method::GET,
        "/api/v1/meters?includeDeleted=true",
        None,
    )
    .await;
    let gone = all
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["slug"] == "tokens")
        .unwrap();
    assert!(gone["deletedAt"].is_string(), "{gone}");
    let (status, reborn) = call(&api, Method::POST, "/api/v1/meters", Some(tokens)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_ne!(reborn["id"], id.as_str());
    refused(
        &api,
        Method::GET,
        "/api/v1/meters?includeDeleted=maybe",
        None,
        "includeDeleted",
    )
    .await;
    refused(&api, Method::GET, "/api/v1/meters?limit=3", None, "limit").await;

    // Every change is audited with the key that made it.
    let (_, audit) = call(&api, Method::GET, "/api/v1/audit?kind=meter", None).await;
    let entries = audit["entries"].as_array().unwrap();
    // prompts (file), tokens created, changed, deleted, created again.
    assert_eq!(entries.len(), 5, "{audit}");
    assert!(entries[1]["actor"].as_str().unwrap().starts_with("key:"));
    assert!(entries[3]["after"]["deletedAt"].is_string());

    // A billing key reads meters but defines none.
    let billing = api.key(&h, Role::Billing, &[]).await;
    let (status, _) = call_as(&api, &billing, Method::GET, "/api/v1/meters/prompts", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call_as(
        &api,
        &billing,
        Method::DELETE,
        "/api/v1/meters/prompts",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// The lake after the events above went through the HTTP API and a worker; the API with
/// a meter of each aggregation.
async fn metered() -> (Harness, TestApi) {
    let h = Harness::start().await;
    h.define(CATALOG, CUSTOMERS).await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    let api = h.api().await;
    let response = api
        .request(Method::POST, "/api/v1/events", Some(&api.admin))
        .header("content-type", "application/cloudevents-batch+json")
        .json(&cloud_events())
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{}",
        response.text().await.unwrap()
    );
    h.drain(&pipeline, cloud_events().len() as u64).await;
    pipeline.shutdown().await.unwrap();
    for aggregation in ["SUM", "AVG", "MIN", "MAX", "LATEST"] {
        let meter = json!({
            "slug": format!("tokens_{}", aggregation.to_lowercase()), "eventType": "prompt",
            "aggregation": aggregation, "valueProperty": "$.tokens", "groupBy": {"model": "$.model"},
        });
        let (status, body) = call(&api, Method::POST, "/api/v1/meters", Some(meter)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let users = json!({
        "slug": "users", "eventType": "prompt", "aggregation": "UNIQUE_COUNT",
        "valueProperty": "$.user_id", "groupBy": {"model": "$.model"},
    });
    assert_eq!(
        call(&api, Method::POST, "/api/v1/meters", Some(users))
            .await
            .0,
        StatusCode::CREATED
    );
    (h, api)
}

/// The meters and their aggregations.
const METERS: [(&str, &str); 7] = [
    ("prompts", "COUNT"),
    ("users", "UNIQUE_COUNT"),
    ("tokens_sum", "SUM"),
    ("tokens_avg", "AVG"),
    ("tokens_min", "MIN"),
    ("tokens_max", "MAX"),
    ("tokens_latest", "LATEST"),
];

fn close(got: &Value, want: f64, what: &str) {
    let got = got.as_f64().unwrap_or_else(|| panic!("{what}: {got}"));
    assert!((got - want).abs() < 1e-9, "{what}: {got} ≠ {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_aggregation_answers_by_customer_day_and_group_by_as_worked_out_by_hand() {
    let (h, api) = metered().await;
    let events = sent();
    for (slug, aggregation) in METERS {
        // By customer over everything: one window per customer.
        let (status, body) = call(
            &api,
            Method::GET,
            &format!("/api/v1/meters/{slug}/query?groupBy=subject"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{slug}: {body}");
        let rows = body["data"].as_array().unwrap();
        let mut want = BTreeMap::new();
        for customer in ["ana", "bo"] {
            let theirs: Vec<&Sent> = events.iter().filter(|s| s.customer == customer).collect();
            if let Some(v) = expected(aggregation, &theirs) {
                want.insert(customer, v);
            }
        }
        assert_eq!(rows.len(), want.len(), "{slug}: {body}");
        for row in rows {
            let customer = row["subject"].as_str().unwrap();
            close(&row["value"], want[customer], &format!("{slug} {customer}"));
            assert_eq!(row["groupBy"], json!({}));
        }

        // By New York day and model, for ana: every window's bounds in local time.
        let (status, body) = call(
            &api,
            Method::GET,
            &format!(
                "/api/v1/meters/{slug}/query?subject=ana&windowSize=DAY&windowTimeZone=America/New_York&groupBy=model"
            ),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{slug}: {body}");
        assert_eq!(body["windowSize"], "DAY");
        let mut want: BTreeMap<(&str, &str), f64> = BTreeMap::new();
        let mut keys: Vec<(&str, &str)> = events
            .iter()
            .filter(|s| s.customer == "ana")
            .map(|s| (s.ny_day, s.model))
            .collect();
        keys.dedup();
        for (day, model) in keys {
            let these: Vec<&Sent> = events
                .iter()
                .filter(|s| s.customer == "ana" && s.ny_day == day && s.model == model)
                .collect();
            if let Some(v) = expected(aggregation, &these) {
                want.insert((day, model), v);
            }
        }
        let rows = body["data"].as_array().unwrap();
        let mut got = BTreeMap::new();
        for row in rows {
            assert!(row["subject"].is_null(), "not grouped by subject: {row}");
            let (start, end) = (
                row["windowStart"].as_str().unwrap(),
                row["windowEnd"].as_str().unwrap(),
            );
            let (day, bounds) = match start {
                "2026-10-31T00:00:00-04:00" => ("2026-10-31", "2026-11-01T00:00:00-04:00"),
                // The day the clocks go back has 25 hours.
                "2026-11-01T00:00:00-04:00" => ("2026-11-01", "2026-11-02T00:00:00-05:00"),
                "2026-11-02T00:00:00-05:00" => ("2026-11-02", "2026-11-03T00:00:00-05:00"),
                other => panic!("{slug}: a window starting {other}"),
            };
            assert_eq!(end, bounds, "{slug}: {row}");
            got.insert(
                (day, row["groupBy"]["model"].as_str().unwrap()),
                row["value"].clone(),
            );
        }
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{slug}: {body}"
        );
        for (k, v) in &want {
            close(&got[k], *v, &format!("{slug} {k:?}"));
        }

        // Filtered by a group-by value, as a GET and as a POST: the same answer.
        let path =
            format!("/api/v1/meters/{slug}/query?filterGroupBy[model]=claude&groupBy=subject");
        let (_, by_get) = call(&api, Method::GET, &path, None).await;
        let (status, by_post) = call(
            &api,
            Method::POST,
            &format!("/api/v1/meters/{slug}/query"),
            Some(json!({"filterGroupBy": {"model": ["claude"]}, "groupBy": ["subject"]})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{by_post}");
        assert_eq!(by_get, by_post, "{slug}");
        for row in by_get["data"].as_array().unwrap() {
            let customer = row["subject"].as_str().unwrap();
            let these: Vec<&Sent> = events
                .iter()
                .filter(|s| s.customer == customer && s.model == "claude")
                .collect();
            close(
                &row["value"],
                expected(aggregation, &these).unwrap(),
                &format!("{slug} claude {customer}"),
            );
        }
    }

    // A range: events from `from`, before `to`, the bounds echoed in every window.
    let (_, body) = call(
        &api,
        Method::GET,
        "/api/v1/meters/tokens_sum/query?from=2026-11-01T06:00:00Z&to=2026-11-02T05:00:00Z",
        None,
    )
    .await;
    let rows = body["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{body}");
    // ana 12 (06:30) and bo 40 (12:00); ana's "lots" and bo's missing tokens count nothing.
    close(&rows[0]["value"], 52.0, "range");
    assert_eq!(rows[0]["windowStart"], "2026-11-01T06:00:00Z");
    assert_eq!(rows[0]["windowEnd"], "2026-11-02T05:00:00Z");
    assert_eq!(body["from"], "2026-11-01T06:00:00Z");

    // The values a group-by took.
    let (status, values) = call(
        &api,
        Method::GET,
        "/api/v1/meters/tokens_sum/group-by/model/values",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(values, json!(["claude", "gpt-4o"]));
    let (_, customers) = call(
        &api,
        Method::GET,
        "/api/v1/meters/prompts/group-by/subject/values",
        None,
    )
    .await;
    assert_eq!(
        customers,
        json!(["ana", "bo"]),
        "zed is unknown: not metered"
    );

    // `tally meters query` prints what the API answers, JSON and CSV.
    let path = "/api/v1/meters/tokens_max/query?windowSize=DAY&windowTimeZone=America/New_York&groupBy=subject&groupBy=model";
    let (_, by_api) = call(&api, Method::GET, path, None).await;
    let args = [
        "meters",
        "query",
        "tokens_max",
        "--window",
        "DAY",
        "--time-zone",
        "America/New_York",
        "--group-by",
        "subject",
        "--group-by",
        "model",
        "--format",
    ];
    let by_cli: Value = serde_json::from_slice(&h.cli(&[&args[..], &["json"]].concat())).unwrap();
    assert_eq!(by_cli, by_api);
    let listed = String::from_utf8(h.cli(&["meters", "list"])).unwrap();
    assert!(
        listed.contains("tokens_latest") && listed.contains("LATEST"),
        "{listed}"
    );

    // CSV, as `Accept` asks.
    let response = api
        .request(
            Method::GET,
            "/api/v1/meters/prompts/query?groupBy=subject",
            Some(&api.admin),
        )
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let csv = response.text().await.unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "window_start,window_end,subject,customer_id,value"
    );
    assert!(lines[1].contains(",ana,,6"), "{csv}");
    assert!(lines[2].contains(",bo,,3"), "{csv}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_name_their_parameter_and_keys_read_only_their_customers() {
    let (h, api) = metered().await;

    // The events list: the newest first, filtered as OpenMeter filters it.
    let (status, listed) = call(&api, Method::GET, "/api/v1/events?subject=an&limit=3", None).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let times: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"]["time"].as_str().unwrap())
        .collect();
    assert_eq!(
        times,
        [
            "2026-11-02T05:00:00Z",
            "2026-11-02T04:30:00Z",
            "2026-11-01T12:00:00Z"
        ]
    );
    let newest = &listed[0];
    assert_eq!(newest["event"]["id"], "ev-5");
    assert_eq!(newest["event"]["subject"], "ana");
    assert_eq!(
        newest["event"]["data"],
        json!({"tokens": 3, "model": "claude", "user_id": "u2"})
    );
    assert_eq!(newest["decision"], "accepted");
    let (_, bo) = call(
        &api,
        Method::GET,
        "/api/v1/events?customerId=bo&from=2026-11-02T00:00:00Z",
        None,
    )
    .await;
    let ids: Vec<&str> = bo
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["ev-8", "ev-7"]);
    assert!(newest.get("validationError").is_none(), "{newest}");
    // ana's "lots" and bo's missing tokens: each numeric meter says why it reads nothing.
    let (_, lots) = call(&api, Method::GET, "/api/v1/events?id=ev-4", None).await;
    let why = lots[0]["validationError"].as_str().unwrap();
    assert!(
        why.contains(r#"data.tokens is "lots", not a number: meter tokens_sum"#),
        "{why}"
    );
    let (_, missing) = call(&api, Method::GET, "/api/v1/events?id=ev-7", None).await;
    let why = missing[0]["validationError"].as_str().unwrap();
    assert!(why.contains("data.tokens is missing"), "{why}");
    let (_, zed) = call(&api, Method::GET, "/api/v1/events?id=zed", None).await;
    assert_eq!(zed[0]["decision"], "unknown_customer");
    refused(&api, Method::GET, "/api/v1/events?limit=500", None, "limit").await;
    refused(&api, Method::GET, "/api/v1/events?to=soon", None, "to").await;
    refused(
        &api,
        Method::GET,
        "/api/v1/events?type=prompt",
        None,
        "type",
    )
    .await;

    let q = "/api/v1/meters/tokens_sum/query";
    for (query, field) in [
        ("windowSize=WEEK", "windowSize"),
        ("windowTimeZone=Mars/Olympus", "windowTimeZone"),
        ("from=yesterday", "from"),
        ("from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z", "to"),
        ("groupBy=colour", "groupBy"),
        ("filterGroupBy[colour]=red", "filterGroupBy"),
        ("filterGroupBy=red", "filterGroupBy"),
        ("window=DAY", "window"),
    ] {
        refused(&api, Method::GET, &format!("{q}?{query}"), None, field).await;
    }
    refused(
        &api,
        Method::POST,
        q,
        Some(json!({"windowSize": "YEAR"})),
        "windowSize",
    )
    .await;
    refused(
        &api,
        Method::POST,
        q,
        Some(json!({"groupBy": "model"})),
        "groupBy",
    )
    .await;
    refused(&api, Method::POST, q, Some(json!({"colour": 1})), "colour").await;
    let (status, _) = call(&api, Method::GET, "/api/v1/meters/nothing/query", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, problem) = call(
        &api,
        Method::GET,
        "/api/v1/meters/tokens_sum/group-by/colour/values",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(problem["field"], "groupByKey");
    let response = api
        .request(Method::GET, q, Some(&api.admin))
        .header("accept", "image/png")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_ACCEPTABLE);

    // A key limited to ana reads ana's usage only; asking for bo is refused.
    let sdk = api.key(&h, Role::Sdk, &["ana"]).await;
    let (status, body) = call_as(
        &api,
        &sdk,
        Method::GET,
        &format!("{q}?groupBy=subject"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let rows = body["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{body}");
    assert_eq!(rows[0]["subject"], "ana");
    let (status, _) = call_as(&api, &sdk, Method::GET, &format!("{q}?subject=bo"), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The portal's query: its own customer's, whatever it asks.
    let portal = api.key(&h, Role::Portal, &["bo"]).await;
    let path = "/api/v1/portal/meters/tokens_sum/query?groupBy=subject&windowSize=MONTH";
    let (status, body) = call_as(&api, &portal, Method::GET, path, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let rows = body["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{body}");
    assert_eq!(rows[0]["subject"], "bo");
    close(&rows[0]["value"], 48.0, "bo's November");
    assert_eq!(rows[0]["windowStart"], "2026-11-01T00:00:00Z");
    assert_eq!(rows[0]["windowEnd"], "2026-12-01T00:00:00Z");
    let (status, _) = call_as(
        &api,
        &portal,
        Method::GET,
        "/api/v1/portal/meters/tokens_sum/query?subject=ana",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = call_as(
        &api,
        &portal,
        Method::GET,
        "/api/v1/meters/tokens_sum/query",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entitlement_values_answer_on_openmeters_paths() {
    let h = Harness::start().await;
    h.define(CATALOG, CUSTOMERS).await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    h.send("ana", "prompt", 4, 1, "2026-11-10T10:00:00Z", None)
        .await;
    h.drain(&pipeline, 4).await;
    let api = h.api_with(pipeline.local_checks.clone()).await;
    let at = "time=2026-11-10T12:00:00Z";
    let (status, one) = call(
        &api,
        Method::GET,
        &format!("/api/v1/customers/ana/entitlements/prompt?{at}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["hasAccess"], true);
    close(&one["usage"], 4.0, "usage");
    for path in [
        "/api/v1/customers/ana/entitlements/prompt/value",
        "/api/v2/customers/ana/entitlements/prompt/value",
        "/api/v1/subjects/ana/entitlements/prompt/value",
    ] {
        let (status, value) = call(&api, Method::GET, &format!("{path}?{at}"), None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {value}");
        assert_eq!(value, one, "{path}");
    }
    let (status, problem) = call(
        &api,
        Method::GET,
        "/api/v2/customers/nobody/entitlements/prompt/value",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(problem["field"], "customer");
    pipeline.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_metering_alone_customers_without_a_definition_are_metered() {
    let mut h = Harness::start().await;
    h.config.ingest.meter_unknown_customers = true;
    // A meter and no plan, no customer.
    h.define(CATALOG, "").await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    let api = h.api().await;
    let events: Vec<Value> = cloud_events()
        .into_iter()
        .filter(|e| e["type"] == "prompt")
        .collect();
    let response = api
        .request(Method::POST, "/api/v1/events", Some(&api.admin))
        .header("content-type", "application/cloudevents-batch+json")
        .json(&events)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    h.drain(&pipeline, events.len() as u64).await;
    pipeline.shutdown().await.unwrap();

    let (status, body) = call(
        &api,
        Method::GET,
        "/api/v1/meters/prompts/query?groupBy=subject",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let counted: BTreeMap<String, f64> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["subject"].as_str().unwrap().to_owned(),
                r["value"].as_f64().unwrap(),
            )
        })
        .collect();
    // Every prompt event, zed's included: nobody has a definition.
    let mut want = BTreeMap::new();
    for e in &events {
        *want
            .entry(e["subject"].as_str().unwrap().to_owned())
            .or_insert(0.0) += 1.0;
    }
    assert_eq!(counted, want);
    // Decided as such in the lake, and billed nowhere.
    let (status, rows) = call(
        &api,
        Method::POST,
        "/api/v1/sql",
        Some(json!({"query": "SELECT decision, CAST(COUNT(*) AS BIGINT) AS n FROM events GROUP BY decision"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{rows}");
    assert_eq!(rows, json!([{"decision": "metered", "n": events.len()}]));
    let (status, invoices) = call(&api, Method::GET, "/api/v1/billing?period=2026-11", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(invoices, json!([]));
}

const BOUND: &str = r#"
    [[plans]]
    id = "ci"
    name = "CI"
    [plans.features.build_minutes]
    kind = "metered"
    limit = 100
    [plans.features.concurrent_builds]
    kind = "metered"
    limit = 3
    period = "day"
    [plans.features.main_builds]
    kind = "metered"
    limit = 1
    enforcement = "soft"

    [[meters]]
    slug = "build_minutes"
    event_type = "build"
    aggregation = "SUM"
    value_property = "$.minutes"
    group_by = { repo = "$.repo" }

    [[meters]]
    slug = "running"
    event_type = "build"
    aggregation = "MAX"
    value_property = "$.running"

    [[meters]]
    slug = "builds"
    event_type = "build"
    aggregation = "COUNT"
    group_by = { repo = "$.repo" }

    [[features]]
    key = "build_minutes"
    meter = "build_minutes"

    [[features]]
    key = "concurrent_builds"
    meter = "running"

    [[features]]
    key = "main_builds"
    meterSlug = "builds"
    meterGroupByFilters = { repo = "main" }
"#;

/// Publishes `build` events of ana's as one batch: (id, minutes, running, repo), a minute
/// apart from 2026-11-10 10:00 UTC on.
async fn builds(h: &Harness, events: &[(&str, Value, u32, &str)]) {
    let batch: Vec<Value> = events
        .iter()
        .enumerate()
        .map(|(i, (id, minutes, running, repo))| {
            json!({
                "specversion": "1.0", "id": id, "source": "ci", "type": "build", "subject": "ana",
                "time": format!("2026-11-10T10:{i:02}:00Z"),
                "data": {"minutes": minutes, "running": running, "repo": repo},
            })
        })
        .collect();
    h.nats
        .jetstream
        .publish(
            tally_core::subject::events_subject("ana"),
            serde_json::to_vec(&batch).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Usage of ana's feature as the entitlement-value route reports it.
async fn usage_of(api: &TestApi, feature: &str) -> f64 {
    let (status, value) = call(
        api,
        Method::GET,
        &format!("/api/v1/customers/ana/entitlements/{feature}/value?time=2026-11-10T12:00:00Z"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{feature}: {value}");
    value["usage"].as_f64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_bound_to_meters_enforce_what_the_meters_read_through_a_restart() {
    let h = Harness::start().await;
    h.define(BOUND, "[[customers]]\nid = \"ana\"\nplan = \"ci\"\n")
        .await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    builds(
        &h,
        &[
            ("b1", json!(30), 1, "main"),
            ("b2", json!("50"), 3, "docs"),
            // A fourth concurrent build: refused whole, its minutes not counted either.
            ("b3", json!(10), 4, "docs"),
            // A value the minutes meter cannot read: dead-lettered, nothing else lost.
            ("b4", json!("soon"), 1, "main"),
            // 80 + 30 minutes would pass the 100 allowed.
            ("b5", json!(30), 2, "docs"),
            // 100 minutes exactly; the second build of `main` is over its soft limit.
            ("b6", json!(20), 2, "main"),
        ],
    )
    .await;
    h.drain(&pipeline, 5).await;
    let dead = h.dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        (dead[0].reason.as_str(), dead[0].field.as_deref()),
        ("unreadable_value", Some("data.minutes"))
    );
    assert!(
        dead[0].error.contains("\"soon\"") && dead[0].error.contains("build_minutes"),
        "{}",
        dead[0].error
    );
    let api = h.api_with(pipeline.local_checks.clone()).await;
    let (status, rows) = call(
        &api,
        Method::POST,
        "/api/v1/sql",
        Some(json!({"query": "SELECT event_id, decision FROM events ORDER BY event_id"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{rows}");
    assert_eq!(
        rows,
        json!([
            {"event_id": "b1", "decision": "accepted"},
            {"event_id": "b2", "decision": "accepted"},
            {"event_id": "b3", "decision": "limit_reached"},
            {"event_id": "b5", "decision": "limit_reached"},
            {"event_id": "b6", "decision": "overage"},
        ])
    );
    assert_eq!(usage_of(&api, "build_minutes").await, 100.0);
    assert_eq!(usage_of(&api, "concurrent_builds").await, 3.0);
    assert_eq!(usage_of(&api, "main_builds").await, 2.0);
    // The meters, queried over the lake, read what the entitlements counted.
    for (meter, want) in [("build_minutes", 100.0), ("running", 3.0)] {
        let (status, body) = call(
            &api,
            Method::GET,
            &format!("/api/v1/meters/{meter}/query?filterCustomerId=ana"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        close(&body["data"][0]["value"], want, meter);
    }
    pipeline.shutdown().await.unwrap();

    // After a restart the counts stand: one more minute is refused.
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    let api = h.api_with(pipeline.local_checks.clone()).await;
    // Reserve-and-record answers an unreadable value at once, naming the field.
    let unreadable = json!({
        "specversion": "1.0", "id": "r1", "source": "ci", "type": "build", "subject": "ana",
        "time": "2026-11-10T11:00:00Z", "data": {"running": 1},
    });
    let refused = tally_ingest::record::record(
        &h.nats.client,
        h.config.ingest.partitions,
        "ana",
        serde_json::to_vec(&unreadable).unwrap(),
        std::time::Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(
        (refused.field.as_deref(), refused.has_access),
        (Some("data.minutes"), false),
        "{refused:?}"
    );
    builds(&h, &[("b7", json!(1), 1, "docs")]).await;
    h.drain(&pipeline, 6).await;
    assert_eq!(usage_of(&api, "build_minutes").await, 100.0);
    let (_, rows) = call(
        &api,
        Method::POST,
        "/api/v1/sql",
        Some(json!({"query": "SELECT decision FROM events WHERE event_id = 'b7'"})),
    )
    .await;
    assert_eq!(rows, json!([{"decision": "limit_reached"}]));
    pipeline.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_are_created_refused_enforced_and_archived_as_openmeter_clients_expect() {
    let h = Harness::start().await;
    let catalog = format!(
        "{CATALOG}\n[plans.features.gpt_prompts]\nkind = \"metered\"\nlimit = 1\n\n\
         [[meters]]\nslug = \"tokens_avg\"\nevent_type = \"prompt\"\naggregation = \"AVG\"\n\
         value_property = \"$.tokens\"\n"
    );
    h.define(&catalog, CUSTOMERS).await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    let api = h.api().await;
    let feature = json!({
        "key": "gpt_prompts", "name": "GPT prompts", "meterSlug": "prompts",
        "meterGroupByFilters": {"model": "gpt-4o"}, "metadata": {"team": "ml"},
    });
    let (status, created) = call(
        &api,
        Method::POST,
        "/api/v1/features",
        Some(feature.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 26, "{created}");
    assert_eq!(created["meterGroupByFilters"], json!({"model": "gpt-4o"}));
    assert!(created["createdAt"].is_string(), "{created}");
    let (status, again) = call(&api, Method::POST, "/api/v1/features", Some(feature)).await;
    assert_eq!(
        (status, again["field"].as_str()),
        (StatusCode::CONFLICT, Some("key")),
        "{again}"
    );
    for (body, field, says) in [
        (
            json!({"key": "x", "meterSlug": "nope"}),
            "meterSlug",
            "no meter",
        ),
        (
            json!({"key": "x", "meterSlug": "tokens_avg"}),
            "meterSlug",
            "AVG",
        ),
        (
            json!({"key": "x", "meterSlug": "prompts", "meterGroupByFilters": {"repo": "a"}}),
            "meterGroupByFilters.repo",
            "no group-by",
        ),
        (json!({"key": "", "meterSlug": "prompts"}), "key", "empty"),
    ] {
        let (status, problem) =
            call(&api, Method::POST, "/api/v1/features", Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {problem}");
        assert_eq!(problem["field"], field, "{body}: {problem}");
        assert!(
            problem["detail"].as_str().unwrap().contains(says),
            "{problem}"
        );
    }
    let (_, listed) = call(&api, Method::GET, "/api/v1/features", None).await;
    assert_eq!(listed, json!([created]));
    for path in [
        format!("/api/v1/features/{id}"),
        "/api/v1/features/gpt_prompts".to_owned(),
    ] {
        let (status, one) = call(&api, Method::GET, &path, None).await;
        assert_eq!((status, &one), (StatusCode::OK, &created), "{path}");
    }

    // Bound: ana's second gpt-4o prompt is over the limit of 1; a claude prompt is not the
    // feature's, and counts for its own (`prompt`, unlimited).
    let prompt = |id: &str, model: &str| {
        json!({
            "specversion": "1.0", "id": id, "source": "app", "type": "prompt", "subject": "ana",
            "time": "2026-11-10T10:00:00Z", "data": {"model": model, "tokens": 5},
        })
    };
    let send = |events: Vec<Value>| {
        api.request(Method::POST, "/api/v1/events", Some(&api.admin))
            .header("content-type", "application/cloudevents-batch+json")
            .json(&events)
            .send()
    };
    let response = send(vec![
        prompt("p1", "gpt-4o"),
        prompt("p2", "gpt-4o"),
        prompt("p3", "claude"),
    ])
    .await
    .unwrap();
    assert!(response.status().is_success());
    h.drain(&pipeline, 3).await;
    // Archived, it binds nothing: gpt-4o prompts count for `prompt` again.
    let (status, _) = call(&api, Method::DELETE, "/api/v1/features/gpt_prompts", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, gone) = call(&api, Method::GET, &format!("/api/v1/features/{id}"), None).await;
    assert_eq!(
        (status, gone["field"].as_str()),
        (StatusCode::NOT_FOUND, Some("featureId"))
    );
    let (_, listed) = call(
        &api,
        Method::GET,
        "/api/v1/features?includeArchived=true",
        None,
    )
    .await;
    assert!(listed[0]["archivedAt"].is_string(), "{listed}");
    let response = send(vec![prompt("p4", "gpt-4o")]).await.unwrap();
    assert!(response.status().is_success());
    h.drain(&pipeline, 4).await;
    let (status, rows) = call(
        &api,
        Method::POST,
        "/api/v1/sql",
        Some(json!({"query": "SELECT event_id, decision FROM events ORDER BY event_id"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{rows}");
    assert_eq!(
        rows,
        json!([
            {"event_id": "p1", "decision": "accepted"},
            {"event_id": "p2", "decision": "limit_reached"},
            {"event_id": "p3", "decision": "accepted"},
            {"event_id": "p4", "decision": "accepted"},
        ])
    );
    pipeline.shutdown().await.unwrap();
}
