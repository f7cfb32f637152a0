//! OpenMeter's own JavaScript SDK (`@openmeter/sdk`, the version pinned in
//! `tests/openmeter/package-lock.json`, installed by `scripts/install-openmeter-sdk.sh`)
//! run with node against Tally's API, as an OpenMeter user's code would run it unchanged:
//! it ingests a workload (retrying a batch), defines a meter, queries it by customer, by
//! day in New York time, by a group-by and filtered, and reads entitlement values. Every
//! answer is compared with polars' own computation over the lake's Delta table (JSON
//! extraction, time zones and sums written apart from Tally's meter code).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tally::pipeline;

use crate::common::Harness;

const CATALOG: &str = r#"
    [[plans]]
    id = "ai"
    name = "AI"
    [plans.features.prompt]
    kind = "metered"
"#;

const CUSTOMERS: &str = r#"
    [[customers]]
    id = "c1"
    plan = "ai"
    [[customers]]
    id = "c2"
    plan = "ai"
    [[customers]]
    id = "c3"
    plan = "ai"
"#;

/// polars over the events table: the meter's sums, computed its own way.
const EXPECTED: &str = r#"
import json, sys
import polars as pl
# The columns read: the Delta schema calls stream_seq a long, its files an unsigned one.
t = pl.scan_delta(sys.argv[1]).select(
    "customer", "event_type", "decision", "data", "event_time", "quantity").collect()
t = t.filter((pl.col("event_type") == "prompt") & pl.col("decision").is_in(["accepted", "overage", "late"]))
t = t.with_columns(
    pl.col("data").str.json_path_match("$.tokens").cast(pl.Float64, strict=False).alias("tokens"),
    pl.col("data").str.json_path_match("$.model").alias("model"),
)
def sums(frame, key):
    return {str(r[key]): r["tokens"] for r in frame.group_by(key).agg(pl.col("tokens").sum()).to_dicts()}
c1 = t.filter(pl.col("customer") == "c1").with_columns(
    pl.col("event_time").dt.convert_time_zone("America/New_York").dt.truncate("1d").alias("day"))
days = {r["day"].isoformat(): r["tokens"] for r in c1.group_by("day").agg(pl.col("tokens").sum()).to_dicts()}
november = c1.filter(pl.col("event_time").dt.month() == 11)
print(json.dumps({
    "rows": t.height,
    "by_customer": sums(t, "customer"),
    "by_day": days,
    "by_model": sums(t, "model"),
    "claude_of_c2": t.filter((pl.col("customer") == "c2") & (pl.col("model") == "claude"))["tokens"].sum(),
    "c1_november_quantity": november["quantity"].sum(),
}))
"#;

fn sdk_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openmeter");
    assert!(
        dir.join("node_modules/@openmeter/sdk/package.json")
            .is_file(),
        "OpenMeter's SDK is not installed in {}: run scripts/install-openmeter-sdk.sh",
        dir.display()
    );
    dir
}

/// Runs one phase of `client.mjs`, which must succeed: the JSON it prints.
async fn client(phase: &'static str, url: String, key: String) -> Value {
    let dir = sdk_dir();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(dir.join("client.mjs"))
            .arg(phase)
            .env("TALLY_URL", url)
            .env("TALLY_KEY", key)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "node client.mjs {phase}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn polars(table: &Path) -> Value {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let out = Command::new(&python)
        .args(["-c", EXPECTED])
        .arg(table)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}: run scripts/install-lake-readers.sh",
                python.display()
            )
        });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn instant(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("a time: {v}")))
        .unwrap()
        .with_timezone(&Utc)
}

fn close(got: &Value, want: &Value, what: &str) {
    let (g, w) = (got.as_f64().unwrap(), want.as_f64().unwrap());
    assert!((g - w).abs() < 1e-6, "{what}: Tally {g}, polars {w}");
}

/// `rows` keyed by `key(row)`, their values.
fn keyed(rows: &Value, key: impl Fn(&Value) -> String) -> BTreeMap<String, Value> {
    rows["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (key(r), r["value"].clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openmeters_javascript_sdk_meters_and_reads_what_polars_reads_in_the_lake() {
    let h = Harness::start().await;
    h.define(CATALOG, CUSTOMERS).await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    let api = h.api_with(pipeline.local_checks.clone()).await;

    let ingested = client("ingest", api.base.clone(), api.admin.clone()).await;
    assert_eq!(ingested["sent"], 600);
    h.drain(&pipeline, 600).await;
    let om = client("query", api.base.clone(), api.admin.clone()).await;
    pipeline.shutdown().await.unwrap();
    let want = polars(&h.lake_events());
    assert_eq!(want["rows"], 600, "the retried batch is in the lake once");

    assert_eq!(om["created"]["slug"], "tokens");
    assert_eq!(om["created"]["id"].as_str().unwrap().len(), 26);
    assert_eq!(om["got"], om["created"]);
    assert_eq!(om["listed"].as_array().unwrap().len(), 1);

    let by_customer = keyed(&om["byCustomer"], |r| {
        r["subject"].as_str().unwrap().to_owned()
    });
    let expected = want["by_customer"].as_object().unwrap();
    assert_eq!(by_customer.len(), expected.len(), "{}", om["byCustomer"]);
    for (customer, value) in &by_customer {
        close(value, &expected[customer], customer);
    }

    // Days in New York time: the SDK hands windows back as instants.
    let by_day = keyed(&om["byDay"], |r| instant(&r["windowStart"]).to_rfc3339());
    let expected: BTreeMap<String, Value> = want["by_day"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (instant(&Value::from(k.as_str())).to_rfc3339(), v.clone()))
        .collect();
    assert_eq!(
        by_day.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "{}",
        om["byDay"]
    );
    assert_eq!(by_day.len(), 5, "2026-11-09 to 2026-11-13 in New York");
    for (day, value) in &by_day {
        close(value, &expected[day], day);
    }
    for row in om["byDay"]["data"].as_array().unwrap() {
        let hours = (instant(&row["windowEnd"]) - instant(&row["windowStart"])).num_hours();
        assert_eq!(hours, 24, "{row}");
    }

    let by_model = keyed(&om["byModel"], |r| {
        r["groupBy"]["model"].as_str().unwrap().to_owned()
    });
    let expected = want["by_model"].as_object().unwrap();
    assert_eq!(by_model.len(), 2);
    for (model, value) in &by_model {
        close(value, &expected[model], model);
    }

    let filtered = om["claudeOfC2"]["data"].as_array().unwrap();
    assert_eq!(filtered.len(), 1, "{}", om["claudeOfC2"]);
    close(
        &filtered[0]["value"],
        &want["claude_of_c2"],
        "c2's claude tokens",
    );

    // The entitlement now (a month without usage), and in the workload's month.
    assert_eq!(om["value"]["hasAccess"], true);
    close(&om["value"]["usage"], &Value::from(0.0), "usage this month");
    assert_eq!(om["valueV2"]["hasAccess"], true);
    close(
        &om["valueV2"]["usage"],
        &want["c1_november_quantity"],
        "c1's November",
    );
}
