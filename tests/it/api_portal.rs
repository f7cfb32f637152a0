//! The customer portal over a real socket against a real nats-server: access requests
//! (asked, listed, approved through the normal provisioning path, denied, decided once),
//! the per-day usage route, portal links that expire, and the page itself driven by a
//! headless Chromium when one is installed.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::{Harness, TestApi, until};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tally::pipeline;
use tally_api::Role;
use tally_core::entitlement::{AddOn, Catalog, Customer, Customers, Entitlement, Metered, Plan};

fn metered(limit: f64) -> Entitlement {
    Entitlement::Metered(Metered::new(Some(limit)))
}

/// Plans `small` (10 calls, no sso) and `big` (1000 calls, sso); add-ons `more-calls`
/// (+100 calls per unit) and `sso-pack` (sso); customers acme and globex on `small`.
async fn catalogue(h: &Harness) {
    let defs = tally_ingest::definitions::Definitions::open(&h.nats.jetstream, 1)
        .await
        .unwrap();
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
        ]),
        seats: None,
        prices: None,
    };
    let more_calls = AddOn {
        id: "more-calls".to_owned(),
        name: "More calls".to_owned(),
        features: BTreeMap::new(),
        extra: BTreeMap::from([("calls".to_owned(), 100.0)]),
        seats: None,
        price: None,
    };
    let sso_pack = AddOn {
        id: "sso-pack".to_owned(),
        name: "SSO".to_owned(),
        features: BTreeMap::from([("sso".to_owned(), Entitlement::Boolean { enabled: true })]),
        extra: BTreeMap::new(),
        seats: None,
        price: None,
    };
    defs.apply_catalog(
        &Catalog {
            plans: vec![plan("small", 10.0), plan("big", 1000.0)],
            addons: vec![more_calls, sso_pack],
            ..Catalog::default()
        },
        "test",
    )
    .await
    .unwrap();
    defs.apply_customers(
        &Customers {
            customers: vec![
                Customer::new("acme", "small"),
                Customer::new("globex", "small"),
            ],
        },
        "test",
    )
    .await
    .unwrap();
}

