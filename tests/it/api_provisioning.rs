//! The provisioning API through real HTTP against a real nats-server, as a CRM uses it:
//! definitions put and read back with their audit trail, every bad input refused naming
//! its field, orders provisioned once per Idempotency-Key, suspensions and cancellations
//! applied live by the workers, and the routes closed to every other role.

use crate::common;
use crate::common::{Harness, TestApi};
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tally::pipeline;
use tally_api::Role;

/// A response: status, JSON body (`Null` when empty), headers and the raw bytes.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: Value,
    headers: HeaderMap,
    raw: Vec<u8>,
}

async fn send(request: reqwest::RequestBuilder) -> Reply {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let raw = response.bytes().await.unwrap().to_vec();
    let body = if raw.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&raw).unwrap_or_else(|e| {
            panic!(
                "{status}: not JSON ({e}): {}",
                String::from_utf8_lossy(&raw)
            )
        })
    };
    Reply {
        status,
        body,
        headers,
        raw,
    }
}

/// `method path` with `key`, and a JSON body when given.
async fn call(api: &TestApi, method: Method, path: &str, key: &str, body: Option<Value>) -> Reply {
    let request = api.request(method, path, Some(key));
    send(match body {
        Some(b) => request.json(&b),
        None => request,
    })
    .await
}

/// A `POST` with an `Idempotency-Key`.
async fn post_keyed(api: &TestApi, path: &str, key: &str, idempotency: &str, body: Value) -> Reply {
    send(
        api.request(Method::POST, path, Some(key))
            .header("Idempotency-Key", idempotency)
            .json(&body),
    )
    .await
}

/// The id part of a `tally_<id>_<secret>` token.
fn key_id(token: &str) -> String {
    let rest = token.strip_prefix("tally_").unwrap();
    rest.split_once('_').unwrap().0.to_owned()
}

fn assert_ok(reply: &Reply, status: u16) {
    assert_eq!(reply.status, status, "{reply:?}");
}

/// The problem+json a refused request gets, naming `field`.
fn assert_problem(reply: &Reply, status: u16, field: Option<&str>, what: &str) {
    assert_eq!(reply.status, status, "{what}: {:?}", reply.body);
    assert_eq!(
        reply.headers["content-type"], "application/problem+json",
        "{what}"
    );
    assert_eq!(reply.body["status"], status, "{what}");
    assert_eq!(
        reply.body.get("field").and_then(Value::as_str),
        field,
        "{what}: {}",
        reply.body
    );
}

/// The audit entries of one customer.
async fn audit_of(api: &TestApi, key: &str, customer: &str) -> Vec<Value> {
    let reply = call(
        api,
        Method::GET,
        &format!("/api/v1/audit?customer={customer}"),
        key,
        None,
    )
    .await;
    assert_ok(&reply, 200);
    reply.body["entries"].as_array().unwrap().clone()
}

