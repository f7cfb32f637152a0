//! The `tally` commands as a user or a script runs them: real processes, real
//! nats-servers.

use crate::common;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tally::workload::{self, Spec};

#[test]
fn demo_prints_matching_totals_as_json_and_leaves_a_hive_lake() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "demo",
            "--events",
            "20000",
            "--customers",
            "40",
            "--format",
            "json",
        ])
        .arg("--data-dir")
        .arg(&data)
        .env("TALLY_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().unwrap();
    let report: serde_json::Value = serde_json::from_str(last).unwrap();
    for key in [
        "events_generated",
        "events_valid",
        "events_in_lake",
        "quantity_generated",
        "quantity_billed",
        "match",
    ] {
        assert!(report.get(key).is_some(), "{key} missing from {last}");
    }
    assert_eq!(report["match"], true);
    assert_eq!(report["events_generated"], 20_000);
    assert_eq!(report["events_in_lake"], report["events_valid"]);
    // Enforcement: the lake's decisions and billed quantity equal the demo's own replay,
    // and the catalogue refuses part of the usage in several ways.
    assert_eq!(report["decisions"], report["decisions_expected"]);
    assert_eq!(report["quantity_billed"], report["quantity_expected"]);
    let billed = report["quantity_billed"].as_f64().unwrap();
    assert!(billed > 0.0 && billed < report["quantity_generated"].as_f64().unwrap());
    for decision in ["accepted", "not_entitled", "seat_limit", "expired"] {
        assert!(
            report["decisions"][decision].as_u64().unwrap_or(0) > 0,
            "no {decision} in {last}"
        );
    }
    // A Delta table: its log, and its files in a directory per date.
    let events = data.join("lake/events");
    assert!(events.join("_delta_log").is_dir());
    let dates: Vec<_> = std::fs::read_dir(&events)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name != "_delta_log")
        .collect();
    assert!(!dates.is_empty());
    assert!(
        dates
            .iter()
            .all(|d| d.starts_with("date=") && d.len() == "date=2026-11-01".len())
    );

    // `tally billing` rates the same lake with the demo catalogue's prices: its usage
    // lines add up to what the demo billed, and each invoice's total is its lines' sum.
    let period = report["period"].as_str().unwrap();
    let billing = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "billing",
            "--period",
            period,
            "--format",
            "csv",
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        billing.status.success(),
        "{}",
        String::from_utf8_lossy(&billing.stderr)
    );
    let csv = String::from_utf8(billing.stdout).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some(
            "customer,period,currency,kind,plan,item,events,quantity,included,charged,unit_price,amount"
        )
    );
    let (mut events, mut quantity, mut charged_lines) = (0u64, 0f64, 0);
    let mut kinds = std::collections::BTreeSet::new();
    for line in lines {
        let cols: Vec<&str> = line.split(',').collect();
        assert_eq!(cols.len(), 12, "{line}");
        kinds.insert(cols[3].to_owned());
        if cols[3] == "usage" {
            events += cols[6].parse::<u64>().unwrap();
            quantity += cols[7].parse::<f64>().unwrap();
        }
        if cols[11] != "0.00" && !cols[11].is_empty() {
            charged_lines += 1;
        }
    }
    assert_eq!(events, report["events_billed"].as_u64().unwrap());
    assert_eq!(quantity, report["quantity_billed"].as_f64().unwrap());
    assert!(charged_lines > 0, "the demo's prices charge something");
    assert!(
        kinds.contains("flat_fee") && kinds.contains("usage"),
        "{kinds:?}"
    );
    let json = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "billing",
            "--period",
            period,
            "--format",
            "json",
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .unwrap();
    let invoices: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    for invoice in invoices.as_array().unwrap() {
        let sum: f64 = invoice["lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["amount"].as_str().unwrap().parse::<f64>().unwrap())
            .sum();
        let total: f64 = invoice["total"].as_str().unwrap().parse().unwrap();
        assert!((sum - total).abs() < 1e-9, "{invoice}");
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["billing", "--period", "2026-13", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected YYYY-MM"));

    // A second run reuses the directory it made; a foreign directory is refused.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("precious.txt"), "keep").unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["demo", "--events", "100", "--format", "json", "--data-dir"])
        .arg(&foreign)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not made by `tally demo`"));
    assert!(foreign.join("precious.txt").exists());
}

/// `tally serve` against an existing NATS. SIGTERM drains: what the worker holds becomes
/// durable and acknowledged before it exits (the flush age is too long for anything else
/// to write it). A second `serve` picks up whatever the first had not taken in, and the
/// lake ends with every event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_drains_on_sigterm_and_a_restart_loses_nothing() {
    let h = common::Harness::start().await;
    let first = common::serve(&h, "600000");
    // `tally serve` answers HTTP too.
    let api = first
        .1
        .clone()
        .expect("tally serve names its API's address");
    let health = common::http()
        .get(format!("{api}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), reqwest::StatusCode::OK);
    let mut spec = Spec::new(3_000, chrono::NaiveDate::from_ymd_opt(2026, 9, 1).unwrap());
    spec.customers = 30;
    spec.batch = 20;
    let (messages, totals) = workload::generate(&spec);
    let deadline = Instant::now() + Duration::from_secs(60);
    // Publish once `serve` has created the topology.
    while common::consumer_backlog_ready(&h).await.is_none() {
        assert!(
            Instant::now() < deadline,
            "tally serve never created its consumers"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    workload::publish(&h.nats.jetstream, &messages, 256, |_| {})
        .await
        .unwrap();
    while common::consumer_backlog(&h).await.0 > 0 {
        assert!(
            Instant::now() < deadline,
            "messages not delivered to tally serve"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(common::lake_rows(&h), 0, "written before the drain");
    common::terminate(first);
    let drained = common::lake_rows(&h);
    assert!(drained > 0, "SIGTERM wrote nothing");

    let second = common::serve(&h, "100");
    while common::consumer_backlog(&h).await != (0, 0)
        || common::lake_rows(&h) < totals.events_valid
    {
        assert!(
            Instant::now() < deadline,
            "the second serve did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    common::terminate(second);
    assert_eq!(common::lake_rows(&h), totals.events_valid);
}

/// The load generator runs end to end and reports what it measured (figures are for
/// BENCHMARKS.md, not asserted here beyond their presence and consistency).
#[test]
fn bench_ingest_reports_json_with_a_baseline() {
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "bench",
            "ingest",
            "--events",
            "3000",
            "--batch",
            "10",
            "--customers",
            "20",
            "--baseline",
            "--format",
            "json",
        ])
        .env("TALLY_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["events"], 3000);
    assert_eq!(report["encoding"], "json");
    assert!(report["messages"].as_u64().unwrap() >= 300);
    for key in [
        "events_per_sec",
        "baseline_events_per_sec",
        "ratio_to_baseline",
    ] {
        assert!(report[key].as_f64().unwrap() > 0.0, "{key} in {report}");
    }
    let (p50, p99, p999) = (
        report["latency_ms_p50"].as_u64().unwrap(),
        report["latency_ms_p99"].as_u64().unwrap(),
        report["latency_ms_p999"].as_u64().unwrap(),
    );
    assert!(p50 >= 1 && p50 <= p99 && p99 <= p999, "{report}");
}

/// A worker killed with SIGKILL while it holds delivered, unacknowledged messages strands
/// none of them: the next worker starts again at the consumer's ack floor, so acking the
/// newer messages published in between cannot acknowledge the older ones unprocessed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_strands_nothing_it_had_not_made_durable() {
    let h = common::Harness::start().await;
    let mut first = common::serve(&h, "600000");
    let batch = |seed: u64| {
        let mut spec = Spec::new(2_000, chrono::NaiveDate::from_ymd_opt(2026, 7, 1).unwrap());
        spec.customers = 25;
        spec.batch = 10;
        spec.seed = seed;
        workload::generate(&spec)
    };
    let (before, before_totals) = batch(1);
    workload::publish(&h.nats.jetstream, &before, 256, |_| {})
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (pending, unacked) = common::consumer_backlog(&h).await;
        if pending == 0 && unacked == before.len() as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "messages not delivered to the first worker"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    assert_eq!(
        common::lake_rows(&h),
        0,
        "nothing was durable before the kill"
    );

    let (after, after_totals) = batch(2);
    workload::publish(&h.nats.jetstream, &after, 256, |_| {})
        .await
        .unwrap();
    let expected = before_totals.events_valid + after_totals.events_valid;
    let second = common::serve(&h, "100");
    while common::consumer_backlog(&h).await != (0, 0) || common::lake_rows(&h) < expected {
        assert!(
            Instant::now() < deadline,
            "lake holds {} of {expected} events",
            common::lake_rows(&h)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    common::terminate(second);
    assert_eq!(common::lake_rows(&h), expected);
}

/// With the embedded default, a command run beside `tally serve` on the same data
/// directory uses that serve's nats-server: it neither starts a second server on the same
/// store nor stops the running one.
#[test]
fn a_command_beside_a_running_serve_shares_its_embedded_nats_server() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let tally = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tally"));
        c.arg("--data-dir")
            .arg(dir.path())
            .env("TALLY_LOG", "info")
            // The API on a free port: a `tally serve` of another test may hold the default.
            .env("TALLY_API__LISTEN", "127.0.0.1:0");
        c
    };
    let mut child = tally()
        .arg("serve")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    let running = lines.by_ref().any(|l| {
        let l = l.unwrap_or_default();
        let running = l.contains("tally is running");
        log.push(l);
        running
    });
    assert!(
        running,
        "tally serve exited before it was running:\n{}",
        log.join("\n")
    );
    std::thread::spawn(move || lines.for_each(drop));
    let serve = common::Serve(child, None);
    let pid_file = dir.path().join("nats/nats-server.pid");
    let server = std::fs::read_to_string(&pid_file).unwrap();

    let catalog = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/catalog.toml");
    let applied = tally().args(["plans", "apply", catalog]).output().unwrap();
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    assert!(String::from_utf8_lossy(&applied.stdout).contains("free"));
    assert!(String::from_utf8_lossy(&applied.stderr).contains("using the nats-server"));
    let listed = tally().args(["plans", "list"]).output().unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains("plan free (Free)"));

    // The same server still runs, under serve, which drains and exits cleanly.
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap(), server);
    assert!(Path::new(&format!("/proc/{}", server.trim())).exists());
    common::terminate(serve);
}
