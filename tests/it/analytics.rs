//! `tally overage` and `tally adoption` end to end: definitions in NATS, events decided by
//! a real worker into the lake, the reports read through the CLI and checked against
//! figures worked out by hand.

use std::process::Command;

use crate::common::Harness;
use serde_json::{Value, json};
use tally::pipeline;
use tally_core::entitlement::Customers;
use tally_core::subject;
use tally_ingest::definitions::Definitions;

/// Free: calls limited to 50 a month, hard, upgrade to pro; export off; no reports.
/// Pro: calls 100 a month, soft, upgrade to scale, priced past 100 (0.02, overage 0.05);
/// export on; reports unlimited with 4 included (0.50 each past them).
/// Scale: calls 1000 a month, hard, no next plan; export and reports.
/// Boost: 10 more calls per unit.
const CATALOG: &str = r#"
    [[plans]]
    id = "free"
    name = "Free"
    [plans.features.calls]
    kind = "metered"
    limit = 50
    enforcement = "hard"
    next_plan = "pro"
    [plans.features.export]
    kind = "boolean"
    enabled = false

    [[plans]]
    id = "pro"
    name = "Pro"
    [plans.features.calls]
    kind = "metered"
    limit = 100
    enforcement = "soft"
    next_plan = "scale"
    [plans.features.export]
    kind = "boolean"
    [plans.features.reports]
    kind = "metered"
    included = 4
    [plans.prices]
    currency = "USD"
    flat_fee = "10"
    [plans.prices.features.calls]
    included = "100"
    model = "per_unit"
    unit_price = "0.02"
    overage_unit_price = "0.05"
    [plans.prices.features.reports]
    included = "4"
    model = "per_unit"
    unit_price = "0.50"

    [[plans]]
    id = "scale"
    name = "Scale"
    [plans.features.calls]
    kind = "metered"
    limit = 1000
    [plans.features.export]
    kind = "boolean"
    [plans.features.reports]
    kind = "metered"

    [[addons]]
    id = "boost"
    name = "Boost"
    extra = { calls = 10 }
"#;

/// The customers while the events are decided; fiona moves from pro to free afterwards.
const CUSTOMERS: &str = r#"
    [[customers]]
    id = "pat"
    plan = "pro"
    valid_from = "2026-11-01T00:00:00Z"
    addons = [{ id = "boost", quantity = 2 }]

    [[customers]]
    id = "fred"
    plan = "free"

    [[customers]]
    id = "gina"
    plan = "free"
    valid_from = "2026-11-04T09:00:00Z"

    [[customers]]
    id = "hugo"
    plan = "free"
    valid_from = "2026-11-01T00:00:00Z"

    [[customers]]
    id = "fiona"
    plan = "pro"

    [[customers]]
    id = "quinn"
    plan = "pro"

    [[customers]]
    id = "olga"
    plan = "pro"
    valid_from = "2026-11-01T00:00:00Z"

    [[customers]]
    id = "vera"
    plan = "pro"
    valid_until = "2026-10-01T00:00:00Z"
"#;

/// (id, customer, feature, quantity, time, region, user, the decision it must get)
type Case = (
    &'static str,
    &'static str,
    &'static str,
    f64,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    &'static str,
);

