//! Entitlement definitions in NATS key-value buckets: applied from the demo files, read
//! back whole, audited once per change, and a bad file refused with every problem named.

use std::path::Path;
use std::process::Command;

use crate::common::Harness;
use tally::definitions::read_file;
use tally_core::entitlement::{Catalog, Customers, Entitlement, Status};
use tally_ingest::definitions::{Change, Definitions};

fn example<T: serde::de::DeserializeOwned>(name: &str) -> T {
    read_file(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(name),
    )
    .unwrap()
}

#[tokio::test]
async fn the_demo_catalogue_and_customers_round_trip_through_the_buckets_with_an_audit_trail() {
    let h = Harness::start().await;
    let catalog: Catalog = example("catalog.toml");
    let customers: Customers = example("customers.toml");
    assert!(catalog.problems().is_empty(), "{:?}", catalog.problems());
    assert!(
        customers.problems().is_empty(),
        "{:?}",
        customers.problems()
    );

    let defs = Definitions::open(&h.nats.jetstream, 1).await.unwrap();
    let applied = defs.apply_catalog(&catalog, "test").await.unwrap();
    assert_eq!(
        applied.len(),
        catalog.plans.len() + catalog.addons.len() + catalog.skus.len()
    );
    assert!(applied.iter().all(|a| a.change == Change::Created));
    defs.apply_customers(&customers, "test").await.unwrap();

    let snapshot = defs.load().await.unwrap();
    let mut plans = catalog.plans.clone();
    plans.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(snapshot.plans, plans);
    assert_eq!(snapshot.addons.len(), catalog.addons.len());
    assert_eq!(snapshot.skus.len(), catalog.skus.len());
    assert_eq!(snapshot.customers, customers.customers);
    let audit_before = defs.audit().await.unwrap().len();
    assert_eq!(audit_before, applied.len() + customers.customers.len());

    // The same files again: nothing changes, nothing is audited.
    let again = defs.apply_catalog(&catalog, "test").await.unwrap();
    assert!(again.iter().all(|a| a.change == Change::Unchanged));
    assert_eq!(defs.audit().await.unwrap().len(), audit_before);

    // An upgrade and a suspension: one audit entry each, with before and after.
    let mut changed = customers.clone();
    changed.customers[2].plan = "pro".to_owned();
    changed.customers[0].status = Status::Suspended;
    let applied = defs.apply_customers(&changed, "crm").await.unwrap();
    let updated: Vec<&str> = applied
        .iter()
        .filter(|a| a.change == Change::Updated)
        .map(|a| a.id.as_str())
        .collect();
    assert_eq!(updated, ["cust-00000", "cust-00002"]);
    let audit = defs.audit().await.unwrap();
    assert_eq!(audit.len(), audit_before + 2);
    let upgrade = &audit[audit.len() - 1];
    assert_eq!(
        (upgrade.actor.as_str(), upgrade.id.as_str()),
        ("crm", "cust-00002")
    );
    assert_eq!(upgrade.before.as_ref().unwrap()["plan"], "free");
    assert_eq!(upgrade.after.as_ref().unwrap()["plan"], "pro");
    let snapshot = defs.load().await.unwrap();
    assert_eq!(snapshot.customers[2].plan, "pro");
    let pro = snapshot.plans.iter().find(|p| p.id == "pro").unwrap();
    assert!(matches!(pro.features["api-calls"], Entitlement::Metered(_)));
}

#[test]
fn a_bad_catalogue_is_refused_whole_with_every_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        r#"
        [[plans]]
        id = "free"
        name = "Free"
        [plans.features.api-calls]
        kind = "metered"
        limit = -10
        thresholds = [80, 0]

        [[plans]]
        id = "free"
        name = "Free again"
        "#,
    )
    .unwrap();
    let apply = || {
        // No NATS is needed to refuse a file: nothing is written.
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["plans", "apply"])
            .arg(&file)
            .arg("--data-dir")
            .arg(dir.path())
            .env("TALLY_NATS_SERVER", "/nonexistent")
            .output()
            .unwrap()
    };
    let output = apply();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    for field in [
        "plans[1].id",
        "plans[0].features.api-calls.limit",
        "plans[0].features.api-calls.thresholds[1]",
    ] {
        assert!(stderr.contains(field), "{field} not named in: {stderr}");
    }

    std::fs::write(
        &file,
        "[[plans]]\nid = \"free\"\nname = \"Free\"\nseat = 3\n",
    )
    .unwrap();
    let output = apply();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("seat"), "{stderr}");
}
