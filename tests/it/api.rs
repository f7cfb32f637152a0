//! The HTTP API against a real nats-server, over a real socket: who may call what, event
//! ingest and its refusals, NATS going away, checks, and signed licenses.

use crate::common;
use std::collections::BTreeMap;

use crate::common::{Harness, TestApi, until};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tally::pipeline;
use tally_api::Role;
use tally_core::entitlement::{Catalog, Customer, Customers, Entitlement, Metered, Plan};
use tally_ingest::definitions::Definitions;

/// Who may call each route: `None` is public; `Some(roles)` lists the roles besides admin.
/// Every route of the OpenAPI document must have an entry.
fn access_table() -> BTreeMap<(&'static str, &'static str), Option<&'static [Role]>> {
    use Role::*;
    const PROVISIONING: Option<&[Role]> = Some(&[Provisioning]);
    const METER_READERS: Option<&[Role]> = Some(&[Provisioning, Billing, Analyst, Sdk]);
    BTreeMap::from([
        (("GET", "/healthz"), None),
        (("GET", "/readyz"), None),
        (("GET", "/metrics"), None),
        (("GET", "/api/v1/license-keys"), None),
        (("POST", "/api/v1/license-keys/rotate"), Some(&[][..])),
        (("POST", "/api/v1/events"), Some(&[Ingest, Sdk][..])),
        (
            ("GET", "/api/v1/customers/{customer}/entitlements"),
            Some(&[Provisioning, Billing, Sdk, Portal][..]),
        ),
        (
            ("GET", "/api/v1/customers/{customer}/entitlements/{feature}"),
            Some(&[Provisioning, Billing, Sdk, Portal][..]),
        ),
        (
            ("POST", "/api/v1/customers/{customer}/license"),
            Some(&[Provisioning, Portal][..]),
        ),
        (("GET", "/api/v1/billing"), Some(&[Billing, Portal][..])),
        (("GET", "/api/v1/overage"), Some(&[Billing][..])),
        (("GET", "/api/v1/adoption"), Some(&[Analyst][..])),
        (("POST", "/api/v1/sql"), Some(&[Analyst][..])),
        (("GET", "/api/v1/plans"), PROVISIONING),
        (("GET", "/api/v1/plans/{id}"), PROVISIONING),
        (("PUT", "/api/v1/plans/{id}"), PROVISIONING),
        (("GET", "/api/v1/addons"), PROVISIONING),
        (("GET", "/api/v1/addons/{id}"), PROVISIONING),
        (("PUT", "/api/v1/addons/{id}"), PROVISIONING),
        (("GET", "/api/v1/skus"), PROVISIONING),
        (("GET", "/api/v1/skus/{sku}"), PROVISIONING),
        (("PUT", "/api/v1/skus/{sku}"), PROVISIONING),
        (("GET", "/api/v1/customers"), PROVISIONING),
        (("GET", "/api/v1/customers/{customer}"), PROVISIONING),
        (("PUT", "/api/v1/customers/{customer}"), PROVISIONING),
        (("POST", "/api/v1/orders"), PROVISIONING),
        (
            ("POST", "/api/v1/customers/{customer}/suspend"),
            PROVISIONING,
        ),
        (
            ("POST", "/api/v1/customers/{customer}/resume"),
            PROVISIONING,
        ),
        (
            ("POST", "/api/v1/customers/{customer}/cancel"),
            PROVISIONING,
        ),
        (
            ("POST", "/api/v1/customers/{customer}/grants"),
            PROVISIONING,
        ),
        (
            ("DELETE", "/api/v1/customers/{customer}/addons/{addon}"),
            PROVISIONING,
        ),
        (("GET", "/api/v1/audit"), PROVISIONING),
        (
            ("GET", "/api/v1/customers/{customer}/usage"),
            Some(&[Billing, Portal][..]),
        ),
        (
            ("POST", "/api/v1/customers/{customer}/portal-link"),
            PROVISIONING,
        ),
        (
            ("POST", "/api/v1/customers/{customer}/access-requests"),
            Some(&[Provisioning, Portal][..]),
        ),
        (
            ("GET", "/api/v1/customers/{customer}/access-requests"),
            Some(&[Provisioning, Portal][..]),
        ),
        (("GET", "/api/v1/access-requests"), PROVISIONING),
        (
            ("POST", "/api/v1/access-requests/{id}/approve"),
            PROVISIONING,
        ),
        (("POST", "/api/v1/access-requests/{id}/deny"), PROVISIONING),
        (("GET", "/api/v1/meters"), METER_READERS),
        (("GET", "/api/v1/events"), METER_READERS),
        (("POST", "/api/v1/meters"), PROVISIONING),
        (("GET", "/api/v1/meters/{meterIdOrSlug}"), METER_READERS),
        (("PUT", "/api/v1/meters/{meterIdOrSlug}"), PROVISIONING),
        (("DELETE", "/api/v1/meters/{meterIdOrSlug}"), PROVISIONING),
        (("GET", "/api/v1/features"), METER_READERS),
        (("POST", "/api/v1/features"), PROVISIONING),
        (("GET", "/api/v1/features/{featureId}"), METER_READERS),
        (("DELETE", "/api/v1/features/{featureId}"), PROVISIONING),
        (
            ("GET", "/api/v1/meters/{meterIdOrSlug}/query"),
            METER_READERS,
        ),
        (
            ("POST", "/api/v1/meters/{meterIdOrSlug}/query"),
            METER_READERS,
        ),
        (
            (
                "GET",
                "/api/v1/meters/{meterIdOrSlug}/group-by/{groupByKey}/values",
            ),
            METER_READERS,
        ),
        (
            ("GET", "/api/v1/portal/meters/{meterSlug}/query"),
            Some(&[Portal][..]),
        ),
        (
            (
                "GET",
                "/api/v1/customers/{customer}/entitlements/{feature}/value",
            ),
            Some(&[Provisioning, Billing, Sdk, Portal][..]),
        ),
        (
            (
                "GET",
                "/api/v2/customers/{customer}/entitlements/{feature}/value",
            ),
            Some(&[Provisioning, Billing, Sdk, Portal][..]),
        ),
        (
            (
                "GET",
                "/api/v1/subjects/{customer}/entitlements/{feature}/value",
            ),
            Some(&[Provisioning, Billing, Sdk, Portal][..]),
        ),
    ])
}

