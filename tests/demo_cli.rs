//! The `tally demo` command as a script runs it: a real process, the embedded nats-server,
//! and one JSON object on the last line.

use std::process::Command;

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
    assert_eq!(report["quantity_billed"], report["quantity_generated"]);
    let events = data.join("lake/events");
    let dates: Vec<_> = std::fs::read_dir(&events)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!dates.is_empty());
    assert!(
        dates
            .iter()
            .all(|d| d.starts_with("date=") && d.len() == "date=2026-11-01".len())
    );

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