async fn call(
    api: &TestApi,
    method: Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut r = api.request(method, path, Some(key));
    if let Some(body) = body {
        r = r.json(&body);
    }
    let response = r.send().await.unwrap();
    let status = response.status();
    let bytes = response.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// The limit of `calls` a check of acme answers now.
async fn calls_limit(api: &TestApi, key: &str) -> Option<f64> {
    let (status, body) = call(
        api,
        Method::GET,
        "/api/v1/customers/acme/entitlements/calls",
        key,
        None,
    )
    .await;
    (status == StatusCode::OK)
        .then(|| body["limit"].as_f64())
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_requests_are_asked_listed_approved_and_denied_once() {
    let h = Harness::start().await;
    catalogue(&h).await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    let api = h.api().await;
    let portal = api.key(&h, Role::Portal, &["acme"]).await;
    let globex = api.key(&h, Role::Portal, &["globex"]).await;
    let admin = api.admin.clone();
    until("the worker answers acme's checks", || async {
        calls_limit(&api, &portal).await == Some(10.0)
    })
    .await;

    // Validation: exactly one of feature and plan, and it must exist.
    let path = "/api/v1/customers/acme/access-requests";
    for (body, field) in [
        (json!({"message": "x"}), "feature"),
        (
            json!({"feature": "calls", "plan": "big", "message": "x"}),
            "plan",
        ),
        (json!({"feature": "teleport", "message": "x"}), "feature"),
        (json!({"plan": "huge", "message": "x"}), "plan"),
        (json!({"plan": "big"}), "message"),
    ] {
        let (status, problem) = call(&api, Method::POST, path, &portal, Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {problem}");
        assert_eq!(problem["field"], field, "{body}: {problem}");
    }
    // A portal key asks only for its own customer.
    let (status, _) = call(
        &api,
        Method::POST,
        "/api/v1/customers/globex/access-requests",
        &portal,
        Some(json!({"plan": "big", "message": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Ask for an upgrade, and for more calls.
    let (status, upgrade) = call(
        &api,
        Method::POST,
        path,
        &portal,
        Some(json!({"plan": "big", "message": "we grew"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{upgrade}");
    assert_eq!(upgrade["status"], "pending");
    assert_eq!(upgrade["customer"], "acme");
    assert_eq!(upgrade["plan"], "big");
    assert!(upgrade["created_at"].is_string());
    let (status, more) = call(
        &api,
        Method::POST,
        path,
        &portal,
        Some(json!({"feature": "calls", "message": "more please"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{more}");
    let (status, theirs) = call(
        &api,
        Method::POST,
        "/api/v1/customers/globex/access-requests",
        &globex,
        Some(json!({"feature": "sso", "message": "sso?"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{theirs}");

    // Listed for the deciders, filtered; a portal key sees only its own customer's.
    let (status, pending) = call(
        &api,
        Method::GET,
        "/api/v1/access-requests?status=pending",
        &admin,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(pending["requests"].as_array().unwrap().len(), 3);
    let (_, of_acme) = call(
        &api,
        Method::GET,
        "/api/v1/access-requests?status=pending&customer=acme",
        &admin,
        None,
    )
    .await;
    let ids: Vec<&str> = of_acme["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            upgrade["id"].as_str().unwrap(),
            more["id"].as_str().unwrap()
        ]
    );
    let (status, own) = call(&api, Method::GET, path, &portal, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(own["requests"].as_array().unwrap().len(), 2);
    assert!(
        own["requests"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["customer"] == "acme")
    );
    let (status, _) = call(
        &api,
        Method::GET,
        "/api/v1/customers/globex/access-requests",
        &portal,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = call(&api, Method::GET, "/api/v1/access-requests", &portal, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = call(
        &api,
        Method::POST,
        &format!(
            "/api/v1/access-requests/{}/approve",
            upgrade["id"].as_str().unwrap()
        ),
        &portal,
        Some(json!({})),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a portal key approved its own request"
    );

    // Approving the upgrade sets the plan: checks answer against `big` soon after.
    let approve = format!(
        "/api/v1/access-requests/{}/approve",
        upgrade["id"].as_str().unwrap()
    );
    let (status, approved) = call(
        &api,
        Method::POST,
        &approve,
        &admin,
        Some(json!({"reason": "welcome to big"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{approved}");
    assert_eq!(approved["status"], "approved");
    assert_eq!(approved["reason"], "welcome to big");
    assert!(approved["decided_by"].as_str().unwrap().starts_with("key:"));
    assert!(approved["decided_at"].is_string());
    until("acme's checks answer against plan big", || async {
        calls_limit(&api, &portal).await == Some(1000.0)
    })
    .await;
    // Audited with the approver's key, as any provisioning change.
    let (_, audit) = call(
        &api,
        Method::GET,
        "/api/v1/audit?customer=acme",
        &admin,
        None,
    )
    .await;
    let entries = audit["entries"].as_array().cloned().unwrap_or_default();
    assert!(
        entries.iter().any(|e| e["actor"] == approved["decided_by"]),
        "no audit entry by the approver: {audit}"
    );

    // Deciding twice is 409, either way.
    let (status, problem) = call(&api, Method::POST, &approve, &admin, Some(json!({}))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    let deny = approve.replace("/approve", "/deny");
    let (status, _) = call(
        &api,
        Method::POST,
        &deny,
        &admin,
        Some(json!({"reason": "no"})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);

    // A feature request adds one unit of the first add-on providing it: +100 calls.
    let approve_more = format!(
        "/api/v1/access-requests/{}/approve",
        more["id"].as_str().unwrap()
    );
    let (status, body) = call(&api, Method::POST, &approve_more, &admin, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["applied"], "addon:more-calls");
    until("acme's calls limit grows by the add-on", || async {
        calls_limit(&api, &portal).await == Some(1100.0)
    })
    .await;

    // A denial needs a reason, and keeps it.
    let deny_theirs = format!(
        "/api/v1/access-requests/{}/deny",
        theirs["id"].as_str().unwrap()
    );
    let (status, problem) = call(&api, Method::POST, &deny_theirs, &admin, Some(json!({}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(problem["field"], "reason");
    let (status, denied) = call(
        &api,
        Method::POST,
        &deny_theirs,
        &admin,
        Some(json!({"reason": "not on this plan"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{denied}");
    assert_eq!(denied["status"], "denied");
    assert_eq!(denied["reason"], "not on this plan");
    let (_, of_globex) = call(
        &api,
        Method::GET,
        "/api/v1/customers/globex/access-requests",
        &globex,
        None,
    )
    .await;
    assert_eq!(of_globex["requests"][0]["status"], "denied");
    assert_eq!(of_globex["requests"][0]["reason"], "not on this plan");
    let (status, _) = call(
        &api,
        Method::POST,
        &deny_theirs,
        &admin,
        Some(json!({"reason": "again"})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = call(
        &api,
        Method::POST,
        "/api/v1/access-requests/ar_nope/approve",
        &admin,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    api.stop.cancel();
    pipeline.shutdown().await.unwrap();
}

async fn send_calls(api: &TestApi, h: &Harness, customer: &str, quantities: &[f64]) {
    let ingest = api.key(h, Role::Ingest, &[]).await;
    let now = chrono::Utc::now().to_rfc3339();
    let events: Vec<Value> = quantities
        .iter()
        .enumerate()
        .map(|(i, q)| {
            json!({"specversion": "1.0", "id": format!("{customer}-{i}"), "source": "test",
                   "type": "calls", "subject": customer, "time": now,
                   "data": {"feature": "calls", "quantity": q}})
        })
        .collect();
    let response = api
        .request(Method::POST, "/api/v1/events", Some(&ingest))
        .header("content-type", "application/cloudevents-batch+json")
        .body(serde_json::to_vec(&events).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_per_day_is_the_customers_own_and_portal_links_expire() {
    let h = Harness::start().await;
    catalogue(&h).await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    let api = h.api().await;
    send_calls(&api, &h, "acme", &[2.0, 3.0]).await;
    send_calls(&api, &h, "globex", &[7.0]).await;
    h.drain(&pipeline, 3).await;

    let portal = api.key(&h, Role::Portal, &["acme"]).await;
    let today = chrono::Utc::now().date_naive().to_string();
    let usage = format!("/api/v1/customers/acme/usage?from={today}&to={today}");
    let (status, rows) = call(&api, Method::GET, &usage, &portal, None).await;
    assert_eq!(status, StatusCode::OK, "{rows}");
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["day"], today);
    assert_eq!(rows[0]["feature"], "calls");
    assert_eq!(rows[0]["quantity"].as_f64(), Some(5.0));
    // Defaults to the current month; another customer's usage is refused.
    let (status, rows) = call(
        &api,
        Method::GET,
        "/api/v1/customers/acme/usage",
        &portal,
        None,
    )
    .await;
    assert_eq!(
        (status, rows.as_array().unwrap().len()),
        (StatusCode::OK, 1)
    );
    let (status, _) = call(
        &api,
        Method::GET,
        "/api/v1/customers/globex/usage",
        &portal,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, problem) = call(
        &api,
        Method::GET,
        "/api/v1/customers/acme/usage?from=2026-13-01",
        &portal,
        None,
    )
    .await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("from"))
    );
    // A quote in the customer id stays inside its literal.
    let billing = api.key(&h, Role::Billing, &[]).await;
    let (status, rows) = call(
        &api,
        Method::GET,
        "/api/v1/customers/x'%20OR%20'1'='1/usage",
        &billing,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{rows}");
    assert_eq!(rows.as_array().map(Vec::len), Some(0), "{rows}");

    // A portal link: read access to acme, until it expires.
    let admin = api.admin.clone();
    let (status, problem) = call(
        &api,
        Method::POST,
        "/api/v1/customers/acme/portal-link",
        &admin,
        Some(json!({"ttl_secs": 0})),
    )
    .await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("ttl_secs"))
    );
    let (status, link) = call(
        &api,
        Method::POST,
        "/api/v1/customers/acme/portal-link",
        &admin,
        Some(json!({"ttl_secs": 2})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{link}");
    let token = link["token"].as_str().unwrap().to_owned();
    assert!(
        link["url"]
            .as_str()
            .unwrap()
            .starts_with("/portal#customer=acme&token=tally_")
    );
    assert!(link["url"].as_str().unwrap().ends_with(&token));
    let (status, _) = call(&api, Method::GET, &usage, &token, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(
        &api,
        Method::GET,
        "/api/v1/customers/globex/usage",
        &token,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = call(&api, Method::GET, "/api/v1/customers", &token, None).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a portal link reads only its customer"
    );
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let (status, problem) = call(&api, Method::GET, &usage, &token, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{problem}");
    assert!(
        problem["detail"].as_str().unwrap().contains("expired"),
        "{problem}"
    );
    let (status, _) = call(
        &api,
        Method::POST,
        "/api/v1/customers/nobody/portal-link",
        &admin,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The page and its assets are public; the page is not in the OpenAPI document.
    let page = api
        .http
        .get(format!("{}/portal", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.text().await.unwrap().contains("/portal/portal.js"));
    for asset in ["/portal/portal.js", "/portal/portal.css"] {
        let r = api
            .http
            .get(format!("{}{asset}", api.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{asset}");
    }

    api.stop.cancel();
    pipeline.shutdown().await.unwrap();
}

/// A headless Chromium on PATH (Debian's `chromium`), if any.
fn chromium() -> Option<String> {
    if let Ok(path) = std::env::var("TALLY_CHROMIUM") {
        return Some(path);
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|name| {
            std::process::Command::new(name)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(str::to_owned)
}

/// Loads `url` in a fresh headless Chromium, lets its scripts run (and their requests
/// finish), and returns the DOM as rendered. A browser that exits with an error (it has,
/// once, while the rest of the suite loaded the machine, with nothing in its output but
/// its usual complaints about D-Bus) is started again, up to three times in all, each
/// with a fresh profile: the page's own failures show in the DOM the test then checks.
async fn rendered(browser: &str, url: &str) -> String {
    let mut failures = Vec::new();
    for _ in 0..3 {
        let profile = tempfile::tempdir().unwrap();
        let output = tokio::process::Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--virtual-time-budget=10000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            // The browser keeps the real clock in the suite's moved-clock run: Chromium
            // does not start under libfaketime, and its clock is not Tally's.
            .env_remove("LD_PRELOAD")
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(60), output)
            .await
            .expect("chromium did not finish in 60 s")
            .unwrap();
        if output.status.success() {
            return String::from_utf8(output.stdout).unwrap();
        }
        failures.push(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    panic!("chromium failed three times:\n{}", failures.join("\n"));
}

/// The value of `attr` on the element with `marker` in its opening tag.
fn attr(dom: &str, marker: &str, attr: &str) -> Option<String> {
    let at = dom.find(marker)?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    let tag = &dom[start..end];
    let key = format!("{attr}=\"");
    let from = tag.find(&key)? + key.len();
    Some(tag[from..from + tag[from..].find('"')?].to_owned())
}

/// The page in a real browser: signs in with a portal link, shows the usage bars the API
/// reports, sends an access request from its form, and shows it approved once an admin
/// approved it through the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_page_in_a_real_browser() {
    let Some(browser) = chromium() else {
        eprintln!("skipped: no chromium on PATH; scripts/install-browser.sh installs it");
        return;
    };
    let h = Harness::start().await;
    catalogue(&h).await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    let api = h.api().await;
    send_calls(&api, &h, "acme", &[2.0, 4.0]).await;
    h.drain(&pipeline, 2).await;
    let portal = api.key(&h, Role::Portal, &["acme"]).await;
    until("acme's usage is counted", || async {
        let (_, v) = call(
            &api,
            Method::GET,
            "/api/v1/customers/acme/entitlements/calls",
            &portal,
            None,
        )
        .await;
        v["usage"].as_f64() == Some(6.0)
    })
    .await;
    let (_, link) = call(
        &api,
        Method::POST,
        "/api/v1/customers/acme/portal-link",
        &api.admin,
        Some(json!({"ttl_secs": 600})),
    )
    .await;
    let url = format!("{}{}", api.base, link["url"].as_str().unwrap());

    // Signed in through the link, a feature request sent from the page's form.
    let dom = rendered(
        &browser,
        &format!("{url}&request=feature:sso&message=from%20the%20browser"),
    )
    .await;
    assert!(
        dom.contains(r#"data-state="ready""#),
        "the page did not sign in:\n{dom}"
    );
    assert_eq!(
        attr(&dom, r#"id="plan""#, "data-plan").as_deref(),
        Some("small")
    );
    let (_, entitlements) = call(
        &api,
        Method::GET,
        "/api/v1/customers/acme/entitlements",
        &portal,
        None,
    )
    .await;
    let calls = &entitlements["features"]["calls"];
    let shown_usage: f64 = attr(&dom, r#"data-feature="calls""#, "data-usage")
        .unwrap()
        .parse()
        .unwrap();
    let shown_limit: f64 = attr(&dom, r#"data-feature="calls""#, "data-limit")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(Some(shown_usage), calls["usage"].as_f64());
    assert_eq!(Some(shown_limit), calls["limit"].as_f64());
    assert!(dom.contains("6 of 10"), "the bar's label:\n{dom}");
    assert!(dom.contains(r#"class="reset""#), "no upcoming reset shown");
    assert!(dom.contains("<svg"), "no daily chart:\n{dom}");
    assert!(
        dom.contains(r#"data-quantity="6""#),
        "the chart's bar for today"
    );
    let id = attr(&dom, r#"id="request-result""#, "data-id").expect("the page sent no request");
    assert_eq!(
        attr(
            &dom,
            &format!(r#"data-id="{id}" data-status"#),
            "data-status"
        )
        .as_deref(),
        Some("pending")
    );

    // The request is there for the admin, who approves it.
    let (_, pending) = call(
        &api,
        Method::GET,
        "/api/v1/access-requests?status=pending&customer=acme",
        &api.admin,
        None,
    )
    .await;
    let request = &pending["requests"][0];
    assert_eq!(
        (request["id"].as_str(), request["feature"].as_str()),
        (Some(id.as_str()), Some("sso"))
    );
    assert_eq!(request["message"], "from the browser");
    let (status, _) = call(
        &api,
        Method::POST,
        &format!("/api/v1/access-requests/{id}/approve"),
        &api.admin,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    until("sso is on for acme", || async {
        let (_, v) = call(
            &api,
            Method::GET,
            "/api/v1/customers/acme/entitlements/sso",
            &portal,
            None,
        )
        .await;
        v["hasAccess"] == true
    })
    .await;

    // Reloaded (signing in with a pasted key this time), the page shows it approved.
    let dom = rendered(
        &browser,
        &format!("{}/portal#customer=acme&key={portal}", api.base),
    )
    .await;
    assert!(dom.contains(r#"data-state="ready""#), "{dom}");
    assert_eq!(
        attr(
            &dom,
            &format!(r#"data-id="{id}" data-status"#),
            "data-status"
        )
        .as_deref(),
        Some("approved")
    );
    assert_eq!(
        attr(&dom, r#"data-feature="sso""#, "data-access").as_deref(),
        Some("true")
    );

    api.stop.cancel();
    pipeline.shutdown().await.unwrap();
}
