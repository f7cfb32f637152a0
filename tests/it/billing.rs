//! Billing end to end on a hand-checked data set: events through a real nats-server and
//! worker, decided against plans with prices, then `tally billing` rating the lake.
//! Every price model, a soft limit's overage price, a plan change inside the period,
//! fees, an add-on, a minimum and late usage; every amount below is worked out by hand.

use crate::common;
use std::collections::BTreeMap;
use std::process::Command;
use tally_node::pipeline::Service;

use chrono::Datelike;

use crate::common::Harness;
use arrow::array::{Array, AsArray};
use arrow::datatypes::Float64Type;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;
use tally::config::Config;
use tally::pipeline;
use tally::pipeline::Nats;
use tally_core::entitlement::{AddOnRef, Catalog, Customer, Customers};
use tally_core::pricing::{self, Decimal, Usage};
use tally_core::subject;
use tally_ingest::definitions::Definitions;

const CATALOG: &str = r#"
[[plans]]
id = "starter"
name = "Starter"
[plans.features.calls]
kind = "metered"
period = "month"
[plans.features.mb]
kind = "metered"
limit = 1000
period = "month"
enforcement = "hard"
[plans.prices]
currency = "EUR"
flat_fee = "10"
minimum = "30"
[plans.prices.features.calls]
included = "100"
model = "per_unit"
unit_price = "0.05"
[plans.prices.features.mb]
model = "package"
package_size = "100"
package_price = "1.00"

[[plans]]
id = "scale"
name = "Scale"
[plans.features.calls]
kind = "metered"
limit = 1000
period = "month"
enforcement = "soft"
[plans.features.mb]
kind = "metered"
period = "month"
[plans.prices]
currency = "EUR"
flat_fee = "50"
[plans.prices.features.calls]
model = "graduated"
tiers = [{ up_to = "500", unit_price = "0.04" }, { unit_price = "0.02" }]
overage_unit_price = "0.10"
[plans.prices.features.mb]
model = "volume"
tiers = [{ up_to = "1000", unit_price = "0.01" }, { unit_price = "0.005", flat_price = "2" }]

[[addons]]
id = "support"
name = "Support"
price = { fee = "7.50" }
"#;

