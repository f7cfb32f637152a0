//! The report routes over real HTTP: billing, overage and adoption answer what the CLI
//! prints for the same lake (JSON, CSV and Arrow byte for byte), SQL streams
//! and refuses what is not a query, `Accept` picks the format, the roles and a portal
//! key's customer bound who reads what, and the SQL limits answer with a clear status
//! while the server goes on.

use std::io::Cursor;
use std::time::{Duration, Instant};

use crate::common::{self, Harness, TestApi};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use reqwest::{Method, Response, StatusCode};
use serde_json::Value;
use tally::pipeline;
use tally_api::{AppState, Problem, Role};
use tally_core::pricing::Decimal;
use tally_reports::{Format, LakeReports, ReportError};
use tokio_util::sync::CancellationToken;

const ARROW: &str = "application/vnd.apache.arrow.stream";

/// Free: calls limited to 50 a month, hard, upgrade to pro; export off.
/// Pro: calls 100 a month, soft; export; 100 calls included, then 0.02, overage 0.05.
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
    [plans.features.export]
    kind = "boolean"
    [plans.prices]
    currency = "USD"
    flat_fee = "10"
    [plans.prices.features.calls]
    included = "100"
    model = "per_unit"
    unit_price = "0.02"
    overage_unit_price = "0.05"
"#;

const CUSTOMERS: &str = r#"
    [[customers]]
    id = "ana"
    plan = "pro"

    [[customers]]
    id = "bo"
    plan = "pro"

    [[customers]]
    id = "fred"
    plan = "free"
"#;

/// A November of three customers decided into the lake: ana past pro's soft limit, bo
/// within it, fred refused by free's hard limit and by export being off.
async fn lake() -> Harness {
    let h = Harness::start().await;
    h.define(CATALOG, CUSTOMERS).await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    h.send("ana", "calls", 30, 5, "2026-11-05T10:00:00Z", Some("u1"))
        .await;
    h.send("ana", "export", 1, 1, "2026-11-06T10:00:00Z", Some("u1"))
        .await;
    h.send("ana", "export", 1, 1, "2026-11-07T10:00:00Z", Some("u2"))
        .await;
    h.send("bo", "calls", 10, 4, "2026-11-05T11:00:00Z", None)
        .await;
    h.send("fred", "calls", 12, 5, "2026-11-08T10:00:00Z", Some("f1"))
        .await;
    h.send("fred", "export", 1, 1, "2026-11-09T10:00:00Z", Some("f1"))
        .await;
    h.drain(&pipeline, 30 + 2 + 10 + 12 + 1).await;
    pipeline.shutdown().await.unwrap();
    h
}

async fn get(api: &TestApi, path: &str, key: Option<&str>, accept: Option<&str>) -> Response {
    let mut request = api.request(Method::GET, path, key);
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    request.send().await.unwrap()
}

async fn sql(api: &TestApi, key: Option<&str>, query: &str, accept: &str) -> Response {
    api.request(Method::POST, "/api/v1/sql", key)
        .header("accept", accept)
        .json(&serde_json::json!({ "query": query }))
        .send()
        .await
        .unwrap()
}