/// A concrete path for a template, for `customer`.
fn concrete(template: &str, customer: &str) -> String {
    template
        .replace("{customer}", customer)
        .replace("{id}", customer)
        .replace("{feature}", "calls")
        .replace("{sku}", "pro-monthly")
        .replace("{addon}", "extra-calls")
        .replace("{meterIdOrSlug}", "calls")
        .replace("{meterSlug}", "calls")
        .replace("{groupByKey}", "model")
}

/// Every route × every role (and no key): allowed, or 401 / 403. A portal key is for
/// `acme`: on a route for one customer it is refused for `globex`. The table must name
/// every route of the OpenAPI document, so a route added without an entry fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_each_role_as_the_access_table_says() {
    let mut h = Harness::start().await;
    // No worker runs here: checks would wait for one.
    h.config.api.check_timeout_ms = 100;
    let api = h.api().await;
    let document: Value = api
        .request(Method::GET, "/api/v1/openapi.json", None)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let table = access_table();
    let mut routes = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let method = method.to_uppercase();
            let entry = table
                .iter()
                .find(|((m, p), _)| *m == method && *p == path)
                .unwrap_or_else(|| panic!("{method} {path} has no entry in the access table"));
            routes.push((method, path.clone(), *entry.1));
        }
    }
    assert_eq!(
        routes.len(),
        table.len(),
        "the access table names routes the API does not have"
    );
    let mut keys = Vec::new();
    for role in Role::ALL {
        let customers: &[&str] = if role == Role::Portal { &["acme"] } else { &[] };
        keys.push((role, api.key(&h, role, customers).await));
    }
    let send = |method: &str, path: &str, key: Option<&str>| {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let mut r = api.request(method.clone(), path, key);
        if method == Method::POST || method == Method::PUT {
            r = r.header("content-type", "application/json").body("{}");
        }
        async move { r.send().await.unwrap().status() }
    };
    for (method, template, allowed) in &routes {
        let path = concrete(template, "acme");
        let anonymous = send(method, &path, None).await;
        match allowed {
            None => assert!(
                !matches!(anonymous, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN),
                "{method} {path} is public but answered {anonymous} without a key"
            ),
            Some(_) => assert_eq!(
                anonymous,
                StatusCode::UNAUTHORIZED,
                "{method} {path} without a key"
            ),
        }
        for (role, key) in &keys {
            let status = send(method, &path, Some(key)).await;
            let may = match allowed {
                None => true,
                Some(roles) => *role == Role::Admin || roles.contains(role),
            };
            if may {
                assert!(
                    !matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN),
                    "{method} {path} refused the {role} key: {status}"
                );
            } else {
                assert_eq!(
                    status,
                    StatusCode::FORBIDDEN,
                    "{method} {path} with the {role} key"
                );
            }
            if *role == Role::Portal && may && template.contains("{customer}") {
                let other = concrete(template, "globex");
                assert_eq!(
                    send(method, &other, Some(key)).await,
                    StatusCode::FORBIDDEN,
                    "{method} {other}: a portal key for acme read another customer"
                );
            }
        }
    }
    // A wrong secret, a revoked key and garbage are refused with 401 and say why.
    let (_, billing) = keys.iter().find(|(r, _)| *r == Role::Billing).unwrap();
    // The last character changed (to one it is not).
    let last = if billing.ends_with('0') { '1' } else { '0' };
    let wrong = format!("{}{last}", &billing[..billing.len() - 1]);
    for (token, says) in [
        (wrong.as_str(), "secret is wrong"),
        ("tally_nope", "not of the form"),
        ("tally_0123456789abcdef_00", "no API key"),
    ] {
        let response = api
            .request(Method::GET, "/api/v1/overage?period=2026-11", Some(token))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let problem: Value = response.json().await.unwrap();
        assert!(
            problem["detail"].as_str().unwrap().contains(says),
            "{problem}"
        );
        assert_eq!(problem["field"], "authorization");
    }
}

