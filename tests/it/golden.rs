//! The reports on golden scenarios, without NATS: each directory under
//! `tests/golden/reports/` holds a catalogue, the customers while the events are decided
//! (`customers.toml`) and, when they changed since, as the reports see them
//! (`customers-now.toml`), and the events (`events.csv`). The events are decided in order
//! by the quota engine, written to a lake on disk, and reported on by `tally-reports`:
//! invoices, overage and adoption of November 2026, in every format, must equal the
//! scenario's `expected/` files.
//!
//! `TALLY_BLESS=1 cargo nextest run --workspace -E 'test(/golden/)'` rewrites the
//! expected files from the reports; read every line of the difference before committing.

use std::path::{Path, PathBuf};

use tally_core::entitlement::{Catalog, Customers};
use tally_core::{Event, Fence, SealedBatch};
use tally_ingest::rows::Rows;
use tally_query::analytics::DateRange;
use tally_query::{Lakehouse, Period};
use tally_quota::{Engine, Usage};
use tally_reports::render::{self, Format, Report};
use tally_reports::{AdoptionRequest, Definitions, InvoiceRequest};
use tally_store::Lake;

fn scenarios() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/reports");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

fn read<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    let text = std::fs::read_to_string(path).unwrap();
    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Decides the scenario's events in order and writes them to a lake at `root`.
fn decide_into(dir: &Path, catalog: &Catalog, customers: &Customers, root: &Path) {
    let mut engine = Engine::new();
    catalog
        .plans
        .iter()
        .for_each(|p| engine.upsert_plan(p.clone()));
    catalog
        .addons
        .iter()
        .for_each(|a| engine.upsert_addon(a.clone()));
    customers
        .customers
        .iter()
        .for_each(|c| engine.upsert_customer(c.clone()));
    let text = std::fs::read_to_string(dir.join("events.csv")).unwrap();
    let mut rows = Rows::default();
    let mut notices = Vec::new();
    let lines = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    for (i, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 6, "{}: {line}", dir.display());
        let time = chrono::DateTime::parse_from_rfc3339(f[3]).unwrap().to_utc();
        let some = |v: &str| (!v.is_empty()).then(|| v.to_owned().into());
        let event = Event {
            id: format!("event-{i}").into(),
            source: "golden".into(),
            event_type: "usage".into(),
            subject: f[0].to_owned().into(),
            time: Some(time),
            feature: f[1].to_owned().into(),
            quantity: f[2].parse().unwrap(),
            region: some(f[4]),
            user: some(f[5]),
            extra: None,
        };
        let usage = Usage {
            customer: &event.subject,
            feature: &event.feature,
            quantity: event.quantity,
            time: time.timestamp_micros(),
            region: event.region.as_deref(),
            user: event.user.as_deref(),
        };
        let (decision, plan) = engine.decide_under_plan(&usage, &mut notices);
        let plan = plan.map(str::to_owned);
        rows.push(
            &event,
            decision,
            plan.as_deref(),
            time.timestamp_micros() + 1_000_000,
            i as u64 + 1,
            0,
        );
    }
    if rows.is_empty() {
        return;
    }
    let n = rows.len() as u64;
    let sealed = SealedBatch {
        partition: 0,
        first_seq: 1,
        last_seq: n,
        after_seq: None,
        batch: rows.finish(),
    };
    Lake::new(root).write(&sealed, &Fence::open()).unwrap();
}

/// Every format of `report`, named `name.<ext>`; Arrow as its schema and rows in text.
fn outputs(name: &str, report: &impl Report) -> Vec<(String, String)> {
    let text = |format| String::from_utf8(render::to_bytes(report, format).unwrap()).unwrap();
    let arrow = render::to_bytes(report, Format::Arrow).unwrap();
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(arrow), None).unwrap();
    let schema = reader.schema();
    let batches: Vec<_> = reader.map(Result::unwrap).collect();
    let mut arrow_text: String = schema
        .fields()
        .iter()
        .map(|f| format!("{}: {}\n", f.name(), f.data_type()))
        .collect();
    arrow_text += &arrow::util::pretty::pretty_format_batches(&batches)
        .unwrap()
        .to_string();
    arrow_text.push('\n');
    assert_eq!(
        render::arrow_schema(report).unwrap(),
        schema,
        "{name}: the declared schema is the written one"
    );
    vec![
        (format!("{name}.json"), text(Format::Json)),
        (format!("{name}.csv"), text(Format::Csv)),
        (format!("{name}.txt"), text(Format::Table)),
        (format!("{name}.arrow.txt"), arrow_text),
    ]
}

#[tokio::test]
async fn reports_equal_the_golden_files_of_each_scenario() {
    let bless = std::env::var_os("TALLY_BLESS").is_some();
    let november: Period = "2026-11".parse().unwrap();
    let range = DateRange::new(
        november.first_day(),
        november.next().first_day().pred_opt().unwrap(),
    )
    .unwrap();
    let scenarios = scenarios();
    assert!(scenarios.len() >= 2, "{scenarios:?}");
    for dir in scenarios {
        let catalog: Catalog = read(&dir.join("catalog.toml"));
        let then: Customers = read(&dir.join("customers.toml"));
        let now_file = dir.join("customers-now.toml");
        let now: Customers = if now_file.exists() {
            read(&now_file)
        } else {
            then.clone()
        };
        let lake_dir = tempfile::tempdir().unwrap();
        decide_into(&dir, &catalog, &then, lake_dir.path());
        let lake = Lakehouse::open(&tally_store::Location::Local(lake_dir.path().into()))
            .await
            .unwrap();
        let defs = Definitions::of_catalog(catalog, now.customers);

        let invoices = InvoiceRequest {
            period: november,
            customer: None,
            anniversary: false,
        };
        let mut got = outputs(
            "invoices",
            &tally_reports::invoices(&lake, &defs, &invoices)
                .await
                .unwrap(),
        );
        got.extend(outputs(
            "overage",
            &tally_reports::overage(&lake, &defs, november)
                .await
                .unwrap(),
        ));
        got.extend(outputs(
            "adoption",
            &tally_reports::adoption(&lake, &defs, &AdoptionRequest::new(range))
                .await
                .unwrap(),
        ));

        let expected = dir.join("expected");
        if bless {
            std::fs::create_dir_all(&expected).unwrap();
        }
        for (name, text) in got {
            let path = expected.join(&name);
            if bless {
                std::fs::write(&path, &text).unwrap();
            }
            let want = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (bless to write it)", path.display()));
            assert_eq!(text, want, "{}", path.display());
        }
    }
}