/// A plan with a metered `calls` feature and SSO, its SKU, and an add-on adding calls.
async fn catalogue(api: &TestApi, key: &str) {
    for (id, limit) in [("free", 100), ("pro", 1000)] {
        let plan = json!({
            "name": id,
            "features": {
                "calls": {"kind": "metered", "limit": limit},
                "sso": {"kind": "boolean", "enabled": id == "pro"},
            }
        });
        let reply = call(
            api,
            Method::PUT,
            &format!("/api/v1/plans/{id}"),
            key,
            Some(plan),
        )
        .await;
        assert_ok(&reply, 201);
    }
    let pack = json!({"name": "500 calls", "extra": {"calls": 500}});
    assert_ok(
        &call(api, Method::PUT, "/api/v1/addons/pack", key, Some(pack)).await,
        201,
    );
    for (sku, body) in [
        ("FREE", json!({"plan": "free"})),
        ("PRO-M", json!({"plan": "pro"})),
        ("PACK-5", json!({"addon": {"id": "pack", "quantity": 5}})),
    ] {
        let reply = call(
            api,
            Method::PUT,
            &format!("/api/v1/skus/{sku}"),
            key,
            Some(body),
        )
        .await;
        assert_ok(&reply, 201);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_round_trip_and_every_change_is_audited_with_its_key() {
    let h = Harness::start().await;
    let api = h.api().await;
    let key = api.key(&h, Role::Provisioning, &[]).await;
    let actor = format!("key:{}", key_id(&key));

    // A plan: created (201) with its defaults filled in, then unchanged (200), then changed.
    let plan = json!({"name": "Pro", "features": {"calls": {"kind": "metered", "limit": 1000}}});
    let created = call(
        &api,
        Method::PUT,
        "/api/v1/plans/pro",
        &key,
        Some(plan.clone()),
    )
    .await;
    assert_ok(&created, 201);
    assert_eq!(created.body["id"], "pro");
    assert_eq!(
        created.body["features"]["calls"]["thresholds"],
        json!([80, 100])
    );
    let again = call(&api, Method::PUT, "/api/v1/plans/pro", &key, Some(plan)).await;
    assert_ok(&again, 200);
    assert_eq!(again.body, created.body);
    let renamed = json!({"id": "pro", "name": "Pro 2026", "features": {"calls": {"kind": "metered", "limit": 2000}}});
    let updated = call(&api, Method::PUT, "/api/v1/plans/pro", &key, Some(renamed)).await;
    assert_ok(&updated, 200);
    let read = call(&api, Method::GET, "/api/v1/plans/pro", &key, None).await;
    assert_ok(&read, 200);
    assert_eq!(read.body, updated.body);
    assert_eq!(read.body["features"]["calls"]["limit"], 2000.0);
    let list = call(&api, Method::GET, "/api/v1/plans", &key, None).await;
    assert_eq!(list.body, json!({"plans": [updated.body]}));
    let missing = call(&api, Method::GET, "/api/v1/plans/nope", &key, None).await;
    assert_problem(&missing, 404, Some("id"), "a missing plan");

    // An add-on and two SKU mappings.
    let pack = json!({"name": "500 calls", "extra": {"calls": 500}, "seats": 2});
    let pack = call(&api, Method::PUT, "/api/v1/addons/pack", &key, Some(pack)).await;
    assert_ok(&pack, 201);
    assert_eq!(
        call(&api, Method::GET, "/api/v1/addons/pack", &key, None)
            .await
            .body,
        pack.body
    );
    assert_eq!(
        call(&api, Method::GET, "/api/v1/addons", &key, None)
            .await
            .body,
        json!({"addons": [pack.body]})
    );
    let sku = call(
        &api,
        Method::PUT,
        "/api/v1/skus/PRO-M",
        &key,
        Some(json!({"plan": "pro"})),
    )
    .await;
    assert_ok(&sku, 201);
    assert_eq!(sku.body, json!({"sku": "PRO-M", "plan": "pro"}));
    let addon_sku = json!({"sku": "PACK-5", "addon": {"id": "pack", "quantity": 5}});
    assert_ok(
        &call(
            &api,
            Method::PUT,
            "/api/v1/skus/PACK-5",
            &key,
            Some(addon_sku.clone()),
        )
        .await,
        201,
    );
    assert_ok(
        &call(
            &api,
            Method::PUT,
            "/api/v1/skus/PACK-5",
            &key,
            Some(addon_sku.clone()),
        )
        .await,
        200,
    );
    assert_eq!(
        call(&api, Method::GET, "/api/v1/skus/PACK-5", &key, None)
            .await
            .body,
        addon_sku
    );
    assert_eq!(
        call(&api, Method::GET, "/api/v1/skus", &key, None)
            .await
            .body,
        json!({"skus": [addon_sku, sku.body]})
    );

    // A customer: created, then its seats changed.
    let acme = json!({"plan": "pro", "addons": [{"id": "pack"}]});
    let created = call(
        &api,
        Method::PUT,
        "/api/v1/customers/acme",
        &key,
        Some(acme),
    )
    .await;
    assert_ok(&created, 201);
    assert_eq!(
        created.body["addons"],
        json!([{"id": "pack", "quantity": 1}])
    );
    assert_eq!(created.body["status"], "active");
    let seats = json!({"id": "acme", "plan": "pro", "addons": [{"id": "pack"}], "seats": 3});
    let updated = call(
        &api,
        Method::PUT,
        "/api/v1/customers/acme",
        &key,
        Some(seats),
    )
    .await;
    assert_ok(&updated, 200);
    let read = call(&api, Method::GET, "/api/v1/customers/acme", &key, None).await;
    assert_eq!(read.body, updated.body);
    assert_eq!(read.body["seats"], 3);
    assert_eq!(
        call(&api, Method::GET, "/api/v1/customers", &key, None)
            .await
            .body,
        json!({"customers": [updated.body]})
    );
    let missing = call(&api, Method::GET, "/api/v1/customers/nobody", &key, None).await;
    assert_problem(&missing, 404, Some("customer"), "a missing customer");

    // The audit trail: who, what, before and after; one entry per change.
    let entries = audit_of(&api, &key, "acme").await;
    assert_eq!(entries.len(), 2, "{entries:#?}");
    for e in &entries {
        assert_eq!(e["actor"], actor);
        assert_eq!(
            (e["kind"].as_str(), e["id"].as_str()),
            (Some("customer"), Some("acme"))
        );
    }
    assert_eq!(entries[0]["before"], Value::Null);
    assert_eq!(entries[0]["after"], created.body);
    assert_eq!(entries[1]["before"], created.body);
    assert_eq!(entries[1]["after"], updated.body);

    let plans = call(&api, Method::GET, "/api/v1/audit?kind=plan", &key, None).await;
    let plans = plans.body["entries"].as_array().unwrap().clone();
    assert_eq!(
        plans.len(),
        2,
        "an unchanged put is not audited: {plans:#?}"
    );
    assert_eq!(plans[1]["before"]["name"], "Pro");
    assert_eq!(plans[1]["after"]["name"], "Pro 2026");
    let everything = call(&api, Method::GET, "/api/v1/audit", &key, None).await;
    let everything = everything.body["entries"].as_array().unwrap().clone();
    assert_eq!(everything.len(), 2 + 1 + 2 + 2);
    let oldest = call(&api, Method::GET, "/api/v1/audit?limit=1", &key, None).await;
    assert_eq!(oldest.body["entries"], json!([everything[0]]));
    // `from` is inclusive, `to` exclusive.
    let time = |i: usize| everything[i]["time"].as_str().unwrap().to_owned();
    let window = format!(
        "/api/v1/audit?from={}&to={}",
        urlencode(&time(3)),
        urlencode(&time(5))
    );
    let window = call(&api, Method::GET, &window, &key, None).await;
    assert_eq!(window.body["entries"], json!(everything[3..5]));
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_refused_naming_its_field_and_changes_nothing() {
    let mut h = Harness::start().await;
    h.config.api.max_body_bytes = 16 * 1024;
    let api = h.api().await;
    let key = api.key(&h, Role::Provisioning, &[]).await;
    catalogue(&api, &key).await;
    let order = json!({"customer": "acme", "sku": "PRO-M"});
    assert_ok(
        &call(&api, Method::POST, "/api/v1/orders", &key, Some(order)).await,
        201,
    );
    let audited = call(&api, Method::GET, "/api/v1/audit", &key, None)
        .await
        .body["entries"]
        .as_array()
        .unwrap()
        .len();

    let oversized = format!(r#"{{"name": "{}"}}"#, "x".repeat(20_000));
    let grant =
        r#""id": "g", "feature": "calls", "amount": 5, "effective": "2026-01-01T00:00:00Z""#;
    // (method, path, body, status, field)
    let cases: Vec<(Method, &str, String, u16, Option<&str>)> = vec![
        // Plans.
        (Method::PUT, "/api/v1/plans/p", "not json".into(), 400, None),
        (Method::PUT, "/api/v1/plans/p", r#"{"name": 5}"#.into(), 400, Some("name")),
        (Method::PUT, "/api/v1/plans/p", r#"{"name": "P", "feetures": {}}"#.into(), 400, Some("feetures")),
        (Method::PUT, "/api/v1/plans/p", "{}".into(), 400, Some("name")),
        (
            Method::PUT,
            "/api/v1/plans/p",
            r#"{"name": "P", "features": {"calls": {"kind": "metered", "limit": -1}}}"#.into(),
            400,
            Some("features.calls.limit"),
        ),
        (
            Method::PUT,
            "/api/v1/plans/p",
            r#"{"name": "P", "features": {"calls": {"kind": "metered", "thresholds": [0]}}}"#.into(),
            400,
            Some("features.calls.thresholds[0]"),
        ),
        (Method::PUT, "/api/v1/plans/p", r#"{"id": "q", "name": "P"}"#.into(), 400, Some("id")),
        (Method::PUT, "/api/v1/plans/p", oversized.clone(), 413, None),
        // Add-ons.
        (Method::PUT, "/api/v1/addons/a", "[".into(), 400, None),
        (Method::PUT, "/api/v1/addons/a", r#"{"name": "A", "extra": {"calls": "many"}}"#.into(), 400, Some("extra.calls")),
        (Method::PUT, "/api/v1/addons/a", r#"{"name": "A", "seat": 1}"#.into(), 400, Some("seat")),
        (Method::PUT, "/api/v1/addons/a", r#"{"extra": {}}"#.into(), 400, Some("name")),
        (Method::PUT, "/api/v1/addons/a", r#"{"name": "A", "extra": {"calls": -5}}"#.into(), 400, Some("extra.calls")),
        (Method::PUT, "/api/v1/addons/a", r#"{"id": "b", "name": "A"}"#.into(), 400, Some("id")),
        (Method::PUT, "/api/v1/addons/a", oversized.clone(), 413, None),
        // SKU mappings.
        (Method::PUT, "/api/v1/skus/S", "plan=pro".into(), 400, None),
        (Method::PUT, "/api/v1/skus/S", r#"{"plan": 5}"#.into(), 400, Some("plan")),
        (Method::PUT, "/api/v1/skus/S", r#"{"plan": "pro", "pln": 1}"#.into(), 400, Some("pln")),
        (Method::PUT, "/api/v1/skus/S", "{}".into(), 400, Some("plan")),
        (Method::PUT, "/api/v1/skus/S", r#"{"addon": {"quantity": 2}}"#.into(), 400, Some("addon.id")),
        (Method::PUT, "/api/v1/skus/S", r#"{"addon": {"id": "pack", "quantity": 0}}"#.into(), 400, Some("addon.quantity")),
        (Method::PUT, "/api/v1/skus/S", r#"{"addon": {"id": "pack", "quantity": -1}}"#.into(), 400, Some("addon.quantity")),
        (Method::PUT, "/api/v1/skus/S", r#"{"sku": "T", "plan": "pro"}"#.into(), 400, Some("sku")),
        (Method::PUT, "/api/v1/skus/S", r#"{"plan": "nope"}"#.into(), 400, Some("plan")),
        (Method::PUT, "/api/v1/skus/S", r#"{"addon": {"id": "nope"}}"#.into(), 400, Some("addon.id")),
        (Method::PUT, "/api/v1/skus/S", oversized.clone(), 413, None),
        // Customers.
        (Method::PUT, "/api/v1/customers/c", "{".into(), 400, None),
        (Method::PUT, "/api/v1/customers/c", r#"{"plan": ["pro"]}"#.into(), 400, Some("plan")),
        (Method::PUT, "/api/v1/customers/c", r#"{"plan": "pro", "plna": 1}"#.into(), 400, Some("plna")),
        (Method::PUT, "/api/v1/customers/c", "{}".into(), 400, Some("plan")),
        (Method::PUT, "/api/v1/customers/c", r#"{"plan": "pro", "anchor_day": 32}"#.into(), 400, Some("anchor_day")),
        (Method::PUT, "/api/v1/customers/c", r#"{"plan": "pro", "seats": -1}"#.into(), 400, Some("seats")),
        (Method::PUT, "/api/v1/customers/c", r#"{"plan": "pro", "status": "paused"}"#.into(), 400, Some("status")),
        (
            Method::PUT,
            "/api/v1/customers/c",
            format!(r#"{{"plan": "pro", "grants": [{{{grant}}}, {{{}}}]}}"#, grant.replace("5", "-5").replace("\"g\"", "\"h\"")),
            400,
            Some("grants[1].amount"),
        ),
        (Method::PUT, "/api/v1/customers/c", r#"{"id": "d", "plan": "pro"}"#.into(), 400, Some("id")),
        (Method::PUT, "/api/v1/customers/c", r#"{"plan": "nope"}"#.into(), 400, Some("plan")),
        (
            Method::PUT,
            "/api/v1/customers/c",
            r#"{"plan": "pro", "addons": [{"id": "pack"}, {"id": "nope"}]}"#.into(),
            400,
            Some("addons[1].id"),
        ),
        (Method::PUT, "/api/v1/customers/c", oversized.clone(), 413, None),
        // Orders.
        (Method::POST, "/api/v1/orders", "customer=acme".into(), 400, None),
        (Method::POST, "/api/v1/orders", r#"{"customer": "acme", "sku": "PACK-5", "quantity": "two"}"#.into(), 400, Some("quantity")),
        (Method::POST, "/api/v1/orders", r#"{"customer": "acme", "sku": "PACK-5", "qty": 2}"#.into(), 400, Some("qty")),
        (Method::POST, "/api/v1/orders", r#"{"customer": "acme"}"#.into(), 400, Some("sku")),
        (Method::POST, "/api/v1/orders", r#"{"customer": "acme", "sku": "PACK-5", "quantity": 0}"#.into(), 400, Some("quantity")),
        (Method::POST, "/api/v1/orders", r#"{"customer": "acme", "sku": "PACK-5", "quantity": -1}"#.into(), 400, Some("quantity")),
        (Method::POST, "/api/v1/orders", r#"{"customer": "acme", "sku": "PRO-M", "quantity": 2}"#.into(), 400, Some("quantity")),
        (Method::POST, "/api/v1/orders", r#"{"customer": "acme", "sku": "PRO-M", "anchor_day": 40}"#.into(), 400, Some("anchor_day")),
        (Method::POST, "/api/v1/orders", r#"{"customer": "acme", "sku": "PRO-M", "anchor_day": 400}"#.into(), 400, Some("anchor_day")),
        (Method::POST, "/api/v1/orders", r#"{"customer": "acme", "sku": "PRO-M", "starts_at": "yesterday"}"#.into(), 400, Some("starts_at")),
        (
            Method::POST,
            "/api/v1/orders",
            r#"{"customer": "new", "sku": "PRO-M", "starts_at": "2026-06-01T00:00:00Z", "ends_at": "2026-01-01T00:00:00Z"}"#.into(),
            400,
            Some("ends_at"),
        ),
        (Method::POST, "/api/v1/orders", r#"{"customer": "acme", "sku": "NOPE"}"#.into(), 400, Some("sku")),
        (Method::POST, "/api/v1/orders", r#"{"customer": "nobody", "sku": "PACK-5"}"#.into(), 400, Some("customer")),
        (Method::POST, "/api/v1/orders", r#"{"customer": "", "sku": "PRO-M"}"#.into(), 400, Some("customer")),
        (Method::POST, "/api/v1/orders", oversized.clone(), 413, None),
        // Grants.
        (Method::POST, "/api/v1/customers/acme/grants", "grant".into(), 400, None),
        (Method::POST, "/api/v1/customers/acme/grants", format!("{{{}}}", grant.replace("5", "\"x\"")), 400, Some("amount")),
        (Method::POST, "/api/v1/customers/acme/grants", format!(r#"{{{grant}, "expiry": "2027-01-01T00:00:00Z"}}"#), 400, Some("expiry")),
        (Method::POST, "/api/v1/customers/acme/grants", r#"{"id": "g"}"#.into(), 400, Some("feature")),
        (Method::POST, "/api/v1/customers/acme/grants", format!("{{{}}}", grant.replace("5", "-5")), 400, Some("amount")),
        (
            Method::POST,
            "/api/v1/customers/acme/grants",
            format!(r#"{{{grant}, "expires": "2025-01-01T00:00:00Z"}}"#),
            400,
            Some("expires"),
        ),
        (Method::POST, "/api/v1/customers/acme/grants", oversized.clone(), 413, None),
        (Method::POST, "/api/v1/customers/nobody/grants", format!("{{{grant}}}"), 404, Some("customer")),
        // Actions.
        (Method::POST, "/api/v1/customers/acme/suspend", "now".into(), 400, None),
        (Method::POST, "/api/v1/customers/acme/suspend", r#"{"reason": "unpaid"}"#.into(), 400, Some("reason")),
        (Method::POST, "/api/v1/customers/nobody/suspend", String::new(), 404, Some("customer")),
        (Method::POST, "/api/v1/customers/acme/resume", r#"{"at": 1}"#.into(), 400, Some("at")),
        (Method::POST, "/api/v1/customers/acme/cancel", r#"{"at": 5}"#.into(), 400, Some("at")),
        (Method::POST, "/api/v1/customers/acme/cancel", r#"{"when": "now"}"#.into(), 400, Some("when")),
        (Method::POST, "/api/v1/customers/acme/cancel", oversized.clone(), 413, None),
        (Method::DELETE, "/api/v1/customers/acme/addons/nope", String::new(), 404, Some("addon")),
        (Method::DELETE, "/api/v1/customers/nobody/addons/pack", String::new(), 404, Some("customer")),
        // Audit parameters.
        (Method::GET, "/api/v1/audit?limit=abc", String::new(), 400, Some("limit")),
        (Method::GET, "/api/v1/audit?limit=0", String::new(), 400, Some("limit")),
        (Method::GET, "/api/v1/audit?limit=10001", String::new(), 400, Some("limit")),
        (Method::GET, "/api/v1/audit?from=yesterday", String::new(), 400, Some("from")),
        (Method::GET, "/api/v1/audit?to=2026-13-01T00:00:00Z", String::new(), 400, Some("to")),
        (
            Method::GET,
            "/api/v1/audit?from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z",
            String::new(),
            400,
            Some("to"),
        ),
        (Method::GET, "/api/v1/audit?kind=price", String::new(), 400, Some("kind")),
        (Method::GET, "/api/v1/audit?customer=acme&kind=plan", String::new(), 400, Some("kind")),
        (Method::GET, "/api/v1/audit?cust=acme", String::new(), 400, Some("cust")),
    ];
    let mut wrong = Vec::new();
    for (method, path, body, status, field) in cases {
        let what = format!("{method} {path} {}", &body[..body.len().min(120)]);
        let request = api
            .request(method, path, Some(&key))
            .header("content-type", "application/json")
            .body(body);
        let reply = send(request).await;
        let named = reply.body.get("field").and_then(Value::as_str);
        let problem_json = reply.headers["content-type"] == "application/problem+json";
        if (reply.status, named, problem_json) != (status, field, true) {
            wrong.push(format!(
                "{what}\n  expected {status} {field:?}, got {} {}",
                reply.status, reply.body
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} refused wrongly:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // A cancellation before the customer's start would end it before it began.
    let later = json!({"plan": "pro", "valid_from": "2026-06-01T00:00:00Z"});
    assert_ok(
        &call(
            &api,
            Method::PUT,
            "/api/v1/customers/later",
            &key,
            Some(later),
        )
        .await,
        201,
    );
    let early = json!({"at": "2026-05-01T00:00:00Z"});
    let refused = call(
        &api,
        Method::POST,
        "/api/v1/customers/later/cancel",
        &key,
        Some(early),
    )
    .await;
    assert_problem(&refused, 400, Some("at"), "a cancellation before the start");

    // A bad Idempotency-Key is refused before anything happens.
    let order = json!({"customer": "acme", "sku": "PACK-5"});
    for bad in [String::new(), "k".repeat(256)] {
        let reply = post_keyed(&api, "/api/v1/orders", &key, &bad, order.clone()).await;
        assert_problem(
            &reply,
            400,
            Some("idempotency-key"),
            "a bad Idempotency-Key",
        );
    }

    // Nothing refused was written: only `later` was added to the audit trail.
    let entries = call(&api, Method::GET, "/api/v1/audit", &key, None)
        .await
        .body["entries"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(entries.len(), audited + 1, "{:#?}", &entries[audited..]);
    let acme = call(&api, Method::GET, "/api/v1/customers/acme", &key, None).await;
    assert_eq!(acme.body["addons"], json!([]));
    assert_eq!(acme.body["status"], "active");
    assert!(acme.body.get("valid_until").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_provisions_once_per_idempotency_key() {
    let h = Harness::start().await;
    let api = h.api().await;
    let key = api.key(&h, Role::Provisioning, &[]).await;
    catalogue(&api, &key).await;

    // A plan SKU creates the customer: a new subscription.
    let subscribe = json!({
        "customer": "acme", "sku": "PRO-M", "seats": 3,
        "starts_at": "2026-01-01T00:00:00Z", "anchor_day": 15
    });
    let created = call(&api, Method::POST, "/api/v1/orders", &key, Some(subscribe)).await;
    assert_ok(&created, 201);
    assert_eq!(created.body["change"], "created");
    assert!(
        created.body["order_id"]
            .as_str()
            .unwrap()
            .starts_with("ord_")
    );
    let customer = &created.body["customer"];
    assert_eq!(
        (
            customer["id"].as_str(),
            customer["plan"].as_str(),
            customer["seats"].as_u64()
        ),
        (Some("acme"), Some("pro"), Some(3))
    );
    assert_eq!(customer["valid_from"], "2026-01-01T00:00:00Z");
    assert_eq!(customer["anchor_day"], 15);

    // An add-on SKU adds quantity × the SKU's units, once per Idempotency-Key.
    let buy = json!({"customer": "acme", "sku": "PACK-5", "quantity": 2});
    let first = post_keyed(&api, "/api/v1/orders", &key, "crm-order-42", buy.clone()).await;
    assert_ok(&first, 201);
    assert_eq!(first.body["change"], "updated");
    assert_eq!(
        first.body["customer"]["addons"],
        json!([{"id": "pack", "quantity": 10}])
    );
    assert!(first.headers.get("idempotent-replayed").is_none());
    let retry = post_keyed(&api, "/api/v1/orders", &key, "crm-order-42", buy.clone()).await;
    assert_eq!(
        (retry.status, &retry.raw),
        (first.status, &first.raw),
        "the first response, again"
    );
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    let stored = call(&api, Method::GET, "/api/v1/customers/acme", &key, None).await;
    assert_eq!(
        stored.body["addons"],
        json!([{"id": "pack", "quantity": 10}])
    );
    assert_eq!(
        audit_of(&api, &key, "acme").await.len(),
        2,
        "created, then one add-on order"
    );

    // The same key for another request is a mistake the CRM must hear of.
    let other = json!({"customer": "acme", "sku": "PACK-5", "quantity": 3});
    let conflict = post_keyed(&api, "/api/v1/orders", &key, "crm-order-42", other).await;
    assert_problem(
        &conflict,
        409,
        Some("idempotency-key"),
        "the same key, another body",
    );
    // Keys are per API key: another key's "crm-order-42" is another order.
    let admin = post_keyed(
        &api,
        "/api/v1/orders",
        &api.admin,
        "crm-order-42",
        buy.clone(),
    )
    .await;
    assert_ok(&admin, 201);
    assert_eq!(
        admin.body["customer"]["addons"],
        json!([{"id": "pack", "quantity": 20}])
    );
    assert_ne!(admin.body["order_id"], first.body["order_id"]);

    // Concurrent retries of one order: one applies; the others get its response or 409.
    let racing = json!({"customer": "acme", "sku": "PACK-5"});
    let replies = futures::future::join_all(
        (0..8).map(|_| post_keyed(&api, "/api/v1/orders", &key, "crm-order-43", racing.clone())),
    )
    .await;
    let applied: Vec<&Reply> = replies.iter().filter(|r| r.status == 201).collect();
    assert!(!applied.is_empty(), "{replies:#?}");
    assert!(
        applied.iter().all(|r| r.raw == applied[0].raw),
        "{replies:#?}"
    );
    for r in replies.iter().filter(|r| r.status != 201) {
        assert_problem(r, 409, Some("idempotency-key"), "a concurrent retry");
    }
    let stored = call(&api, Method::GET, "/api/v1/customers/acme", &key, None).await;
    assert_eq!(
        stored.body["addons"],
        json!([{"id": "pack", "quantity": 25}])
    );
    assert_eq!(audit_of(&api, &key, "acme").await.len(), 4);

    // A refused request does not use up its key: fixed, it is applied.
    let typo = json!({"customer": "acme", "sku": "FRE"});
    let refused = post_keyed(&api, "/api/v1/orders", &key, "crm-order-44", typo).await;
    assert_problem(&refused, 400, Some("sku"), "an unknown SKU");
    let downgrade = json!({"customer": "acme", "sku": "FREE"});
    let fixed = post_keyed(&api, "/api/v1/orders", &key, "crm-order-44", downgrade).await;
    assert_ok(&fixed, 201);
    let customer = &fixed.body["customer"];
    assert_eq!(customer["plan"], "free");
    assert_eq!(
        customer["addons"],
        json!([{"id": "pack", "quantity": 25}]),
        "a downgrade keeps the add-ons"
    );
    assert_eq!(customer["seats"], 3);

    // An order equal to what is stored changes nothing.
    let same = json!({"customer": "acme", "sku": "FREE"});
    let unchanged = call(&api, Method::POST, "/api/v1/orders", &key, Some(same)).await;
    assert_ok(&unchanged, 201);
    assert_eq!(unchanged.body["change"], "unchanged");

    // Removing the add-on.
    let removed = call(
        &api,
        Method::DELETE,
        "/api/v1/customers/acme/addons/pack",
        &key,
        None,
    )
    .await;
    assert_ok(&removed, 200);
    assert_eq!(removed.body["addons"], json!([]));
    let entries = audit_of(&api, &key, "acme").await;
    assert_eq!(entries.len(), 6);
    assert_eq!(
        entries[5]["before"]["addons"],
        json!([{"id": "pack", "quantity": 25}])
    );
    assert_eq!(entries[5]["after"]["addons"], json!([]));
}

/// The decision a check of `feature` gets now, once a worker answers for the customer.
async fn decision(api: &TestApi, customer: &str, feature: &str) -> Option<String> {
    let path = format!("/api/v1/customers/{customer}/entitlements/{feature}");
    let reply = call(api, Method::GET, &path, &api.admin, None).await;
    (reply.status == 200).then(|| reply.body["decision"].as_str().unwrap().to_owned())
}

async fn await_decision(api: &TestApi, customer: &str, feature: &str, expected: &str) {
    common::until(
        &format!("{customer}'s {feature} decided {expected}"),
        || async { decision(api, customer, feature).await.as_deref() == Some(expected) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspensions_grants_and_cancellations_apply_live() {
    let h = Harness::start().await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    let api = h.api().await;
    let key = api.key(&h, Role::Provisioning, &[]).await;
    catalogue(&api, &key).await;
    let order = json!({"customer": "acme", "sku": "PRO-M"});
    assert_ok(
        &call(&api, Method::POST, "/api/v1/orders", &key, Some(order)).await,
        201,
    );
    await_decision(&api, "acme", "calls", "accepted").await;

    // Suspended: events would be `expired`, until resumed.
    let suspended = post_keyed(
        &api,
        "/api/v1/customers/acme/suspend",
        &key,
        "susp-1",
        json!({}),
    )
    .await;
    assert_ok(&suspended, 200);
    assert_eq!(suspended.body["status"], "suspended");
    await_decision(&api, "acme", "calls", "expired").await;
    let again = post_keyed(
        &api,
        "/api/v1/customers/acme/suspend",
        &key,
        "susp-1",
        json!({}),
    )
    .await;
    assert_eq!((again.status, &again.raw), (200, &suspended.raw));
    // The key was the suspension's: resuming with it is another request.
    let reused = post_keyed(
        &api,
        "/api/v1/customers/acme/resume",
        &key,
        "susp-1",
        json!({}),
    )
    .await;
    assert_problem(
        &reused,
        409,
        Some("idempotency-key"),
        "a suspension's key on a resume",
    );
    let resumed =
        send(api.request(Method::POST, "/api/v1/customers/acme/resume", Some(&key))).await;
    assert_ok(&resumed, 200);
    assert_eq!(resumed.body["status"], "active");
    await_decision(&api, "acme", "calls", "accepted").await;

    // A grant is a top-up with an id of its own.
    let grant =
        json!({"id": "g-1", "feature": "calls", "amount": 50, "effective": "2026-01-01T00:00:00Z"});
    let granted = post_keyed(
        &api,
        "/api/v1/customers/acme/grants",
        &key,
        "grant-1",
        grant.clone(),
    )
    .await;
    assert_ok(&granted, 201);
    assert_eq!(granted.body["grants"][0]["id"], "g-1");
    assert_eq!(granted.body["grants"][0]["amount"], 50.0);
    let replayed = post_keyed(
        &api,
        "/api/v1/customers/acme/grants",
        &key,
        "grant-1",
        grant.clone(),
    )
    .await;
    assert_eq!((replayed.status, &replayed.raw), (201, &granted.raw));
    let twice = call(
        &api,
        Method::POST,
        "/api/v1/customers/acme/grants",
        &key,
        Some(grant),
    )
    .await;
    assert_problem(&twice, 409, Some("id"), "a grant id used twice");

    // Cancelled now: the entitlement has ended; a later cancellation does not extend it.
    let cancelled = call(
        &api,
        Method::POST,
        "/api/v1/customers/acme/cancel",
        &key,
        None,
    )
    .await;
    assert_ok(&cancelled, 200);
    let until = cancelled.body["valid_until"].as_str().unwrap().to_owned();
    await_decision(&api, "acme", "calls", "expired").await;
    let later = json!({"at": "2099-01-01T00:00:00Z"});
    let later = call(
        &api,
        Method::POST,
        "/api/v1/customers/acme/cancel",
        &key,
        Some(later),
    )
    .await;
    assert_ok(&later, 200);
    assert_eq!(later.body["valid_until"], until);

    // Ordering the plan again starts a new term.
    let order = json!({"customer": "acme", "sku": "PRO-M"});
    let renewed = call(&api, Method::POST, "/api/v1/orders", &key, Some(order)).await;
    assert_ok(&renewed, 201);
    assert!(
        renewed.body["customer"].get("valid_until").is_none(),
        "{}",
        renewed.body
    );
    await_decision(&api, "acme", "calls", "accepted").await;

    let kinds: Vec<String> = audit_of(&api, &key, "acme")
        .await
        .iter()
        .map(|e| {
            let (b, a) = (&e["before"], &e["after"]);
            match () {
                _ if b.is_null() => "created".to_owned(),
                _ if b["status"] != a["status"] => format!("status {}", a["status"]),
                _ if b["grants"] != a["grants"] => "grant".to_owned(),
                _ => format!(
                    "valid_until {}",
                    a.get("valid_until").unwrap_or(&Value::Null)
                ),
            }
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "created".to_owned(),
            "status \"suspended\"".to_owned(),
            "status \"active\"".to_owned(),
            "grant".to_owned(),
            format!("valid_until \"{until}\""),
            "valid_until null".to_owned(),
        ]
    );
    pipeline.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admin_and_provisioning_keys_may_provision() {
    let h = Harness::start().await;
    let api = h.api().await;
    catalogue(&api, &api.admin).await;
    let order = json!({"customer": "acme", "sku": "PRO-M"});
    assert_ok(
        &call(
            &api,
            Method::POST,
            "/api/v1/orders",
            &api.admin,
            Some(order.clone()),
        )
        .await,
        201,
    );

    let routes: Vec<(Method, &str, Option<Value>)> = vec![
        (Method::GET, "/api/v1/plans", None),
        (
            Method::PUT,
            "/api/v1/plans/pro",
            Some(json!({"name": "Pro"})),
        ),
        (Method::GET, "/api/v1/customers/acme", None),
        (
            Method::PUT,
            "/api/v1/customers/acme",
            Some(json!({"plan": "pro"})),
        ),
        (Method::POST, "/api/v1/orders", Some(order)),
        (Method::POST, "/api/v1/customers/acme/suspend", None),
        (Method::DELETE, "/api/v1/customers/acme/addons/pack", None),
        (Method::GET, "/api/v1/audit?customer=acme", None),
    ];
    let provisioning = api.key(&h, Role::Provisioning, &[]).await;
    let mut others = Vec::new();
    for role in [Role::Billing, Role::Analyst, Role::Ingest] {
        others.push((role, api.key(&h, role, &[]).await));
    }
    others.push((Role::Portal, api.key(&h, Role::Portal, &["acme"]).await));
    for (method, path, body) in &routes {
        let with = |key: Option<&str>| {
            let r = api.request(method.clone(), path, key);
            match body {
                Some(b) => r.json(b),
                None => r,
            }
        };
        let anonymous = send(with(None)).await;
        assert_problem(
            &anonymous,
            401,
            Some("authorization"),
            &format!("{method} {path} without a key"),
        );
        for (role, key) in &others {
            // Refused whatever the body: the role is checked first.
            let refused = send(with(Some(key))).await;
            assert_problem(&refused, 403, None, &format!("{method} {path} as {role}"));
            assert_eq!(refused.body["type"], "urn:tally:problem:forbidden");
        }
        let allowed = send(with(Some(&provisioning))).await;
        assert!(
            ![401, 403].contains(&allowed.status),
            "{method} {path} as provisioning: {allowed:?}"
        );
    }
}