fn event(id: &str, customer: &str, feature: &str, quantity: f64) -> Value {
    json!({
        "specversion": "1.0", "id": id, "source": "test", "type": "usage",
        "subject": customer, "time": "2026-11-10T10:00:00Z",
        "data": {"feature": feature, "quantity": quantity}
    })
}

async fn post_events(
    api: &TestApi,
    key: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let response = api
        .request(Method::POST, "/api/v1/events", Some(key))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body = response.bytes().await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Each bad input gets its status and a problem naming the field (and the index in a
/// batch); a refused batch stores nothing, and the good events sent are each stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_stored_once_and_a_bad_one_refuses_its_batch_whole() {
    let mut h = Harness::start().await;
    h.config.ingest.limits.max_batch_events = 50;
    // Smaller than a customer's share of the batches below: the API splits them.
    h.config.ingest.limits.max_message_bytes = 1500;
    h.entitle_everyone(3).await;
    let api = h.api().await;
    let key = api.key(&h, Role::Ingest, &[]).await;
    let batch = "application/cloudevents-batch+json";
    let one = "application/cloudevents+json";
    let good = |i: usize| event(&format!("e{i}"), "cust-00000", "api-calls", 1.0);
    let body = |events: Vec<Value>| serde_json::to_vec(&events).unwrap();

    // One bad event in the middle of a batch: refused whole, naming it.
    let mut events: Vec<Value> = (0..5).map(good).collect();
    events[2]["data"]["quantity"] = json!(-3);
    let (status, problem) = post_events(&api, &key, batch, body(events)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    assert_eq!(
        (problem["index"].as_u64(), problem["field"].as_str()),
        (Some(2), Some("data.quantity"))
    );
    assert_eq!(problem["type"], "urn:tally:problem:negative_quantity");

    // What is wrong, content type, body, the status, the field named.
    type Case<'a> = (&'a str, &'a str, Vec<u8>, StatusCode, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "not JSON",
            one,
            b"{nope".to_vec(),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "missing id",
            one,
            {
                let mut e = good(0);
                e.as_object_mut().unwrap().remove("id");
                serde_json::to_vec(&e).unwrap()
            },
            StatusCode::BAD_REQUEST,
            Some("id"),
        ),
        (
            "wrong type",
            one,
            {
                let mut e = good(0);
                e["data"]["quantity"] = json!("lots");
                serde_json::to_vec(&e).unwrap()
            },
            StatusCode::BAD_REQUEST,
            Some("data.quantity"),
        ),
        (
            "bad time",
            one,
            {
                let mut e = good(0);
                e["time"] = json!("yesterday");
                serde_json::to_vec(&e).unwrap()
            },
            StatusCode::BAD_REQUEST,
            Some("time"),
        ),
        (
            "far future",
            one,
            {
                let mut e = good(0);
                e["time"] = json!("2099-01-01T00:00:00Z");
                serde_json::to_vec(&e).unwrap()
            },
            StatusCode::BAD_REQUEST,
            Some("time"),
        ),
        (
            "an array sent as one event",
            one,
            body(vec![good(0)]),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "one event sent as a batch",
            batch,
            serde_json::to_vec(&good(0)).unwrap(),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "empty batch",
            batch,
            b"[]".to_vec(),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "too many events",
            batch,
            body((0..51).map(good).collect()),
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
        ),
        (
            "wrong content type",
            "text/plain",
            serde_json::to_vec(&good(0)).unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Some("content-type"),
        ),
        (
            "over the body limit",
            batch,
            vec![b' '; h.config.api.max_body_bytes + 1],
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
        ),
    ];
    for (what, content_type, bytes, expected, field) in cases {
        let (status, problem) = post_events(&api, &key, content_type, bytes).await;
        assert_eq!(status, expected, "{what}: {problem}");
        assert!(
            !problem["detail"].as_str().unwrap_or_default().is_empty(),
            "{what}: {problem}"
        );
        if let Some(field) = field {
            assert_eq!(problem["field"], field, "{what}: {problem}");
        }
    }

    // A key limited to one customer cannot send another's events.
    let limited = api.key(&h, Role::Ingest, &["cust-00001"]).await;
    let (status, problem) = post_events(
        &api,
        &limited,
        batch,
        body(vec![
            event("l0", "cust-00001", "api-calls", 1.0),
            event("l1", "cust-00002", "api-calls", 1.0),
        ]),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        (problem["index"].as_u64(), problem["field"].as_str()),
        (Some(1), Some("subject"))
    );

    // Good events: one alone, a batch over three customers, and the batch again.
    let (status, _) = post_events(&api, &key, one, serde_json::to_vec(&good(100)).unwrap()).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let mixed: Vec<Value> = (0..30)
        .map(|i| {
            event(
                &format!("m{i}"),
                &format!("cust-0000{}", i % 3),
                "api-calls",
                2.0,
            )
        })
        .collect();
    for _ in 0..2 {
        let (status, accepted) =
            post_events(&api, &key, "application/json", body(mixed.clone())).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(accepted["accepted"], 30);
    }
    // One message for the single event; each customer's ten events of the batch were
    // two messages (under 1,500 bytes each); the batch sent again added none.
    let mut stream = h.nats.jetstream.get_stream("TALLY_EVENTS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 7);
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    h.drain(&pipeline, 31).await;
    let (ids, rows, quantity) = common::read_lake(&h);
    assert_eq!((ids.len(), rows, quantity), (31, 31, 61.0));
    assert!(
        !ids.contains("e2") && !ids.contains("l0"),
        "a refused batch stored an event"
    );
    pipeline.shutdown().await.unwrap();
}

/// With NATS gone the API answers 503 with Retry-After, never a success; once NATS is
/// back the same request is accepted, and its events are counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_is_503_and_the_same_request_later_counts_once() {
    let mut h = Harness::start().await;
    h.entitle_everyone(1).await;
    let api = h.api().await;
    let key = api.key(&h, Role::Ingest, &[]).await;
    let body = serde_json::to_vec(
        &(0..10)
            .map(|i| event(&format!("n{i}"), "cust-00000", "api-calls", 1.0))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let (status, _) = post_events(&api, &key, "application/json", body.clone()).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    h.server.stop();
    let response = api
        .request(Method::POST, "/api/v1/events", Some(&key))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    let problem: Value = response.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("NATS"),
        "{problem}"
    );

    h.server.restart().unwrap();
    let accepted = std::sync::atomic::AtomicBool::new(false);
    until("the API accepts events again", || async {
        let (status, _) = post_events(&api, &key, "application/json", body.clone()).await;
        accepted.store(
            status == StatusCode::ACCEPTED,
            std::sync::atomic::Ordering::Relaxed,
        );
        status == StatusCode::ACCEPTED
    })
    .await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    h.drain(&pipeline, 10).await;
    let (ids, rows, _) = common::read_lake(&h);
    assert_eq!((ids.len(), rows), (10, 10));
    pipeline.shutdown().await.unwrap();
}

