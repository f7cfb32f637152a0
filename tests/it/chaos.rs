//! The fault suite against real processes: `tally chaos` publishes while the worker is
//! killed with SIGKILL, nats-server is killed and restarted, a worker is paused past its
//! leases while another takes over, and the lake refuses writes for a while; then the lake must hold every acknowledged event exactly once, and the
//! billing must equal the generator's.
//!
//! It runs with the lake on local disk, and in a bucket of the S3 server (stopped and
//! started again mid-run in place of the unwritable directory). The short form runs in CI.
//! `TALLY_CHAOS_LONG=1` runs the full form: 1,000,000 events, 10 kills, 2 nats-server
//! restarts, 3 s of an unwritable lake.

use std::process::Command;

use serde_json::Value;

#[test]
fn every_acknowledged_event_lands_once_through_kills_restarts_and_an_unwritable_lake() {
    chaos(&[]);
}

/// The same with the lake in a bucket of the S3 server, which is stopped and started again
/// mid-run in place of the unwritable directory.
#[test]
fn on_s3_every_acknowledged_event_lands_once_through_kills_and_restarts() {
    let report = chaos(&["--s3"]);
    assert_eq!(report["lake"], "s3");
    assert_eq!(report["s3_restarts"], 1, "the S3 server was restarted");
}

/// Past one machine: three NATS nodes (three replicas), three workers on data directories
/// of their own, the lake on the S3 server; each NATS node in turn is killed and started
/// again while publishing goes on through the others, and halfway the partition count
/// grows from 16 to 64.
#[test]
fn on_a_cluster_every_acknowledged_event_lands_once_through_node_and_worker_kills() {
    let report = chaos(&["--cluster", "--nats-restarts", "3", "--grow-to", "64"]);
    let partitions = report["partitions"].as_str().unwrap();
    assert!(
        partitions.starts_with("16@") && partitions.ends_with(",64"),
        "{partitions}"
    );
    assert_eq!(report["lake"], "s3");
    assert_eq!(report["nats_nodes"], 3);
    assert_eq!(
        report["replicas"], 3,
        "every stream and bucket on every node"
    );
    assert_eq!(report["workers"], 3);
    assert_eq!(report["nats_node_kills"], 3, "every node was killed once");
}

/// Runs `tally chaos` with `extra` arguments and checks that the lake is exact; returns its
/// report.
fn chaos(extra: &[&str]) -> Value {
    let long = std::env::var_os("TALLY_CHAOS_LONG").is_some_and(|v| v != "0");
    let (events, rate, kills, mut restarts, unwritable) = if long {
        ("1000000", "50000", 10, 2, "3")
    } else {
        ("20000", "4000", 3, 2, "1")
    };
    // A count in `extra` replaces the default.
    let mut extra = extra.to_vec();
    if let Some(at) = extra.iter().position(|a| *a == "--nats-restarts") {
        restarts = extra[at + 1].parse().unwrap();
        extra.drain(at..at + 2);
    }
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["chaos", "--events", events, "--rate", rate])
        .args(["--kills", &kills.to_string()])
        .args(["--nats-restarts", &restarts.to_string()])
        .args(["--unwritable-secs", unwritable, "--customers", "200"])
        .args(&extra)
        .args(["--format", "json", "--data-dir"])
        .arg(dir.path().join("chaos"))
        .env("TALLY_LOG", "warn")
        // Not a setting of Tally's: its configuration refuses unknown `TALLY_*` names.
        .env_remove("TALLY_CHAOS_LONG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    let last = stdout.lines().last().unwrap_or_default();
    let report: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("the last line is not the JSON report ({e}): {stdout}"));
    eprintln!("{report:#}");
    let n = |key: &str| report[key].as_u64().unwrap_or_else(|| panic!("no {key}"));

    assert_eq!(n("worker_kills"), kills, "every kill happened");
    assert_eq!(n("nats_node_kills"), restarts, "every NATS kill happened");
    assert_eq!(n("pauses"), 1, "a worker was paused past its leases");
    assert_eq!(
        n("acked"),
        n("sent"),
        "JetStream acknowledged everything sent"
    );
    assert!(n("events_valid") > 15_000);
    assert_eq!(
        n("in_lake"),
        n("events_valid"),
        "every valid event is in the lake"
    );
    assert_eq!(n("distinct_in_lake"), n("in_lake"), "none of them twice");
    assert_eq!(n("dead_letters"), n("events_invalid"));
    assert!(n("duplicates_published") > 0, "the workload repeats ids");
    assert_eq!(n("duplicates_dropped"), n("duplicates_published"));
    assert_eq!(report["billing_matches"], Value::Bool(true));
    assert_eq!(report["exact"], Value::Bool(true));
    assert!(output.status.success(), "tally chaos exits 0 when exact");
    report
}