/// Publishes `n` events of `quantity` each as one batch message.
async fn send(h: &Harness, customer: &str, feature: &str, n: usize, quantity: u32, time: &str) {
    let prefix = format!("{customer}-{feature}-{time}");
    let events: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"specversion":"1.0","id":"{prefix}-{i}","source":"test","type":"usage","subject":"{customer}","time":"{time}","data":{{"feature":"{feature}","quantity":{quantity}}}}}"#
            )
        })
        .collect();
    h.nats
        .jetstream
        .publish(
            subject::events_subject(customer),
            format!("[{}]", events.join(",")).into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

fn billing(h: &Harness, period: &str, extra: &[&str]) -> Vec<Value> {
    json_rows(
        h,
        &[
            &["billing", "--period", period, "--format", "json"][..],
            extra,
        ]
        .concat(),
    )
}

/// The rows a `tally` command prints as a JSON array, against the harness's server.
fn json_rows(h: &Harness, args: &[&str]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .args(["--nats-url", &h.server.url(), "--data-dir"])
        .arg(h.dir.path())
        .env("TALLY_NATS_CREDENTIALS", h.server.credentials().dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// (kind, plan, item, amount) of each line.
fn lines(invoice: &Value) -> Vec<(String, String, String, String)> {
    invoice["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let s = |k: &str| l[k].as_str().unwrap().to_owned();
            (s("kind"), s("plan"), s("item"), s("amount"))
        })
        .collect()
}

fn line(kind: &str, plan: &str, item: &str, amount: &str) -> (String, String, String, String) {
    (kind.into(), plan.into(), item.into(), amount.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoices_rate_every_price_model_a_plan_change_fees_a_minimum_and_list_late_usage() {
    let h = Harness::start().await;
    let defs = Definitions::open(&h.nats.jetstream, 1).await.unwrap();
    let catalog: Catalog = toml::from_str(CATALOG).unwrap();
    assert!(catalog.problems().is_empty(), "{:?}", catalog.problems());
    defs.apply_catalog(&catalog, "test").await.unwrap();
    let customers = |list: Vec<Customer>| Customers { customers: list };
    // dee's billing month starts on the 15th.
    let mut dee = Customer::new("dee", "starter");
    dee.anchor_day = 15;
    defs.apply_customers(
        &customers(vec![
            Customer::new("ana", "starter"),
            Customer::new("bo", "starter"),
            Customer::new("cy", "scale"),
            dee,
        ]),
        "test",
    )
    .await
    .unwrap();
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();

    // ana, starter: calls 250, mb 350.
    send(&h, "ana", "calls", 5, 50, "2026-11-05T10:00:00Z").await;
    send(&h, "ana", "mb", 7, 50, "2026-11-05T11:00:00Z").await;
    // bo: 120 calls on starter; then scale with two support add-ons: 1,300 calls (the
    // counter goes on from 120, so 880 fit the soft limit of 1,000 and 420 are overage)
    // and 1,200 mb.
    send(&h, "bo", "calls", 4, 30, "2026-11-05T10:00:00Z").await;
    // A change applies from the next event the worker decides: wait until these are.
    let stats = pipeline.stats.clone();
    common::until("bo's starter calls decided", || async {
        tally_ingest::Stats::get(&stats.events_valid) >= 16
    })
    .await;
    let mut bo = Customer::new("bo", "scale");
    bo.addons = vec![AddOnRef {
        id: "support".to_owned(),
        quantity: 2,
    }];
    defs.apply_customers(&customers(vec![bo]), "crm")
        .await
        .unwrap();
    send(&h, "bo", "calls", 130, 10, "2026-11-15T10:00:00Z").await;
    send(&h, "bo", "mb", 12, 100, "2026-11-15T11:00:00Z").await;
    // cy, scale: 10 calls in November, then 5 dated in October: its counter has moved on
    // to November, so they are late.
    send(&h, "cy", "calls", 2, 5, "2026-11-10T10:00:00Z").await;
    send(&h, "cy", "calls", 1, 5, "2026-10-15T10:00:00Z").await;
    // dee: 300 calls on 20 October, 100 on 10 November, 200 on 20 November.
    send(&h, "dee", "calls", 3, 100, "2026-10-20T10:00:00Z").await;
    send(&h, "dee", "calls", 1, 100, "2026-11-10T10:00:00Z").await;
    send(&h, "dee", "calls", 2, 100, "2026-11-20T10:00:00Z").await;
    h.drain(&pipeline, 12 + 146 + 3 + 6).await;
    pipeline.shutdown().await.unwrap();

    let november = billing(&h, "2026-11", &[]);
    let by: BTreeMap<&str, &Value> = november
        .iter()
        .map(|i| (i["customer"].as_str().unwrap(), i))
        .collect();
    assert_eq!(by.len(), 4);
    // ana: (250 − 100) × 0.05 = 7.50; ⌈350 / 100⌉ × 1.00 = 4.00; fee 10; 21.50 in all,
    // raised to the minimum of 30 by 8.50.
    assert_eq!(
        lines(by["ana"]),
        [
            line("usage", "starter", "calls", "7.50"),
            line("usage", "starter", "mb", "4.00"),
            line("flat_fee", "starter", "", "10.00"),
            line("minimum", "starter", "", "8.50"),
        ]
    );
    assert_eq!(by["ana"]["subtotal"], "21.50");
    assert_eq!(by["ana"]["total"], "30.00");
    assert_eq!(by["ana"]["currency"], "EUR");
    // bo: starter calls (120 − 100) × 0.05 = 1.00; scale calls graduated on the 880
    // accepted, 500 × 0.04 + 380 × 0.02 = 27.60, plus 420 overage × 0.10 = 42.00;
    // scale mb 1,200 is past the first volume tier: 1,200 × 0.005 + 2 = 8.00; the fee of
    // the plan held at billing time, 50; two support add-ons, 15.00. No minimum.
    assert_eq!(
        lines(by["bo"]),
        [
            line("usage", "scale", "calls", "69.60"),
            line("usage", "scale", "mb", "8.00"),
            line("usage", "starter", "calls", "1.00"),
            line("flat_fee", "scale", "", "50.00"),
            line("add_on", "scale", "support", "15.00"),
        ]
    );
    assert_eq!(by["bo"]["total"], "143.60");
    let scale_calls = &by["bo"]["lines"][0];
    assert_eq!(scale_calls["quantity"], "1300");
    assert_eq!(scale_calls["tiers"].as_array().unwrap().len(), 2);
    // cy: 10 × 0.04 = 0.40 and the fee.
    assert_eq!(by["cy"]["total"], "50.40");
    assert!(by["cy"]["late"].as_array().unwrap().is_empty());

    // October: cy's late calls are listed, not billed.
    let october = billing(&h, "2026-10", &[]);
    let cy = october
        .iter()
        .find(|i| i["customer"] == "cy")
        .expect("cy is billed in October");
    assert_eq!(
        cy["late"],
        serde_json::json!([{"plan": "scale", "feature": "calls", "events": 1, "quantity": 5.0}])
    );
    assert_eq!(
        lines(cy),
        [line("flat_fee", "scale", "", "50.00")],
        "late usage bills nothing"
    );

    // dee by calendar month, then by its own billing month from the 15th: November's
    // calendar month holds 300 calls, (300 − 100) × 0.05 = 10.00; its billing month from
    // 15 October holds 400, 15.00, and the one from 15 November 200, 5.00.
    let calls = |bills: &[Value]| -> (String, String, String) {
        let dee = bills.iter().find(|i| i["customer"] == "dee").unwrap();
        (
            dee["period_start"].as_str().unwrap()[..10].to_owned(),
            dee["period_end"].as_str().unwrap()[..10].to_owned(),
            lines(dee)[0].3.clone(),
        )
    };
    assert_eq!(
        calls(&november),
        ("2026-11-01".into(), "2026-12-01".into(), "10.00".into())
    );
    let anniversary = ["--anniversary"];
    assert_eq!(
        calls(&billing(&h, "2026-10", &anniversary)),
        ("2026-10-15".into(), "2026-11-15".into(), "15.00".into())
    );
    let november_15 = billing(&h, "2026-11", &anniversary);
    assert_eq!(
        calls(&november_15),
        ("2026-11-15".into(), "2026-12-15".into(), "5.00".into())
    );
    // Customers anchored on the 1st are billed by the calendar month either way.
    let ana = november_15.iter().find(|i| i["customer"] == "ana").unwrap();
    assert_eq!(ana["total"], "30.00");
    assert_eq!(ana["period_start"].as_str().unwrap()[..10], *"2026-11-01");
}

/// A generated month through the whole pipeline: `tally billing` equals, to the cent, the
/// invoices of a plain fold over the raw Parquet rows (no DataFusion), rated with the same
/// prices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_equals_a_plain_fold_over_the_raw_rows_to_the_cent() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    // `tally … --data-dir <the demo's>`, which must succeed: its stdout. Small batches, so
    // that each partition holds several files of a date to compact.
    let tally = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tally"))
            .env("TALLY_INGEST__FLUSH_MESSAGES", "4")
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    // Last month: every date of it is closed, so compaction merges them whole, whatever
    // the day (this month, on its first day, would have a single open date).
    let today = chrono::Utc::now().date_naive();
    let last_month = (today - chrono::Days::new(u64::from(today.day())))
        .format("%Y-%m")
        .to_string();
    let report: Value = serde_json::from_str(
        String::from_utf8_lossy(&tally(&[
            "demo",
            "--month",
            &last_month,
            "--events",
            "30000",
            "--customers",
            "200",
            "--format",
            "json",
        ]))
        .lines()
        .last()
        .unwrap(),
    )
    .unwrap();
    let period = report["period"].as_str().unwrap().to_owned();
    let billed: Vec<Value> = serde_json::from_slice(&tally(&[
        "billing", "--period", &period, "--format", "json",
    ]))
    .unwrap();

    // `tally compact` merges the lake's files (the demo stopped cleanly, so all is settled)
    // and removes those it replaced (no retention asked); the bill does not move.
    let files_before = common::parquet_files(&data.join("lake/events")).len();
    let compacted: Value = serde_json::from_slice(&tally(&[
        "compact",
        "--retain-secs",
        "0",
        "--format",
        "json",
    ]))
    .unwrap();
    assert!(compacted["written"].as_u64().unwrap() > 0, "{compacted}");
    assert_eq!(compacted["unsettled"], serde_json::json!([]));
    let files_after = common::parquet_files(&data.join("lake/events")).len();
    assert!(files_after < files_before, "{files_after} ≥ {files_before}");
    let again: Vec<Value> = serde_json::from_slice(&tally(&[
        "billing", "--period", &period, "--format", "json",
    ]))
    .unwrap();
    assert_eq!(again, billed);

    // The fold: every raw row of the period, billable decisions only, summed exactly per
    // customer × plan × feature.
    let mut sums: BTreeMap<(String, String, String), (u64, Decimal, Decimal)> = BTreeMap::new();
    for path in common::parquet_files(&data.join("lake/events")) {
        if !path.to_string_lossy().contains(&format!("date={period}-")) {
            continue;
        }
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let b = batch.unwrap();
            let text = |name: &str| b.column_by_name(name).unwrap().as_string::<i32>().clone();
            let (customer, plan, feature, decision) = (
                text("customer"),
                text("plan"),
                text("feature"),
                text("decision"),
            );
            let quantity = b
                .column_by_name("quantity")
                .unwrap()
                .as_primitive::<Float64Type>()
                .clone();
            for i in 0..b.num_rows() {
                let d = decision.value(i);
                if d != "accepted" && d != "overage" {
                    continue;
                }
                let plan = if plan.is_null(i) { "" } else { plan.value(i) };
                let q = pricing::quantity(quantity.value(i)).unwrap();
                let e = sums
                    .entry((
                        customer.value(i).to_owned(),
                        plan.to_owned(),
                        feature.value(i).to_owned(),
                    ))
                    .or_default();
                e.0 += 1;
                if d == "accepted" {
                    e.1 += q;
                } else {
                    e.2 += q;
                }
            }
        }
    }
    let mut usage: BTreeMap<String, Vec<Usage>> = BTreeMap::new();
    for ((customer, plan, feature), (events, accepted, overage)) in sums {
        usage.entry(customer).or_default().push(Usage {
            plan,
            feature,
            events,
            accepted,
            overage,
        });
    }

    // The same definitions billing read, from the demo's own nats-server store.
    let config = Config {
        data_dir: data.clone(),
        ..Config::default()
    };
    let nats = Nats::connect(&config, Service::Admin).await.unwrap();
    let defs = Definitions::open(&nats.jetstream, 1)
        .await
        .unwrap()
        .load()
        .await
        .unwrap();
    let plans = defs
        .plans
        .iter()
        .map(|p| (p.id.clone(), p.clone()))
        .collect();
    let addons = defs
        .addons
        .iter()
        .map(|a| (a.id.clone(), a.clone()))
        .collect();
    let customers: BTreeMap<&str, &Customer> =
        defs.customers.iter().map(|c| (c.id.as_str(), c)).collect();

    let mut checked = 0;
    let mut charged = Decimal::ZERO;
    for invoice in &billed {
        let id = invoice["customer"].as_str().unwrap();
        let fallback = Customer::new(id, "");
        let customer = customers.get(id).copied().unwrap_or(&fallback);
        let lines = usage.get(id).map_or(&[][..], Vec::as_slice);
        let folded = pricing::invoice(customer, lines, &plans, &addons).unwrap();
        let total: Decimal = invoice["total"].as_str().unwrap().parse().unwrap();
        assert_eq!(total, folded.total, "{id}");
        let amounts: Vec<Decimal> = invoice["lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["amount"].as_str().unwrap().parse().unwrap())
            .collect();
        let folded_amounts: Vec<Decimal> = folded.lines.iter().map(|l| l.amount).collect();
        assert_eq!(amounts, folded_amounts, "{id}");
        charged += total;
        checked += 1;
    }
    // Every customer with usage was billed, and the prices charged something.
    assert!(
        usage
            .keys()
            .all(|id| billed.iter().any(|i| i["customer"] == id.as_str()))
    );
    assert!(checked >= 150, "{checked} invoices");
    assert!(charged > Decimal::ZERO);
}

/// `tally sql` over the definitions: the plans, every price model's rows (tiers one row
/// each, money exact), the customers and their add-ons, joined as a product manager
/// would; and `decisions` beside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_reads_plans_prices_customers_and_decisions() {
    let h = Harness::start().await;
    let defs = Definitions::open(&h.nats.jetstream, 1).await.unwrap();
    let catalog: Catalog = toml::from_str(CATALOG).unwrap();
    defs.apply_catalog(&catalog, "test").await.unwrap();
    let mut ana = Customer::new("ana", "starter");
    ana.addons = vec![AddOnRef {
        id: "support".to_owned(),
        quantity: 2,
    }];
    ana.regions = vec!["eu".to_owned(), "us".to_owned()];
    ana.valid_from = Some("2026-11-01T00:00:00Z".parse().unwrap());
    defs.apply_customers(
        &Customers {
            customers: vec![ana, Customer::new("cy", "scale")],
        },
        "test",
    )
    .await
    .unwrap();
    let sql = |query: &str| json_rows(&h, &["sql", query, "--format", "json"]);
    let row = |r: &Value, columns: &[&str]| -> String {
        columns
            .iter()
            .map(|c| match &r[*c] {
                Value::Null => "-".to_owned(),
                Value::String(s) => s.clone(),
                v => v.to_string(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    };

    let plans = sql(
        "SELECT plan, name, currency, CAST(flat_fee AS VARCHAR) AS flat_fee,
                CAST(minimum AS VARCHAR) AS minimum
         FROM plans ORDER BY plan",
    );
    let columns = ["plan", "name", "currency", "flat_fee", "minimum"];
    let plans: Vec<String> = plans.iter().map(|r| row(r, &columns)).collect();
    assert_eq!(plans, ["scale Scale EUR 50 0", "starter Starter EUR 10 30"]);

    // Money at the most decimal places of its column: 0.005 makes unit prices three.
    let prices = sql(
        "SELECT plan, feature, model, tier, CAST(included AS VARCHAR) AS included,
                CAST(up_to AS VARCHAR) AS up_to, CAST(unit_price AS VARCHAR) AS unit_price,
                CAST(flat_price AS VARCHAR) AS flat_price,
                CAST(package_size AS VARCHAR) AS package_size,
                CAST(package_price AS VARCHAR) AS package_price,
                CAST(overage_unit_price AS VARCHAR) AS overage_unit_price
         FROM prices ORDER BY plan, feature, tier",
    );
    let columns = [
        "plan",
        "feature",
        "model",
        "tier",
        "included",
        "up_to",
        "unit_price",
        "flat_price",
        "package_size",
        "package_price",
        "overage_unit_price",
    ];
    let prices: Vec<String> = prices.iter().map(|r| row(r, &columns)).collect();
    assert_eq!(
        prices,
        [
            "scale calls graduated 1 0 500 0.040 0 - - 0.10",
            "scale calls graduated 2 0 - 0.020 0 - - 0.10",
            "scale mb volume 1 0 1000 0.010 0 - - -",
            "scale mb volume 2 0 - 0.005 2 - - -",
            "starter calls per_unit - 100 - 0.050 - - - -",
            "starter mb package - 0 - - - 100 1.00 -",
        ]
    );

    let customers = sql(
        "SELECT c.customer, p.name AS plan_name, c.status, array_to_string(c.regions, '+') AS regions,
                CAST(c.valid_from AS VARCHAR) AS valid_from, c.anchor_day, a.addon, a.quantity
         FROM customers c JOIN plans p ON c.plan = p.plan
         LEFT JOIN customer_addons a ON a.customer = c.customer
         ORDER BY c.customer",
    );
    let columns = [
        "customer",
        "plan_name",
        "status",
        "regions",
        "valid_from",
        "anchor_day",
        "addon",
        "quantity",
    ];
    let customers: Vec<String> = customers.iter().map(|r| row(r, &columns)).collect();
    assert_eq!(
        customers,
        [
            "ana Starter active eu+us 2026-11-01T00:00:00Z 1 support 2",
            "cy Scale active  - 1 - -",
        ]
    );

    let decisions = sql("SELECT decision, code, billable FROM decisions ORDER BY code");
    let decisions: Vec<String> = decisions
        .iter()
        .map(|r| row(r, &["decision", "code", "billable"]))
        .collect();
    assert_eq!(decisions.len(), 10);
    assert_eq!(
        decisions[..3],
        ["accepted 0 true", "overage 1 true", "limit_reached 2 false"]
    );
    assert_eq!(decisions[9], "metered 9 false");
}