/// A batch exactly as OpenMeter's SDKs send it (`application/cloudevents-batch+json`,
/// millisecond times, `datacontenttype`, extra data properties) is accepted and billed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openmeter_sdk_batch_is_accepted_and_billed() {
    let h = Harness::start().await;
    h.entitle_everyone(2).await;
    let api = h.api().await;
    let key = api.key(&h, Role::Ingest, &[]).await;
    let body = r#"[
      {"specversion":"1.0","id":"5c10fade-1c9e-4d6c-8275-c52c36731d3c","source":"my-app","type":"prompt","subject":"cust-00000","time":"2026-11-03T10:15:00.123Z","datacontenttype":"application/json","data":{"feature":"ai-tokens","quantity":1234,"model":"gpt-4","type":"input"}},
      {"specversion":"1.0","id":"5c10fade-1c9e-4d6c-8275-c52c36731d3d","source":"my-app","type":"prompt","subject":"cust-00001","time":"2026-11-03T10:16:00.456Z","datacontenttype":"application/json","data":{"feature":"ai-tokens","quantity":"766","model":"gpt-4","type":"output"}},
      {"specversion":"1.0","id":"5c10fade-1c9e-4d6c-8275-c52c36731d3e","source":"service-0","type":"api-calls","subject":"cust-00001","time":"2026-11-03T10:17:00.001Z","data":{"method":"GET","route":"/hello"}}
    ]"#;
    let (status, accepted) = post_events(
        &api,
        &key,
        "application/cloudevents-batch+json",
        body.as_bytes().to_vec(),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    h.drain(&pipeline, 3).await;
    pipeline.shutdown().await.unwrap();
    let lake = tally_query::Lakehouse::open(&h.config.lake())
        .await
        .unwrap();
    let defs = tally_node::definitions(&h.config).await.unwrap();
    let request = tally_reports::InvoiceRequest {
        period: "2026-11".parse().unwrap(),
        customer: None,
        anniversary: false,
    };
    let bills = tally_reports::invoices(&lake, &defs, &request)
        .await
        .unwrap();
    let billed: BTreeMap<(String, String), String> = bills
        .bills
        .iter()
        .flat_map(|b| {
            b.invoice.lines.iter().map(|l| {
                (
                    (b.invoice.customer.clone(), l.item.clone()),
                    l.quantity.to_string(),
                )
            })
        })
        .collect();
    let line = |c: &str, f: &str, q: &str| ((c.to_owned(), f.to_owned()), q.to_owned());
    // The third event names no feature: it counts against its type, once.
    assert_eq!(
        billed,
        BTreeMap::from([
            line("cust-00000", "ai-tokens", "1234"),
            line("cust-00001", "ai-tokens", "766"),
            line("cust-00001", "api-calls", "1"),
        ])
    );
}