/// November 2026, in time order (the 2nd and the 9th are Mondays).
const EVENTS: &[Case] = &[
    (
        "a",
        "quinn",
        "export",
        1.0,
        "2026-11-01T12:00:00Z",
        Some("eu"),
        Some("u1"),
        "accepted",
    ),
    // pat: calls limit 100 + 2 × 10 (boost) = 120, soft.
    (
        "b",
        "pat",
        "calls",
        60.0,
        "2026-11-02T09:00:00Z",
        Some("eu"),
        Some("u1"),
        "accepted",
    ),
    // fred: calls limit 50, hard.
    (
        "c",
        "fred",
        "calls",
        30.0,
        "2026-11-02T10:00:00Z",
        Some("eu"),
        Some("u1"),
        "accepted",
    ),
    (
        "d",
        "fred",
        "calls",
        15.0,
        "2026-11-02T11:00:00Z",
        Some("eu"),
        Some("u1"),
        "accepted",
    ),
    (
        "e",
        "fiona",
        "export",
        1.0,
        "2026-11-02T12:00:00Z",
        Some("us"),
        Some("u9"),
        "accepted",
    ),
    (
        "f",
        "fred",
        "calls",
        10.0,
        "2026-11-03T09:00:00Z",
        Some("eu"),
        Some("u2"),
        "limit_reached",
    ),
    (
        "g",
        "pat",
        "calls",
        50.0,
        "2026-11-03T10:00:00Z",
        Some("eu"),
        Some("u2"),
        "accepted",
    ),
    (
        "h",
        "fred",
        "calls",
        5.0,
        "2026-11-03T10:30:00Z",
        Some("eu"),
        Some("u2"),
        "accepted",
    ),
    (
        "i",
        "fiona",
        "calls",
        10.0,
        "2026-11-03T12:00:00Z",
        Some("us"),
        Some("u9"),
        "accepted",
    ),
    (
        "j",
        "quinn",
        "reports",
        2.0,
        "2026-11-03T12:00:00Z",
        Some("eu"),
        Some("u1"),
        "accepted",
    ),
    (
        "k",
        "pat",
        "export",
        1.0,
        "2026-11-03T15:00:00Z",
        Some("eu"),
        Some("u1"),
        "accepted",
    ),
    (
        "l",
        "fred",
        "calls",
        20.0,
        "2026-11-04T09:00:00Z",
        Some("us"),
        Some("u1"),
        "limit_reached",
    ),
    (
        "m",
        "fred",
        "calls",
        1.0,
        "2026-11-04T10:00:00Z",
        Some("us"),
        Some("u1"),
        "limit_reached",
    ),
    (
        "n",
        "fred",
        "export",
        1.0,
        "2026-11-04T11:00:00Z",
        Some("eu"),
        Some("u1"),
        "not_entitled",
    ),
    (
        "o",
        "pat",
        "calls",
        20.0,
        "2026-11-04T11:00:00Z",
        Some("us"),
        Some("u1"),
        "overage",
    ),
    (
        "p",
        "gina",
        "calls",
        50.0,
        "2026-11-05T09:00:00Z",
        Some("ap"),
        Some("u1"),
        "accepted",
    ),
    (
        "q",
        "gina",
        "calls",
        80.0,
        "2026-11-05T10:00:00Z",
        Some("ap"),
        Some("u1"),
        "limit_reached",
    ),
    (
        "r",
        "pat",
        "calls",
        20.0,
        "2026-11-05T12:00:00Z",
        Some("us"),
        Some("u3"),
        "overage",
    ),
    (
        "s",
        "pat",
        "reports",
        5.0,
        "2026-11-06T08:00:00Z",
        Some("eu"),
        Some("u2"),
        "accepted",
    ),
    (
        "t",
        "hugo",
        "calls",
        40.0,
        "2026-11-06T09:00:00Z",
        Some("eu"),
        None,
        "accepted",
    ),
    (
        "u",
        "hugo",
        "calls",
        2000.0,
        "2026-11-06T10:00:00Z",
        Some("eu"),
        None,
        "limit_reached",
    ),
    (
        "v",
        "pat",
        "export",
        1.0,
        "2026-11-09T08:00:00Z",
        Some("eu"),
        Some("u1"),
        "accepted",
    ),
    (
        "w",
        "quinn",
        "export",
        1.0,
        "2026-11-10T10:00:00Z",
        Some("eu"),
        Some("u1"),
        "accepted",
    ),
];

/// Applies the definitions, has a worker decide [`EVENTS`] into the lake, checks each
/// decision, then moves fiona to the free plan.
async fn lake() -> Harness {
    let (h, defs) = decide(CATALOG, CUSTOMERS, EVENTS).await;
    let customers: Customers = toml::from_str(CUSTOMERS).unwrap();
    let mut moved = customers.customers;
    moved.retain(|c| c.id == "fiona");
    moved[0].plan = "free".to_owned();
    defs.apply_customers(&Customers { customers: moved }, "test")
        .await
        .unwrap();
    h
}