fn content_type(r: &Response) -> String {
    r.headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// A `200` body, checking its content type starts with `content_type`.
async fn ok(r: Response, content_type_prefix: &str) -> Vec<u8> {
    let status = r.status();
    let ct = content_type(&r);
    let body = r.bytes().await.unwrap().to_vec();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert!(ct.starts_with(content_type_prefix), "{ct}");
    body
}

/// A problem response of `status`.
async fn problem(r: Response, status: u16) -> Problem {
    let got = r.status().as_u16();
    let ct = content_type(&r);
    let body = r.text().await.unwrap();
    assert_eq!(got, status, "{body}");
    assert_eq!(ct, "application/problem+json", "{body}");
    serde_json::from_str(&body).unwrap()
}

fn batches(arrow: &[u8]) -> Vec<RecordBatch> {
    arrow::ipc::reader::StreamReader::try_new(Cursor::new(arrow), None)
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

/// A report route's Arrow answer, checked byte for byte against what the CLI prints for
/// `args` with `--format arrow`, as record batches.
async fn arrow_as_cli(
    h: &Harness,
    api: &TestApi,
    path: &str,
    key: &str,
    args: &[&str],
) -> Vec<RecordBatch> {
    let arrow = ok(get(api, path, Some(key), Some(ARROW)).await, ARROW).await;
    assert_eq!(
        arrow,
        h.cli(&[args, &["--format", "arrow"]].concat()),
        "{path}"
    );
    batches(&arrow)
}

fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

/// The text values of a column over every batch (null as `None`).
fn texts(batches: &[RecordBatch], name: &str) -> Vec<Option<String>> {
    batches
        .iter()
        .flat_map(|b| {
            let c = b.column_by_name(name).unwrap().as_string::<i32>().clone();
            (0..c.len())
                .map(move |i| (!c.is_null(i)).then(|| c.value(i).to_owned()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_overage_and_adoption_over_http_are_what_the_cli_prints() {
    let h = lake().await;
    let api = h.api().await;
    let billing = api.key(&h, Role::Billing, &[]).await;
    let analyst = api.key(&h, Role::Analyst, &[]).await;
    let portal = api.key(&h, Role::Portal, &["ana"]).await;
    let ingest = api.key(&h, Role::Ingest, &["ana"]).await;

    // Billing: JSON (the default, and for */*) and CSV byte for byte as the CLI.
    let json_cli = h.cli(&["billing", "--period", "2026-11", "--format", "json"]);
    let json = ok(
        get(&api, "/api/v1/billing?period=2026-11", Some(&billing), None).await,
        "application/json",
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&json),
        String::from_utf8_lossy(&json_cli)
    );
    let any = get(
        &api,
        "/api/v1/billing?period=2026-11",
        Some(&billing),
        Some("*/*"),
    )
    .await;
    assert_eq!(ok(any, "application/json").await, json_cli);
    let invoices: Vec<Value> = serde_json::from_slice(&json).unwrap();
    let customers: Vec<&str> = invoices
        .iter()
        .map(|i| i["customer"].as_str().unwrap())
        .collect();
    assert_eq!(customers, ["ana", "bo", "fred"]);
    // ana: 100 calls included, 50 overage × 0.05, the fee.
    assert_eq!(invoices[0]["total"], "12.50");

    let csv_cli = h.cli(&["billing", "--period", "2026-11", "--format", "csv"]);
    let csv = ok(
        get(
            &api,
            "/api/v1/billing?period=2026-11",
            Some(&billing),
            Some("text/csv"),
        )
        .await,
        "text/csv",
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&csv),
        String::from_utf8_lossy(&csv_cli)
    );

    // Arrow: byte for byte as the CLI's; the CSV's rows; each customer's amounts add up
    // to its JSON total.
    let arrow = arrow_as_cli(
        &h,
        &api,
        "/api/v1/billing?period=2026-11",
        &billing,
        &["billing", "--period", "2026-11"],
    )
    .await;
    let csv_rows = String::from_utf8(csv).unwrap().lines().count() - 1;
    assert_eq!(rows(&arrow), csv_rows);
    let events: i64 = arrow
        .iter()
        .map(|b| {
            b.column_by_name("events")
                .unwrap()
                .as_primitive::<Int64Type>()
                .iter()
                .flatten()
                .sum::<i64>()
        })
        .sum();
    let json_events: i64 = invoices
        .iter()
        .flat_map(|i| i["lines"].as_array().unwrap())
        .map(|l| l["events"].as_i64().unwrap())
        .sum();
    assert_eq!(events, json_events);
    let (who, amounts) = (texts(&arrow, "customer"), texts(&arrow, "amount"));
    for invoice in &invoices {
        let id = invoice["customer"].as_str().unwrap();
        let sum: Decimal = who
            .iter()
            .zip(&amounts)
            .filter(|(c, _)| c.as_deref() == Some(id))
            .filter_map(|(_, a)| a.as_deref())
            .map(|a| a.parse::<Decimal>().unwrap())
            .sum();
        let total: Decimal = invoice["total"].as_str().unwrap().parse().unwrap();
        assert_eq!(sum, total, "{id}");
    }

    // Preferences by q: Arrow over CSV.
    let r = get(
        &api,
        "/api/v1/billing?period=2026-11",
        Some(&billing),
        Some("text/csv;q=0.5, application/vnd.apache.arrow.stream;q=0.9"),
    )
    .await;
    assert_eq!(rows(&batches(&ok(r, ARROW).await)), csv_rows);

    // One customer, and anniversary billing, as the CLI.
    for (query, args) in [
        ("&customer=bo", &["--customer", "bo"][..]),
        ("&anniversary=true", &["--anniversary"][..]),
    ] {
        let mut want = vec!["billing", "--period", "2026-11", "--format", "json"];
        want.extend(args);
        let path = format!("/api/v1/billing?period=2026-11{query}");
        let got = ok(
            get(&api, &path, Some(&billing), None).await,
            "application/json",
        )
        .await;
        assert_eq!(got, h.cli(&want), "{query}");
    }

    // Overage: JSON and CSV as the CLI; Arrow the rows of its three parts.
    let overage_cli = h.cli(&["overage", "--period", "2026-11", "--format", "json"]);
    let overage = ok(
        get(&api, "/api/v1/overage?period=2026-11", Some(&billing), None).await,
        "application/json",
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&overage),
        String::from_utf8_lossy(&overage_cli)
    );
    let report: Value = serde_json::from_slice(&overage).unwrap();
    let parts = ["over", "rejections", "upgrades"];
    let count = |part: &str| report[part].as_array().unwrap().len();
    assert!(parts.iter().all(|p| count(p) > 0), "{report}");
    let csv = ok(
        get(
            &api,
            "/api/v1/overage?period=2026-11",
            Some(&billing),
            Some("text/csv"),
        )
        .await,
        "text/csv",
    )
    .await;
    assert_eq!(
        csv,
        h.cli(&["overage", "--period", "2026-11", "--format", "csv"])
    );
    let arrow = arrow_as_cli(
        &h,
        &api,
        "/api/v1/overage?period=2026-11",
        &billing,
        &["overage", "--period", "2026-11"],
    )
    .await;
    let sections = texts(&arrow, "section");
    for part in parts {
        let n = sections
            .iter()
            .filter(|s| s.as_deref() == Some(part))
            .count();
        assert_eq!(n, count(part), "{part}");
    }
    assert_eq!(arrow[0].schema().field(0).name(), "section");
    assert!(
        texts(&arrow, "period")
            .iter()
            .all(|p| p.as_deref() == Some("2026-11"))
    );

    // Adoption: as the CLI, `to` included.
    let range = "from=2026-11-01&to=2026-11-30";
    let args = ["adoption", "--from", "2026-11-01", "--to", "2026-11-30"];
    let adoption = ok(
        get(
            &api,
            &format!("/api/v1/adoption?{range}"),
            Some(&analyst),
            None,
        )
        .await,
        "application/json",
    )
    .await;
    let adoption_cli = h.cli(&[&args[..], &["--format", "json"]].concat());
    assert_eq!(
        String::from_utf8_lossy(&adoption),
        String::from_utf8_lossy(&adoption_cli)
    );
    let report: Value = serde_json::from_slice(&adoption).unwrap();
    assert!(
        !report["features"].as_array().unwrap().is_empty(),
        "{report}"
    );
    let csv = ok(
        get(
            &api,
            &format!("/api/v1/adoption?{range}"),
            Some(&analyst),
            Some("text/*"),
        )
        .await,
        "text/csv",
    )
    .await;
    assert_eq!(csv, h.cli(&[&args[..], &["--format", "csv"]].concat()));
    let arrow = arrow_as_cli(
        &h,
        &api,
        &format!("/api/v1/adoption?{range}"),
        &analyst,
        &args,
    )
    .await;
    let rows_in_json: usize = report
        .as_object()
        .unwrap()
        .values()
        .filter_map(Value::as_array)
        .map(Vec::len)
        .sum();
    assert_eq!(rows(&arrow), rows_in_json);
    let path = format!("/api/v1/adoption?{range}&feature=export");
    let one = ok(
        get(&api, &path, Some(&analyst), None).await,
        "application/json",
    )
    .await;
    let want = h.cli(&[&args[..], &["--feature", "export", "--format", "json"]].concat());
    assert_eq!(one, want);

    // SQL over the lake.
    let counts = ok(
        sql(
            &api,
            Some(&analyst),
            "SELECT customer, COUNT(*) AS events FROM events GROUP BY customer ORDER BY customer",
            "application/json",
        )
        .await,
        "application/json",
    )
    .await;
    assert_eq!(
        serde_json::from_slice::<Value>(&counts).unwrap(),
        serde_json::json!([
            {"customer": "ana", "events": 32},
            {"customer": "bo", "events": 10},
            {"customer": "fred", "events": 13},
        ])
    );

    // Roles: billing reads billing and overage; analyst adoption and SQL; admin all.
    let november = "/api/v1/billing?period=2026-11";
    let over = "/api/v1/overage?period=2026-11";
    let adopt = format!("/api/v1/adoption?{range}");
    let adopt = adopt.as_str();
    for (key, billing_ok, analyst_ok) in [
        (&billing, true, false),
        (&analyst, false, true),
        (&api.admin, true, true),
        (&ingest, false, false),
    ] {
        let status = |ok: bool| if ok { 200 } else { 403 };
        for (path, allowed) in [
            (november, billing_ok),
            (over, billing_ok),
            (adopt, analyst_ok),
        ] {
            let r = get(&api, path, Some(key), None).await;
            assert_eq!(r.status().as_u16(), status(allowed), "{path}");
        }
        let r = sql(&api, Some(key), "SELECT 1 AS one", "application/json").await;
        assert_eq!(r.status().as_u16(), status(analyst_ok));
    }

    // A portal key: its own customer's invoice only, nothing else here.
    let own = ok(
        get(&api, november, Some(&portal), None).await,
        "application/json",
    )
    .await;
    let own_invoices: Vec<Value> = serde_json::from_slice(&own).unwrap();
    assert_eq!(own_invoices.len(), 1);
    assert_eq!(own_invoices[0]["customer"], "ana");
    assert_eq!(
        own,
        h.cli(&[
            "billing",
            "--period",
            "2026-11",
            "--customer",
            "ana",
            "--format",
            "json"
        ])
    );
    let asked = ok(
        get(
            &api,
            &format!("{november}&customer=ana"),
            Some(&portal),
            Some("text/csv"),
        )
        .await,
        "text/csv",
    )
    .await;
    assert!(
        String::from_utf8(asked)
            .unwrap()
            .lines()
            .skip(1)
            .all(|l| l.starts_with("ana,"))
    );
    let other = get(
        &api,
        &format!("{november}&customer=bo"),
        Some(&portal),
        None,
    )
    .await;
    let p = problem(other, 403).await;
    assert!(p.detail.contains("\"bo\""), "{}", p.detail);
    for path in [over, adopt] {
        problem(get(&api, path, Some(&portal), None).await, 403).await;
    }
    problem(
        sql(&api, Some(&portal), "SELECT 1", "application/json").await,
        403,
    )
    .await;

    // No key.
    for path in [november, over, adopt] {
        problem(get(&api, path, None, None).await, 401).await;
    }
    problem(sql(&api, None, "SELECT 1", "application/json").await, 401).await;

    // Bad parameters name themselves.
    for (path, key, field) in [
        ("/api/v1/billing?period=2026-13", &billing, "period"),
        ("/api/v1/billing?period=november", &billing, "period"),
        ("/api/v1/billing", &billing, "period"),
        (
            "/api/v1/billing?period=2026-11&anniversary=maybe",
            &billing,
            "anniversary",
        ),
        (
            "/api/v1/billing?period=2026-11&customers=ana",
            &billing,
            "customers",
        ),
        ("/api/v1/overage?period=2026-1", &billing, "period"),
        (
            "/api/v1/adoption?from=2026-11-31&to=2026-12-01",
            &analyst,
            "from",
        ),
        (
            "/api/v1/adoption?from=2026-11-01&to=tomorrow",
            &analyst,
            "to",
        ),
        (
            "/api/v1/adoption?from=2026-11-02&to=2026-11-01",
            &analyst,
            "to",
        ),
        ("/api/v1/adoption?to=2026-11-01", &analyst, "from"),
    ] {
        let p = problem(get(&api, path, Some(key), None).await, 400).await;
        assert_eq!(p.field.as_deref(), Some(field), "{path}: {}", p.detail);
    }

    // 406 for a format none of the routes send, naming the three.
    for path in [november, over, adopt] {
        let p = problem(
            get(&api, path, Some(&api.admin), Some("text/html")).await,
            406,
        )
        .await;
        assert_eq!(p.field.as_deref(), Some("accept"));
        for media in ["application/json", "text/csv", ARROW] {
            assert!(p.detail.contains(media), "{}", p.detail);
        }
    }
    problem(
        sql(&api, Some(&analyst), "SELECT 1", "text/html").await,
        406,
    )
    .await;

    // The OpenAPI document lists the four routes, with the key and their problems.
    let doc: Value = get(&api, "/api/v1/openapi.json", None, None)
        .await
        .json()
        .await
        .unwrap();
    for (path, method) in [
        ("/api/v1/billing", "get"),
        ("/api/v1/overage", "get"),
        ("/api/v1/adoption", "get"),
        ("/api/v1/sql", "post"),
    ] {
        let op = &doc["paths"][path][method];
        assert_eq!(
            op["security"],
            serde_json::json!([{"api_key": []}]),
            "{path}"
        );
        assert_eq!(op["tags"], serde_json::json!(["reports"]), "{path}");
        let ok = &op["responses"]["200"]["content"];
        for media in ["application/json", "text/csv", ARROW] {
            assert!(ok.get(media).is_some(), "{path}: {media}");
        }
        assert!(op["responses"]["406"].is_object(), "{path}");
    }
    // Each report's JSON body is described field by field.
    let schema = |path: &str| {
        doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
            .clone()
    };
    assert_eq!(
        schema("/api/v1/billing")["items"]["$ref"],
        "#/components/schemas/Invoice"
    );
    assert_eq!(
        schema("/api/v1/overage")["$ref"],
        "#/components/schemas/OverageReport"
    );
    assert_eq!(
        schema("/api/v1/adoption")["$ref"],
        "#/components/schemas/AdoptionReport"
    );
    let components = &doc["components"]["schemas"];
    let fields = |name: &str| -> Vec<String> {
        components[name]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{name}: {}", components[name]))
            .keys()
            .cloned()
            .collect()
    };
    for (name, field) in [
        ("Invoice", "total"),
        ("Invoice", "lines"),
        ("InvoiceLine", "amount"),
        ("OverageReport", "upgrades"),
        ("OverLine", "over_percent"),
        ("AdoptionReport", "free_tier"),
        ("FeatureAdoption", "activation_rate"),
    ] {
        assert!(fields(name).iter().any(|f| f == field), "{name}.{field}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_over_http_streams_its_result_and_refuses_what_is_not_a_query() {
    let h = Harness::start().await;
    let api = h.api().await;
    let analyst = api.key(&h, Role::Analyst, &[]).await;
    let billing = api.key(&h, Role::Billing, &[]).await;
    let many = "SELECT value FROM range(300000)";

    // JSON: one array; streamed (no length known ahead), batch after batch.
    let r = sql(&api, Some(&analyst), many, "application/json").await;
    assert_eq!(r.content_length(), None);
    let json: Vec<Value> = serde_json::from_slice(&ok(r, "application/json").await).unwrap();
    assert_eq!(json.len(), 300_000);
    assert_eq!(json[299_999], serde_json::json!({"value": 299_999}));
    // CSV: one header.
    let csv = ok(
        sql(&api, Some(&analyst), many, "text/csv").await,
        "text/csv",
    )
    .await;
    let csv = String::from_utf8(csv).unwrap();
    assert_eq!(csv.lines().count(), 300_001);
    assert_eq!(csv.lines().filter(|l| *l == "value").count(), 1);
    // Arrow: several record batches.
    let arrow = batches(&ok(sql(&api, Some(&analyst), many, ARROW).await, ARROW).await);
    assert_eq!(rows(&arrow), 300_000);
    assert!(arrow.len() > 1, "{} batches", arrow.len());
    // No rows: still a whole document.
    let none = ok(
        sql(
            &api,
            Some(&analyst),
            "SELECT value FROM range(0)",
            "application/json",
        )
        .await,
        "application/json",
    )
    .await;
    assert_eq!(none, b"[]\n");
    let none = sql(
        &api,
        Some(&analyst),
        "SELECT value FROM range(0)",
        "text/csv",
    )
    .await;
    assert_eq!(ok(none, "text/csv").await, b"value\n");

    // The query as the body's text.
    for content_type in ["text/plain", "application/sql", "text/plain; charset=utf-8"] {
        let r = api
            .request(Method::POST, "/api/v1/sql", Some(&analyst))
            .header("content-type", content_type)
            .header("accept", "text/csv")
            .body("SELECT 40 + 2 AS answer")
            .send()
            .await
            .unwrap();
        assert_eq!(ok(r, "text/csv").await, b"answer\n42\n", "{content_type}");
    }
    let r = api
        .request(Method::POST, "/api/v1/sql", Some(&analyst))
        .header("content-type", "application/xml")
        .body("<query/>")
        .send()
        .await
        .unwrap();
    problem(r, 415).await;
    let r = api
        .request(Method::POST, "/api/v1/sql", Some(&analyst))
        .json(&serde_json::json!({"sql": "SELECT 1"}))
        .send()
        .await
        .unwrap();
    // (The shared JSON body reader names an unknown top-level field twice, `sql.sql`.)
    let p = problem(r, 400).await;
    assert!(p.detail.contains("unknown field `sql`"), "{}", p.detail);

    // Refused: every kind names the field `query` and says why.
    for (query, named) in [
        (
            "DROP TABLE events",
            "DROP TABLE defines tables or views (DDL)",
        ),
        (
            "CREATE TABLE t AS SELECT 1",
            "CREATE TABLE defines tables or views (DDL)",
        ),
        (
            "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
            "CREATE EXTERNAL TABLE defines tables or views (DDL)",
        ),
        (
            "INSERT INTO events SELECT * FROM events",
            "INSERT modifies data (DML)",
        ),
        ("DELETE FROM events", "DELETE modifies data (DML)"),
        (
            "COPY events TO '/tmp/tally-api-copy.csv'",
            "COPY reads or writes files",
        ),
        (
            "SET datafusion.execution.batch_size = 1",
            "changes the session's configuration",
        ),
        (
            "SELECT * FROM read_parquet('/etc/passwd')",
            "table function read_parquet(…) is not allowed",
        ),
        ("SELECT 1; SELECT 2", "2 statements given"),
        ("", "no statement given"),
        ("SELECT * FROM invoices", "unknown table invoices"),
        ("SELEC 1", "syntax error"),
        ("SELECT nothing FROM events", "nothing"),
    ] {
        let p = problem(sql(&api, Some(&analyst), query, "text/csv").await, 400).await;
        assert_eq!(p.field.as_deref(), Some("query"), "{query}");
        assert!(p.detail.contains(named), "{query}: {}", p.detail);
    }
    assert!(!std::path::Path::new("/tmp/tally-api-copy.csv").exists());

    // The roles: analyst yes, billing no.
    problem(sql(&api, Some(&billing), "SELECT 1", "text/csv").await, 403).await;
    let r = sql(&api, Some(&analyst), "SELECT 1 AS one", "text/csv").await;
    assert_eq!(ok(r, "text/csv").await, b"one\n1\n");
}

/// Serves the API with `reports`; answers its base URL and an admin key.
async fn serve(h: &Harness, reports: LakeReports, stop: &CancellationToken) -> (String, String) {
    let state = AppState::open(
        h.nats.jetstream.clone(),
        h.config.ingest.partitions,
        h.config.ingest.replicas,
        h.config.ingest.limits,
        h.config.api.clone(),
        reports,
        None,
        stop.clone(),
    )
    .await
    .unwrap();
    let admin = state
        .keys
        .create(Role::Admin, Vec::new(), String::new())
        .await
        .unwrap()
        .token;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(tally_api::serve(listener, state, stop.clone()));
    (base, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_limits_answer_with_a_clear_status_and_the_server_goes_on() {
    let h = Harness::start().await;
    let stop = CancellationToken::new();
    let http = common::http();
    let post = |base: &str, key: &str, query: &str, accept: &str| {
        http.post(format!("{base}/api/v1/sql"))
            .bearer_auth(key)
            .header("accept", accept)
            .json(&serde_json::json!({ "query": query }))
            .send()
    };

    // Past the time limit before any row: 504, promptly.
    let timed = LakeReports::new(h.config.lake()).with_limits(
        LakeReports::DEFAULT_SQL_MEMORY_LIMIT,
        Duration::from_secs(1),
    );
    let (base, admin) = serve(&h, timed, &stop).await;
    let slow = "SELECT SUM(a.value + b.value) AS s FROM range(100000) a CROSS JOIN range(100000) b";
    let started = Instant::now();
    let r = post(&base, &admin, slow, "application/json").await.unwrap();
    let p = problem(r, 504).await;
    assert_eq!(p.kind, "urn:tally:problem:timeout");
    assert!(
        p.detail
            .contains("time limit of 1 s exceeded; the query was cancelled"),
        "{}",
        p.detail
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    // The server answers at once, and runs the next query.
    let started = Instant::now();
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let r = post(&base, &admin, "SELECT 1 AS one", "text/csv")
        .await
        .unwrap();
    assert_eq!(ok(r, "text/csv").await, b"one\n1\n");

    // Past the time limit after rows were sent: the status was 200, and the body ends
    // early, as an error rather than a clean end.
    let endless =
        "SELECT a.value AS a, b.value AS b FROM range(100000) a CROSS JOIN range(100000) b";
    let r = post(&base, &admin, endless, "text/csv").await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut r = r;
    let mut received = Vec::new();
    let cut = loop {
        match r.chunk().await {
            Ok(Some(chunk)) => received.extend_from_slice(&chunk),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(cut, "the body of a query past its limit ended cleanly");
    assert!(received.starts_with(b"a,b\n"));
    let r = post(&base, &admin, "SELECT 2 AS two", "text/csv")
        .await
        .unwrap();
    assert_eq!(ok(r, "text/csv").await, b"two\n2\n");

    // Past the memory limit: 400, the query at fault; the next query runs.
    let big = "SELECT COUNT(DISTINCT value) AS n FROM range(3000000)";
    let small = LakeReports::new(h.config.lake()).with_limits(1024 * 1024, Duration::from_secs(60));
    let buckets = tally_ingest::definitions::Definitions::open(&h.nats.jetstream, 1)
        .await
        .unwrap();
    match small.sql(big.to_owned(), Format::Json, buckets).await {
        Err(ReportError::TooMuchMemory(message)) => {
            assert!(
                message.starts_with("memory limit of 1 MiB exceeded"),
                "{message}"
            );
        }
        Err(e) => panic!("expected the memory limit, got {e}"),
        Ok(_) => panic!("expected the memory limit, the query ran"),
    }
    let (base, admin) = serve(&h, small, &stop).await;
    let p = problem(post(&base, &admin, big, ARROW).await.unwrap(), 400).await;
    assert_eq!(p.kind, "urn:tally:problem:memory_limit");
    assert_eq!(p.field.as_deref(), Some("query"));
    let r = post(&base, &admin, "SELECT 3 AS three", "text/csv")
        .await
        .unwrap();
    assert_eq!(ok(r, "text/csv").await, b"three\n3\n");
    stop.cancel();
}