fn metered(limit: f64) -> Entitlement {
    Entitlement::Metered(Metered::new(Some(limit)))
}

async fn catalogue(h: &Harness) -> Definitions {
    let defs = Definitions::open(&h.nats.jetstream, 1).await.unwrap();
    let plan = |id: &str, calls: f64| Plan {
        id: id.to_owned(),
        name: id.to_owned(),
        features: BTreeMap::from([
            ("calls".to_owned(), metered(calls)),
            (
                "sso".to_owned(),
                Entitlement::Boolean {
                    enabled: id == "big",
                },
            ),
            (
                "max_projects".to_owned(),
                Entitlement::Static {
                    value: json!(if id == "big" { 100 } else { 3 }),
                },
            ),
        ]),
        seats: None,
        prices: None,
    };
    defs.apply_catalog(
        &Catalog {
            plans: vec![plan("small", 10.0), plan("big", 1000.0)],
            ..Catalog::default()
        },
        "test",
    )
    .await
    .unwrap();
    defs.apply_customers(
        &Customers {
            customers: vec![Customer::new("acme", "small")],
        },
        "test",
    )
    .await
    .unwrap();
    defs
}

/// Checks over HTTP come from the owning worker, in OpenMeter's entitlement-value shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_answer_in_openmeter_shape_from_the_owning_worker() {
    // The default time a check waits for the owning worker (2 s): a shorter one gave up
    // on a worker slowed by a busy machine.
    let mut h = Harness::start().await;
    catalogue(&h).await;
    let api = h.api().await;
    let ready: Value = api
        .request(Method::GET, "/readyz", None)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "not_ready", "{ready}");
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    let response = api
        .request(Method::GET, "/readyz", None)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let portal = api.key(&h, Role::Portal, &["acme"]).await;
    let get = |path: String| {
        let r = api.request(Method::GET, &path, Some(&portal));
        async move {
            let response = r.send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }
    };
    let (status, calls) = get(
        "/api/v1/customers/acme/entitlements/calls?quantity=4&time=2026-11-10T10:00:00Z".to_owned(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{calls}");
    assert_eq!(
        (
            calls["hasAccess"].as_bool(),
            calls["balance"].as_f64(),
            calls["usage"].as_f64(),
            calls["overage"].as_f64()
        ),
        (Some(true), Some(10.0), Some(0.0), Some(0.0))
    );
    assert_eq!(calls["resetsAt"], "2026-12-01T00:00:00Z");
    let (_, too_many) = get(
        "/api/v1/customers/acme/entitlements/calls?quantity=11&time=2026-11-10T10:00:00Z"
            .to_owned(),
    )
    .await;
    assert_eq!(
        (
            too_many["hasAccess"].as_bool(),
            too_many["decision"].as_str()
        ),
        (Some(false), Some("limit_reached"))
    );
    let (status, all) = get("/api/v1/customers/acme/entitlements".to_owned()).await;
    assert_eq!(status, StatusCode::OK, "{all}");
    let features = all["features"].as_object().unwrap();
    assert_eq!(
        features.keys().collect::<Vec<_>>(),
        ["calls", "max_projects", "sso"]
    );
    assert_eq!(features["sso"]["hasAccess"], false);
    assert_eq!(features["max_projects"]["config"], "3");
    let (status, problem) =
        get("/api/v1/customers/acme/entitlements/calls?quantity=-1".to_owned()).await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("quantity"))
    );
    let (status, problem) =
        get("/api/v1/customers/acme/entitlements/calls?quantity=many".to_owned()).await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("quantity")),
        "{problem}"
    );
    let admin = api
        .request(
            Method::GET,
            "/api/v1/customers/nobody/entitlements",
            Some(&api.admin),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), StatusCode::NOT_FOUND);

    // Served beside the worker (`tally serve`), the API answers the same from the worker's
    // engine in-process, and goes on answering while NATS is away.
    let beside = h.api_with(pipeline.local_checks.clone()).await;
    let path = "/api/v1/customers/acme/entitlements/calls?quantity=4&time=2026-11-10T10:00:00Z";
    let ask = |api: &TestApi| {
        let r = api.request(Method::GET, path, Some(&portal));
        async move {
            let response = r.send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(ask(&beside).await, (StatusCode::OK, calls.clone()));
    h.server.stop();
    assert_eq!(ask(&beside).await, (StatusCode::OK, calls));
    let (status, _) = ask(&api).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    h.server.restart().unwrap();
    // Once NATS is back, the worker takes its partitions up again and answers through it.
    until("the worker answers checks through NATS again", || async {
        ask(&api).await.0 == StatusCode::OK
    })
    .await;
    pipeline.shutdown().await.unwrap();
}

/// A license is issued from the customer's entitlement, verifies offline once the server
/// and NATS are gone, survives a key rotation, carries an upgrade when fetched again, and
/// tampered, expired, not-yet-valid and foreign tokens are refused, each distinctly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn licenses_verify_offline_and_bad_tokens_are_refused_distinctly() {
    use tally_license::{KeySet, SigningKey, VerifyError, verify};
    let h = Harness::start().await;
    let defs = catalogue(&h).await;
    let api = h.api().await;
    let portal = api.key(&h, Role::Portal, &["acme"]).await;
    let issue = || async {
        let response = api
            .request(
                Method::POST,
                "/api/v1/customers/acme/license",
                Some(&portal),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json::<Value>().await.unwrap()
    };
    let first = issue().await;
    let old_token = first["token"].as_str().unwrap().to_owned();
    // A billing job rotates the key: the old token still verifies with the new key set.
    let rotated = api
        .request(
            Method::POST,
            "/api/v1/license-keys/rotate",
            Some(&api.admin),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(rotated.status(), StatusCode::CREATED);
    // An upgrade: the next token carries the new plan.
    let mut acme = defs.customer("acme").await.unwrap().unwrap();
    acme.plan = "big".to_owned();
    defs.apply_customers(
        &Customers {
            customers: vec![acme],
        },
        "test",
    )
    .await
    .unwrap();
    let second = issue().await;
    let new_token = second["token"].as_str().unwrap().to_owned();
    assert_ne!(first["license"]["key_id"], second["license"]["key_id"]);
    let keys_text = api
        .request(Method::GET, "/api/v1/license-keys", None)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let too_long = api
        .request(
            Method::POST,
            "/api/v1/customers/acme/license",
            Some(&portal),
        )
        .json(&json!({"ttl_secs": 10u64 << 40}))
        .send()
        .await
        .unwrap();
    assert_eq!(too_long.status(), StatusCode::BAD_REQUEST);
    assert_eq!(too_long.json::<Value>().await.unwrap()["field"], "ttl_secs");

    // Everything online goes away.
    drop(api);
    drop(h);
    let keys = KeySet::parse(&keys_text).unwrap();
    let now = chrono::Utc::now();
    let old = verify(&old_token, &keys, now).unwrap();
    assert_eq!(
        (old.customer.as_str(), old.plan.as_str()),
        ("acme", "small")
    );
    let new = verify(&new_token, &keys, now).unwrap();
    assert_eq!(new.plan, "big");
    assert_eq!(new.features["calls"]["limit"], 1000.0);
    assert_eq!(new.features["max_projects"]["value"], 100);

    let mut tampered = new_token.clone().into_bytes();
    let at = tampered.len() / 2;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    assert!(matches!(
        verify(&tampered, &keys, now),
        Err(VerifyError::BadSignature { .. })
    ));
    assert!(matches!(
        verify(&new_token, &keys, new.expires_at),
        Err(VerifyError::Expired { .. })
    ));
    assert!(matches!(
        verify(
            &new_token,
            &keys,
            new.not_before - chrono::Duration::seconds(1)
        ),
        Err(VerifyError::NotYetValid { .. })
    ));
    let stranger = SigningKey::generate().unwrap();
    let foreign = KeySet::parse(&stranger.public().paserk).unwrap();
    assert!(matches!(
        verify(&new_token, &foreign, now),
        Err(VerifyError::UnknownKey { .. })
    ));

    // `tally license verify` does the same from the shell, with no network.
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys.json");
    std::fs::write(&key_file, &keys_text).unwrap();
    let cli = |token: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["license", "verify", token, "--format", "json", "--key"])
            .arg(&key_file)
            .env("TALLY_NATS_URL", "nats://127.0.0.1:1")
            .output()
            .unwrap()
    };
    let ok = cli(&new_token);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let shown: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(shown["plan"], "big");
    let refused = cli(&tampered);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("signature"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

/// `tally keys` makes, lists and revokes keys; a revoked key is refused from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_made_listed_and_revoked_from_the_shell() {
    let h = Harness::start().await;
    let api = h.api().await;
    let tally = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .args(["--nats-url", &h.server.url()])
            .arg("--data-dir")
            .arg(h.dir.path())
            .env("TALLY_NATS_CREDENTIALS", h.server.credentials().dir())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    };
    let created: Value = serde_json::from_slice(&tally(&[
        "keys", "create", "--role", "billing", "--name", "invoices", "--format", "json",
    ]))
    .unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["role"], "billing");
    let listed: Vec<Value> =
        serde_json::from_slice(&tally(&["keys", "list", "--format", "json"])).unwrap();
    let mine = listed.iter().find(|k| k["id"] == id.as_str()).unwrap();
    assert_eq!(mine["name"], "invoices");
    assert!(
        mine.get("token").is_none()
            && !serde_json::to_string(&listed)
                .unwrap()
                .contains(&token[token.len() - 20..])
    );
    // A route the key may not use: 403 while the key is valid, 401 once it is revoked.
    let status = || async {
        api.request(Method::POST, "/api/v1/license-keys/rotate", Some(&token))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(status().await, StatusCode::FORBIDDEN);
    tally(&["keys", "revoke", &id]);
    until("the revoked key is refused", || async {
        status().await == StatusCode::UNAUTHORIZED
    })
    .await;
    let problem: Value = api
        .request(Method::GET, "/api/v1/overage?period=2026-11", Some(&token))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("revoked"),
        "{problem}"
    );
}