/// Applies a catalogue and customers, has a worker decide `events` into the lake (in
/// their order), and checks each decision.
async fn decide(catalog: &str, customers: &str, events: &[Case]) -> (Harness, Definitions) {
    let h = Harness::start().await;
    let defs = h.define(catalog, customers).await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    for (id, customer, feature, quantity, time, region, user, _) in events {
        let mut data = json!({"feature": feature, "quantity": quantity});
        if let Some(r) = region {
            data["region"] = json!(r);
        }
        if let Some(u) = user {
            data["user"] = json!(u);
        }
        let body = json!({
            "specversion": "1.0", "id": id, "source": "test", "type": "usage",
            "subject": customer, "time": time, "data": data,
        });
        h.nats
            .jetstream
            .publish(subject::events_subject(customer), body.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    h.drain(&pipeline, events.len() as u64).await;
    pipeline.shutdown().await.unwrap();

    let decided = tally_cli(
        &h,
        &[
            "sql",
            "SELECT event_id, decision FROM events ORDER BY event_id",
        ],
    );
    let decided: Vec<(&str, &str)> = decided
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["event_id"].as_str().unwrap(),
                r["decision"].as_str().unwrap(),
            )
        })
        .collect();
    let want: Vec<(&str, &str)> = events.iter().map(|e| (e.0, e.7)).collect();
    assert_eq!(decided, want);
    (h, defs)
}

/// Runs `tally <args> --format json` against the harness and parses what it prints.
fn tally_cli(h: &Harness, args: &[&str]) -> Value {
    serde_json::from_str(&tally_text(h, args, "json")).unwrap()
}

fn tally_text(h: &Harness, args: &[&str], format: &str) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .args([
            "--format",
            format,
            "--nats-url",
            &h.server.url(),
            "--data-dir",
        ])
        .arg(h.dir.path())
        .env("TALLY_NATS_CREDENTIALS", h.server.credentials().dir())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "tally {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overage_report_shows_usage_past_the_allowance_and_who_a_hard_limit_refused() {
    let h = lake().await;
    let report = tally_cli(&h, &["overage", "--period", "2026-11"]);
    assert_eq!(report["period"], "2026-11");

    // pat on pro: calls 60 + 50 accepted (110 of 120), then 20 and 20 past the soft limit
    // as overage: 150 used, 30 (25 %) past the allowance of 120.
    // Rated (included 100, 0.02 each, overage 0.05 each): the whole usage is
    // 10 × 0.02 + 40 × 0.05 = 2.20; capped at 120 it is the 110 accepted and 10 of the
    // overage: 10 × 0.02 + 10 × 0.05 = 0.70; going past adds 1.50.
    // reports: no limit, 4 included; 5 used is 1 (25 %) past; 1 × 0.50 − 0 = 0.50.
    // fred, gina and hugo reach 50, 50 and 40 of 50: at the limit is not past it.
    assert_eq!(
        report["over"],
        json!([
            {
                "customer": "pat", "plan": "pro", "feature": "calls",
                "enforcement": "soft", "usage_period": "month",
                "quantity": 150.0, "accepted": 110.0, "overage": 40.0,
                "limit": 120.0, "allowance": 120.0, "periods_over": 1,
                "over": 30.0, "over_percent": 25.0, "currency": "USD",
                "amount": "2.20", "amount_within": "0.70", "added": "1.50",
            },
            {
                "customer": "pat", "plan": "pro", "feature": "reports",
                "enforcement": "hard", "usage_period": "month",
                "quantity": 5.0, "accepted": 5.0, "overage": 0.0,
                "limit": null, "allowance": 4.0, "periods_over": 1,
                "over": 1.0, "over_percent": 25.0, "currency": "USD",
                "amount": "0.50", "amount_within": "0.00", "added": "0.50",
            },
        ])
    );

    // Refused per day: fred 10 on the 3rd, 20 + 1 on the 4th; gina 80; hugo 2000.
    let day = |c: &str, d: &str, events: u64, q: f64| {
        json!({"customer": c, "plan": "free", "feature": "calls", "day": d,
               "events": events, "quantity": q})
    };
    assert_eq!(
        report["rejections"],
        json!([
            day("fred", "2026-11-03", 1, 10.0),
            day("fred", "2026-11-04", 2, 21.0),
            day("gina", "2026-11-05", 1, 80.0),
            day("hugo", "2026-11-06", 1, 2000.0),
        ])
    );

    // Demand = counted + refused in the month. fred: 50 + 31 = 81 ≤ pro's 100.
    // gina: 50 + 80 = 130 > pro's 100, so pro's next plan: scale, 1000.
    // hugo: 40 + 2000 = 2040 > 1000, and scale has no next plan: none.
    let upgrade = |c: &str, counted: f64, events: u64, refused: f64, by: Value, limit: Value| {
        json!({
            "customer": c, "plan": "free", "feature": "calls", "usage_period": "month",
            "limit": 50.0, "refused_events": events, "refused": refused,
            "peak_period": "2026-11-01T00:00:00Z", "peak_counted": counted,
            "peak_refused": refused, "demand": counted + refused,
            "next_plan": "pro", "covered_by": by, "covered_limit": limit,
        })
    };
    assert_eq!(
        report["upgrades"],
        json!([
            upgrade("fred", 50.0, 3, 31.0, json!("pro"), json!(100.0)),
            upgrade("gina", 50.0, 1, 80.0, json!("scale"), json!(1000.0)),
            upgrade("hugo", 40.0, 1, 2000.0, Value::Null, Value::Null),
        ])
    );

    // The same figures as CSV (a header per part) and as a table.
    let csv = tally_text(&h, &["overage", "--period", "2026-11"], "csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "section,customer,plan,feature,enforcement,usage_period,quantity,accepted,overage,\
         limit,allowance,periods_over,over,over_percent,currency,amount,amount_within,added"
    );
    assert_eq!(
        lines[1],
        "over,pat,pro,calls,soft,month,150,110,40,120,120,1,30,25.00,USD,2.20,0.70,1.50"
    );
    assert!(
        lines.contains(
            &"upgrades,hugo,free,calls,50,1,2000,2026-11-01T00:00:00Z,40,2000,2040,pro,,"
        ),
        "{csv}"
    );
    let table = tally_text(&h, &["overage", "--period", "2026-11"], "table");
    assert!(table.contains("2026-11: past the allowance"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("gina") && l.contains("scale")),
        "{table}"
    );

    // A month without events has nothing to report.
    let empty = tally_cli(&h, &["overage", "--period", "2026-10"]);
    assert_eq!(
        empty,
        json!({"period": "2026-10", "over": [], "rejections": [], "upgrades": []})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adoption_reports_activation_first_uses_the_free_tier_regions_and_active_users() {
    let h = lake().await;
    // Monday the 2nd to Monday the 9th, both included: 8 days, 2 ISO weeks, 1 month.
    let report = tally_cli(
        &h,
        &["adoption", "--from", "2026-11-02", "--to", "2026-11-09"],
    );
    assert_eq!(
        (report["from"].as_str(), report["to"].as_str()),
        (Some("2026-11-02"), Some("2026-11-09"))
    );

    // Customers defined in the range: all but vera (valid until October). Entitled now:
    // calls, everyone (7); export and reports, pro's pat, quinn and olga (fiona is on
    // free now). Used in the range (a on the 1st and w on the 10th are outside):
    // calls b c d g h i o p r t — 10 events, 300, by pat fred fiona gina hugo;
    // export e k v — fiona (not entitled now) and pat; reports j s — quinn and pat.
    //
    // First uses in the range, hours since the entitlement started (valid_from, else the
    // customer's first event): calls pat 33 (from the 1st), fred 0, fiona 24 (her first
    // event was export on the 2nd), gina 24 (valid from the 4th 09:00), hugo 129 (from
    // the 1st): median 24. export fiona 0, pat 63: 31.5 (quinn's first was the 1st,
    // before the range). reports pat 128, quinn 48 (first event the 1st, 12:00): 88.
    //
    // Distinct users (customer, user) per day: calls 2 3 1 2 0 0 0 0 (hugo's have no
    // user): DAU 8 / 8 = 1, last 0; week of the 2nd: pat u1 u2 u3, fred u1 u2, fiona u9,
    // gina u1 = 7, week of the 9th 0: WAU 3.5, last 0; MAU 7. export: 1 on the 2nd, 3rd
    // and 9th: DAU 3 / 8, last 1; weeks 2 and 1; month 2. reports: 1 on the 3rd and the
    // 6th: DAU 2 / 8, last 0; weeks 2 and 0; month 2.
    assert_eq!(
        report["features"],
        json!([
            {
                "feature": "calls", "entitled_customers": 7, "active_customers": 5,
                "activated_customers": 5, "activation_rate": 5.0 / 7.0,
                "events": 10, "quantity": 300.0,
                "first_uses": 5, "median_hours_to_first_use": 24.0,
                "dau_avg": 1.0, "dau_last": 0, "wau_avg": 3.5, "wau_last": 0,
                "mau_avg": 7.0, "mau_last": 7,
            },
            {
                "feature": "export", "entitled_customers": 3, "active_customers": 2,
                "activated_customers": 1, "activation_rate": 1.0 / 3.0,
                "events": 3, "quantity": 3.0,
                "first_uses": 2, "median_hours_to_first_use": 31.5,
                "dau_avg": 0.375, "dau_last": 1, "wau_avg": 1.5, "wau_last": 1,
                "mau_avg": 2.0, "mau_last": 2,
            },
            {
                "feature": "reports", "entitled_customers": 3, "active_customers": 2,
                "activated_customers": 2, "activation_rate": 2.0 / 3.0,
                "events": 2, "quantity": 7.0,
                "first_uses": 2, "median_hours_to_first_use": 88.0,
                "dau_avg": 0.25, "dau_last": 0, "wau_avg": 1.0, "wau_last": 0,
                "mau_avg": 2.0, "mau_last": 2,
            },
        ])
    );

    let first = |f: &str, c: &str, at: &str, from: &str, source: &str, hours: f64| {
        json!({"feature": f, "customer": c, "first_use": at, "entitlement_start": from,
               "start_from": source, "hours": hours})
    };
    assert_eq!(
        report["first_uses"],
        json!([
            first(
                "calls",
                "fiona",
                "2026-11-03T12:00:00Z",
                "2026-11-02T12:00:00Z",
                "first_event",
                24.0
            ),
            first(
                "calls",
                "fred",
                "2026-11-02T10:00:00Z",
                "2026-11-02T10:00:00Z",
                "first_event",
                0.0
            ),
            first(
                "calls",
                "gina",
                "2026-11-05T09:00:00Z",
                "2026-11-04T09:00:00Z",
                "valid_from",
                24.0
            ),
            first(
                "calls",
                "hugo",
                "2026-11-06T09:00:00Z",
                "2026-11-01T00:00:00Z",
                "valid_from",
                129.0
            ),
            first(
                "calls",
                "pat",
                "2026-11-02T09:00:00Z",
                "2026-11-01T00:00:00Z",
                "valid_from",
                33.0
            ),
            first(
                "export",
                "fiona",
                "2026-11-02T12:00:00Z",
                "2026-11-02T12:00:00Z",
                "first_event",
                0.0
            ),
            first(
                "export",
                "pat",
                "2026-11-03T15:00:00Z",
                "2026-11-01T00:00:00Z",
                "valid_from",
                63.0
            ),
            first(
                "reports",
                "pat",
                "2026-11-06T08:00:00Z",
                "2026-11-01T00:00:00Z",
                "valid_from",
                128.0
            ),
            first(
                "reports",
                "quinn",
                "2026-11-03T12:00:00Z",
                "2026-11-01T12:00:00Z",
                "first_event",
                48.0
            ),
        ])
    );

    // On free now: fiona, fred, gina, hugo. Their advanced features (off or absent on
    // free, on in pro): export and reports. fiona used export (under pro): not listed.
    // fred tried export once (not_entitled).
    let free = |c: &str, advanced: &[&str], tried: u64, events: u64| json!({"customer": c, "plan": "free", "advanced": advanced, "tried": tried, "events": events});
    assert_eq!(
        report["free_tier"],
        json!([
            free("fred", &["export", "reports"], 1, 3),
            free("gina", &["export", "reports"], 0, 1),
            free("hugo", &["export", "reports"], 0, 1),
        ])
    );

    let region = |f: &str, r: &str, events: u64, q: f64| json!({"feature": f, "region": r, "events": events, "quantity": q});
    assert_eq!(
        report["regions"],
        json!([
            region("calls", "ap", 1, 50.0),
            region("calls", "eu", 6, 200.0),
            region("calls", "us", 3, 50.0),
            region("export", "eu", 2, 2.0),
            region("export", "us", 1, 1.0),
            region("reports", "eu", 2, 7.0),
        ])
    );

    let series: Vec<(String, String, String, u64)> = report["active_users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["feature"].as_str().unwrap().to_owned(),
                r["grain"].as_str().unwrap().to_owned(),
                r["bucket"].as_str().unwrap().to_owned(),
                r["users"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, String, String, u64)> = [
        ("calls", "day", "2026-11-02", 2),
        ("calls", "day", "2026-11-03", 3),
        ("calls", "day", "2026-11-04", 1),
        ("calls", "day", "2026-11-05", 2),
        ("calls", "week", "2026-11-02", 7),
        ("calls", "month", "2026-11-01", 7),
        ("export", "day", "2026-11-02", 1),
        ("export", "day", "2026-11-03", 1),
        ("export", "day", "2026-11-09", 1),
        ("export", "week", "2026-11-02", 2),
        ("export", "week", "2026-11-09", 1),
        ("export", "month", "2026-11-01", 2),
        ("reports", "day", "2026-11-03", 1),
        ("reports", "day", "2026-11-06", 1),
        ("reports", "week", "2026-11-02", 2),
        ("reports", "month", "2026-11-01", 2),
    ]
    .into_iter()
    .map(|(f, g, b, u)| (f.to_owned(), g.to_owned(), b.to_owned(), u))
    .collect();
    assert_eq!(series, want);

    // One feature: its row as above; the free tier is judged on it alone (their export
    // use in the range: none).
    let export = tally_cli(
        &h,
        &[
            "adoption",
            "--from",
            "2026-11-02",
            "--to",
            "2026-11-09",
            "--feature",
            "export",
        ],
    );
    assert_eq!(export["features"], json!([report["features"][1].clone()]));
    assert_eq!(
        export["free_tier"],
        json!([
            free("fred", &["export"], 1, 0),
            free("gina", &["export"], 0, 0),
            free("hugo", &["export"], 0, 0),
        ])
    );
    assert_eq!(export["regions"].as_array().unwrap().len(), 2);

    // A free tier named otherwise: nobody is on "basic".
    let basic = tally_cli(
        &h,
        &[
            "adoption",
            "--from",
            "2026-11-02",
            "--to",
            "2026-11-09",
            "--free-plan",
            "basic",
        ],
    );
    assert_eq!(basic["free_tier"], json!([]));

    let csv = tally_text(
        &h,
        &["adoption", "--from", "2026-11-02", "--to", "2026-11-09"],
        "csv",
    );
    assert!(
        csv.lines()
            .any(|l| l == "free_tier,fred,free,export reports,1,3"),
        "{csv}"
    );
    assert!(
        csv.lines()
            .any(|l| l == "active_users,calls,week,2026-11-02,7"),
        "{csv}"
    );
    let table = tally_text(
        &h,
        &["adoption", "--from", "2026-11-02", "--to", "2026-11-09"],
        "table",
    );
    assert!(
        table.contains("free-tier customers who never used an advanced feature"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_held_against_the_allowance_of_each_usage_period() {
    // Daily: calls 10 a day, soft, 1 each and 3 each as overage. Tiny: 5 a day, hard,
    // upgrade to daily.
    let catalog = r#"
        [[plans]]
        id = "daily"
        name = "Daily"
        [plans.features.calls]
        kind = "metered"
        limit = 10
        period = "day"
        enforcement = "soft"
        [plans.prices]
        currency = "EUR"
        [plans.prices.features.calls]
        model = "per_unit"
        unit_price = "1"
        overage_unit_price = "3"

        [[plans]]
        id = "tiny"
        name = "Tiny"
        [plans.features.calls]
        kind = "metered"
        limit = 5
        period = "day"
        next_plan = "daily"
    "#;
    let customers = r#"
        [[customers]]
        id = "dora"
        plan = "daily"
        [[customers]]
        id = "tess"
        plan = "tiny"
    "#;
    let events: &[Case] = &[
        (
            "a",
            "dora",
            "calls",
            8.0,
            "2026-11-02T09:00:00Z",
            None,
            None,
            "accepted",
        ),
        (
            "b",
            "dora",
            "calls",
            4.0,
            "2026-11-02T10:00:00Z",
            None,
            None,
            "overage",
        ),
        (
            "c",
            "dora",
            "calls",
            6.0,
            "2026-11-03T10:00:00Z",
            None,
            None,
            "accepted",
        ),
        (
            "d",
            "tess",
            "calls",
            4.0,
            "2026-11-02T09:00:00Z",
            None,
            None,
            "accepted",
        ),
        (
            "e",
            "tess",
            "calls",
            3.0,
            "2026-11-02T10:00:00Z",
            None,
            None,
            "limit_reached",
        ),
        (
            "f",
            "tess",
            "calls",
            5.0,
            "2026-11-03T09:00:00Z",
            None,
            None,
            "accepted",
        ),
        (
            "g",
            "tess",
            "calls",
            1.0,
            "2026-11-03T10:00:00Z",
            None,
            None,
            "limit_reached",
        ),
    ];
    let (h, _defs) = decide(catalog, customers, events).await;
    let report = tally_cli(&h, &["overage", "--period", "2026-11"]);

    // dora: 12 on the 2nd (2 past 10), 6 on the 3rd; the month's 18 is not compared with
    // a day's 10. Rated for the month: 14 × 1 + 4 × 3 = 26; capped at 10 a day: the 8
    // accepted and 2 of the overage on the 2nd, the 6 on the 3rd: 14 + 2 × 3 = 20.
    assert_eq!(
        report["over"],
        json!([{
            "customer": "dora", "plan": "daily", "feature": "calls",
            "enforcement": "soft", "usage_period": "day",
            "quantity": 18.0, "accepted": 14.0, "overage": 4.0,
            "limit": 10.0, "allowance": 10.0, "periods_over": 1,
            "over": 2.0, "over_percent": 20.0, "currency": "EUR",
            "amount": "26.00", "amount_within": "20.00", "added": "6.00",
        }])
    );
    // tess: the busiest day is the 2nd, 4 counted + 3 refused = 7, within daily's 10 (the
    // month's 9 + 4 = 13 would not be).
    assert_eq!(
        report["upgrades"],
        json!([{
            "customer": "tess", "plan": "tiny", "feature": "calls", "usage_period": "day",
            "limit": 5.0, "refused_events": 2, "refused": 4.0,
            "peak_period": "2026-11-02T00:00:00Z", "peak_counted": 4.0,
            "peak_refused": 3.0, "demand": 7.0,
            "next_plan": "daily", "covered_by": "daily", "covered_limit": 10.0,
        }])
    );
}
