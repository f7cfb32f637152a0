//! `tally demo`: the whole pipeline on the embedded default, checked against itself.
//!
//! Starts a local nats-server, loads the demo catalogue (`examples/catalog.toml`) and a
//! plan for every generated customer into the entitlement buckets, creates the streams and
//! consumers, generates a realistic month of usage, publishes it, runs the worker until
//! every message is durable and acknowledged, then bills the month from the lake. The
//! check: the lake holds every valid event once, and its decisions and billed lines equal
//! those of an independent replay of the published messages, in order, through a quota
//! engine of the demo's own.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chrono::{Datelike, NaiveDate, Utc};
use datafusion::arrow::array::RecordBatch;
use datafusion::prelude::col;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tally_core::Frame;
use tally_core::entitlement::{AddOnRef, Catalog, Customer, Customers, Grant, Status};
use tally_ingest::Stats;
use tally_ingest::definitions::Definitions;
use tally_query::{BillingTotals, Lakehouse, Period, Scope};
use tally_quota::{Engine, Usage};

use crate::config::Config;
use crate::pipeline::{self, Nats, Pipeline};
use crate::workload::{self, Spec};

/// Marks a directory as the demo's own, so a second run may clear it.

#[derive(Debug, Clone)]
pub struct DemoArgs {
    pub spec: Spec,
    pub top: usize,
    pub quiet: bool,
}

/// The demo's figures: the last line of `tally demo --format json`.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub period: String,
    pub events_generated: u64,
    pub events_valid: u64,
    pub events_invalid: u64,
    pub duplicates_published: u64,
    pub messages_published: u64,
    pub events_in_lake: u64,
    pub events_billed: u64,
    pub billing_lines: u64,
    pub quantity_generated: f64,
    pub quantity_billed: f64,
    pub dead_letters: u64,
    pub duplicates_dropped: u64,
    pub files_written: u64,
    pub publish_seconds: f64,
    pub ingest_seconds: f64,
    pub events_per_second: f64,
    /// Events in the lake by decision.
    pub decisions: std::collections::BTreeMap<String, u64>,
    /// The same, from the demo's own replay.
    pub decisions_expected: std::collections::BTreeMap<String, u64>,
    /// Billable quantity the replay expects (accepted and overage).
    pub quantity_expected: f64,
    #[serde(rename = "match")]
    pub matches: bool,
    pub data_dir: String,
}

/// Empties a directory `tally <command>` made before (it holds the file `.tally-<command>`),
/// or refuses one it did not make.
pub(crate) fn prepare(dir: &Path, command: &str) -> anyhow::Result<()> {
    let marker = dir.join(format!(".tally-{command}"));
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        if !marker.exists() {
            bail!(
                "{} is not empty and was not made by `tally {command}`; pick another --data-dir",
                dir.display()
            );
        }
        // A server left by a killed earlier run must not keep its store open underneath.
        tally_natsd::stop_leftover(&dir.join("nats"));
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        marker,
        format!("made by tally {command}; cleared by the next run\n"),
    )?;
    Ok(())
}

fn bar(quiet: bool, len: u64, msg: &'static str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len).with_message(msg);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {human_pos}/{human_len} events ({per_sec}, {elapsed})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// Waits until every partition consumer has nothing pending and nothing unacknowledged.
#[allow(clippy::too_many_arguments)]
pub async fn wait_drained(
    nats: &Nats,
    lake: &tally_store::Lake,
    partitions: u16,
    stats: &Stats,
    target_rows: u64,
    progress: &ProgressBar,
    pipeline: &Pipeline,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let stream = nats
        .jetstream
        .get_stream(tally_core::subject::EVENTS_STREAM)
        .await?;
    loop {
        let durable = Stats::get(&stats.rows_durable);
        progress.set_position(durable.min(target_rows));
        if pipeline.is_finished() {
            bail!("the ingest worker stopped early; see the log above");
        }
        let mut idle = true;
        for p in 0..partitions {
            // A consumer being re-created at its ack floor is briefly absent: not idle.
            let consumer: Result<async_nats::jetstream::consumer::PullConsumer, _> = stream
                .get_consumer(&tally_core::subject::partition_consumer(p))
                .await;
            let busy = match consumer {
                Ok(mut c) => c
                    .info()
                    .await
                    .map_or(true, |i| i.num_pending > 0 || i.num_ack_pending > 0),
                Err(_) => true,
            };
            if busy {
                idle = false;
                break;
            }
        }
        // Acknowledged rows undercount the lake after a partition was taken over within this
        // process (rows made durable before the take-over are acknowledged without being
        // written again): once the consumers are idle, the lake's own count decides.
        if idle && (durable >= target_rows || lake.rows()? >= target_rows) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "not drained after {} s: {durable} of {target_rows} rows durable",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the demo end to end.
pub async fn run(mut config: Config, args: DemoArgs) -> anyhow::Result<DemoReport> {
    // The demo always runs on its own embedded server and a lake it may clear.
    if let Some(url) = config.nats_url.take() {
        tracing::warn!(%url, "the demo starts its own nats-server; ignoring the configured NATS URL");
    }
    prepare(&config.data_dir, "demo")?;
    let spec = &args.spec;
    let period = Period::of(spec.start);
    let nats = Nats::connect(&config).await?;
    let (catalog, customers) = load_definitions(&nats, spec, "tally-demo").await?;
    let pipeline = pipeline::start(&config, &nats, None).await?;

    let generating = Instant::now();
    let (messages, totals) = workload::generate(spec);
    let expected = replay(&messages, &catalog, &customers);
    tracing::info!(
        messages = messages.len(),
        seconds = generating.elapsed().as_secs_f64(),
        "workload generated"
    );

    let published_bar = bar(
        args.quiet,
        totals.events_generated + totals.duplicates_published,
        "published",
    );
    let start = Instant::now();
    let published = workload::publish(
        &nats.jetstream,
        &messages,
        workload::MAX_ACKS_IN_FLIGHT,
        |n| published_bar.inc(n),
    )
    .await?;
    published_bar.finish();
    let publish_seconds = start.elapsed().as_secs_f64();
    drop(messages);

    let durable_bar = bar(args.quiet, totals.events_valid, "durable");
    wait_drained(
        &nats,
        &tally_store::Lake::new(config.lake_dir()),
        config.ingest.partitions,
        &pipeline.stats,
        totals.events_valid,
        &durable_bar,
        &pipeline,
        Duration::from_secs(1800),
    )
    .await?;
    durable_bar.finish();
    let ingest_seconds = start.elapsed().as_secs_f64();
    let stats = pipeline.stats.clone();
    pipeline.shutdown().await?;
    // The analyses read the definitions from this run's nats-server: before it stops.
    let analyses = if args.quiet {
        None
    } else {
        Some(analyse(&config, spec, period).await?)
    };
    drop(nats);

    let lake = Lakehouse::open(&config.lake_dir()).await?;
    let billing = lake.billing(&Scope::Month(period), None).await?;
    let billed = BillingTotals::of(&billing);
    let decisions = count_decisions(&lake).await?;
    let events_in_lake: u64 = decisions.values().sum();
    let lines_match = lines_of(&billing) == expected.lines;
    let report = DemoReport {
        period: period.to_string(),
        events_generated: totals.events_generated,
        events_valid: totals.events_valid,
        events_invalid: totals.events_invalid,
        duplicates_published: totals.duplicates_published,
        messages_published: published.messages,
        events_in_lake,
        events_billed: billed.events,
        billing_lines: billed.lines,
        quantity_generated: totals.quantity,
        quantity_billed: billed.quantity,
        dead_letters: Stats::get(&stats.dead_letters),
        duplicates_dropped: Stats::get(&stats.duplicates),
        files_written: Stats::get(&stats.files_written),
        publish_seconds,
        ingest_seconds,
        events_per_second: totals.events_valid as f64 / ingest_seconds.max(1e-9),
        matches: events_in_lake == totals.events_valid
            && decisions == expected.decisions
            && lines_match
            && billed.quantity == expected.quantity,
        decisions,
        decisions_expected: expected.decisions,
        quantity_expected: expected.quantity,
        data_dir: config.data_dir.display().to_string(),
    };
    if let Some(analyses) = analyses {
        print_human(&lake, &report, &billing, args.top).await?;
        analyses.print(args.top)?;
    }
    Ok(report)
}

/// The month's invoices, overage report and adoption, as a billing job and a product
/// manager would ask for them.
struct Analyses {
    bills: Vec<tally_reports::Bill>,
    overage: tally_reports::OverageReport,
    adoption: tally_reports::AdoptionReport,
}

async fn analyse(config: &Config, spec: &Spec, period: Period) -> anyhow::Result<Analyses> {
    let lake = Lakehouse::open(&config.lake_dir()).await?;
    let defs = crate::reports::definitions(config).await?;
    let request = tally_reports::InvoiceRequest {
        period,
        customer: None,
        anniversary: false,
    };
    let bills = tally_reports::invoices(&lake, &defs, &request).await?.bills;
    let overage = tally_reports::overage(&lake, &defs, period).await?;
    let last = spec
        .until
        .date_naive()
        .min(period.next().first_day() - chrono::Days::new(1))
        .max(period.first_day());
    let range = tally_query::analytics::DateRange::new(period.first_day(), last)
        .context("the demo month")?;
    let request = tally_reports::AdoptionRequest::new(range);
    let adoption = tally_reports::adoption(&lake, &defs, &request).await?;
    Ok(Analyses {
        bills,
        overage,
        adoption,
    })
}

impl Analyses {
    fn print(&self, top: usize) -> anyhow::Result<()> {
        use std::fmt::Write as _;
        let mut bills: Vec<&tally_reports::Bill> = self.bills.iter().collect();
        bills.sort_by_key(|b| std::cmp::Reverse(b.invoice.total));
        let revenue: tally_core::pricing::Decimal = bills.iter().map(|b| b.invoice.total).sum();
        println!();
        println!(
            "Invoices: {} customers, {revenue} USD in all; the {top} largest (tally billing):",
            bills.len()
        );
        for b in bills.iter().take(top) {
            let plan = b.invoice.lines.iter().find_map(|l| {
                (l.kind == tally_core::pricing::LineKind::FlatFee).then_some(l.plan.as_str())
            });
            println!(
                "  {:<14} {:<12} {:>12} {}",
                b.invoice.customer,
                plan.unwrap_or("-"),
                b.invoice.total,
                b.invoice.currency.as_deref().unwrap_or("")
            );
        }
        let o = &self.overage;
        let mut over: Vec<&tally_reports::OverLine> = o.over.iter().collect();
        let added = |l: &tally_reports::OverLine| -> tally_core::pricing::Decimal {
            l.added
                .as_deref()
                .and_then(|a| a.parse().ok())
                .unwrap_or_default()
        };
        over.sort_by_key(|l| std::cmp::Reverse(added(l)));
        let covered = o.upgrades.iter().filter(|u| u.covered_by.is_some()).count();
        println!();
        println!(
            "Overage (tally overage): {} customer × feature lines past their allowance; {} refused by a hard limit, {covered} of them covered by a next plan. Largest additions:",
            o.over.len(),
            o.upgrades.len()
        );
        for l in over.iter().take(top) {
            println!(
                "  {:<14} {:<10} {:<14} {:>10} over, adds {} {}",
                l.customer,
                l.plan,
                l.feature,
                l.over,
                l.added.as_deref().unwrap_or("-"),
                l.currency.as_deref().unwrap_or("")
            );
        }
        let a = &self.adoption;
        println!();
        println!(
            "Adoption {} to {} (tally adoption): {} free-tier customers never used an advanced feature",
            a.from,
            a.to,
            a.free_tier.len()
        );
        let mut table = String::new();
        writeln!(
            table,
            "  {:<14} {:>8} {:>8} {:>10} {:>10} {:>8} {:>8}",
            "feature", "entitled", "active", "activation", "events", "DAU avg", "MAU"
        )?;
        for f in &a.features {
            writeln!(
                table,
                "  {:<14} {:>8} {:>8} {:>10} {:>10} {:>8.1} {:>8}",
                f.feature,
                f.entitled_customers,
                f.active_customers,
                f.activation_rate
                    .map_or("-".to_owned(), |r| format!("{:.0} %", r * 100.0)),
                f.events,
                f.dau_avg,
                f.mau_last
            )?;
        }
        print!("{table}");
        Ok(())
    }
}

/// The demo catalogue, and a definition for 99 % of the generated customers: the largest
/// ten on enterprise, every fourth on pro (some with add-ons or a grant), the rest on free;
/// every fiftieth suspended, every thirtieth fenced to its home region. Every hundredth
/// has no definition at all (its events are decided `unknown_customer`).
pub fn definitions(spec: &Spec) -> anyhow::Result<(Catalog, Customers)> {
    let catalog: Catalog =
        toml::from_str(include_str!("../examples/catalog.toml")).context("the demo catalogue")?;
    let regions = workload::regions(spec.regions);
    let customers = (0..spec.customers.max(1))
        .filter(|i| i % 100 != 99)
        .map(|i| {
            let plan = match i {
                0..10 => "enterprise",
                _ if i % 4 == 1 => "pro",
                _ => "free",
            };
            let mut c = Customer::new(workload::customer_id(i), plan);
            c.anchor_day = u8::try_from(1 + i % 28).unwrap_or(1);
            if i % 50 == 7 {
                c.status = Status::Suspended;
            }
            if i % 30 == 11 {
                c.regions = vec![regions[i as usize % regions.len()].to_owned()];
            }
            if plan == "pro" && i % 8 == 1 {
                c.addons.push(AddOnRef {
                    id: "ai-pack".to_owned(),
                    quantity: 1,
                });
            }
            if plan == "free" && i % 10 == 2 {
                c.grants.push(Grant {
                    id: "welcome-credit".to_owned(),
                    feature: "api-calls".to_owned(),
                    amount: 5_000.0,
                    effective: spec
                        .start
                        .and_hms_opt(0, 0, 0)
                        .unwrap_or_default()
                        .and_utc(),
                    expires: None,
                    priority: 0,
                    recurring: None,
                });
            }
            c
        })
        .collect();
    Ok((catalog, Customers { customers }))
}

/// Writes the demo's [`definitions`] to the entitlement buckets, and returns them.
pub async fn load_definitions(
    nats: &Nats,
    spec: &Spec,
    actor: &str,
) -> anyhow::Result<(Catalog, Customers)> {
    let (catalog, customers) = definitions(spec)?;
    let defs = Definitions::open(&nats.jetstream).await?;
    defs.apply_catalog(&catalog, actor).await?;
    defs.apply_customers(&customers, actor).await?;
    Ok((catalog, customers))
}

/// Puts customers `cust-00000` … of the workload generator on a plan with every feature
/// metered and unlimited, so that every valid event is `accepted` and bills: for runs
/// about delivery (`tally chaos`, tests), where the decisions are not the subject.
pub async fn entitle_unlimited(nats: &Nats, customers: u32, actor: &str) -> anyhow::Result<()> {
    use tally_core::entitlement::{Customer, Entitlement, Metered, Plan};
    let plan = Plan {
        id: "unlimited".to_owned(),
        name: "Unlimited".to_owned(),
        features: workload::features(u32::MAX)
            .iter()
            .map(|f| ((*f).to_owned(), Entitlement::Metered(Metered::new(None))))
            .collect(),
        seats: None,
        prices: None,
    };
    let defs = Definitions::open(&nats.jetstream).await?;
    let catalog = Catalog {
        plans: vec![plan],
        ..Catalog::default()
    };
    defs.apply_catalog(&catalog, actor).await?;
    let customers = Customers {
        customers: (0..customers)
            .map(|i| Customer::new(workload::customer_id(i), "unlimited"))
            .collect(),
    };
    defs.apply_customers(&customers, actor).await?;
    Ok(())
}

/// What the demo expects the lake to hold.
#[derive(Debug, Default)]
pub struct Expected {
    pub decisions: std::collections::BTreeMap<String, u64>,
    /// Billable events and quantity per customer × feature.
    pub lines: std::collections::BTreeMap<(String, String), (u64, f64)>,
    pub quantity: f64,
}

/// Decides the published messages, in order, through a quota engine of its own: what
/// the worker must have decided (a customer's events reach its partition in publish
/// order; an event id seen before is dropped; malformed events are dead letters).
pub fn replay(
    messages: &[workload::OutMessage],
    catalog: &Catalog,
    customers: &Customers,
) -> Expected {
    let mut engine = Engine::new();
    for p in &catalog.plans {
        engine.upsert_plan(p.clone());
    }
    for a in &catalog.addons {
        engine.upsert_addon(a.clone());
    }
    for c in &customers.customers {
        engine.upsert_customer(c.clone());
    }
    let limits = tally_core::DecodeLimits::default();
    let mut seen = std::collections::HashSet::new();
    let mut expected = Expected::default();
    let mut notices = Vec::new();
    for m in messages {
        let Ok(frame) = Frame::decode(&m.payload, &limits) else {
            continue;
        };
        for event in frame.events.into_iter().flatten() {
            if !seen.insert(event.id.to_string()) {
                continue;
            }
            let usage = Usage {
                customer: &event.subject,
                feature: &event.feature,
                quantity: event.quantity,
                time: event.time.map_or(0, |t| t.timestamp_micros()),
                region: event.region.as_deref(),
                user: event.user.as_deref(),
            };
            let decision = engine.decide(&usage, &mut notices);
            notices.clear();
            *expected
                .decisions
                .entry(decision.as_str().to_owned())
                .or_default() += 1;
            if decision.is_billable() {
                let line = expected
                    .lines
                    .entry((event.subject.to_string(), event.feature.to_string()))
                    .or_default();
                line.0 += 1;
                line.1 += event.quantity;
                expected.quantity += event.quantity;
            }
        }
    }
    expected
}

/// Billed events and quantity per customer × feature, from the billing query's rows.
/// Billable events and quantity per customer × feature, summed over plans.
pub fn lines_of(
    billing: &[RecordBatch],
) -> std::collections::BTreeMap<(String, String), (u64, f64)> {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{Float64Type, Int64Type};
    let mut lines = std::collections::BTreeMap::new();
    for b in billing {
        let (Some(c), Some(f), Some(e), Some(q)) = (
            b.column_by_name("customer"),
            b.column_by_name("feature"),
            b.column_by_name("events"),
            b.column_by_name("quantity"),
        ) else {
            continue;
        };
        let (c, f) = (c.as_string::<i32>(), f.as_string::<i32>());
        let (e, q) = (
            e.as_primitive::<Int64Type>(),
            q.as_primitive::<Float64Type>(),
        );
        for i in 0..b.num_rows() {
            if c.is_null(i) || f.is_null(i) {
                continue;
            }
            // One line per plan: a plan change inside the period splits a feature's usage.
            let line: &mut (u64, f64) = lines
                .entry((c.value(i).to_owned(), f.value(i).to_owned()))
                .or_default();
            line.0 += u64::try_from(e.value(i)).unwrap_or(0);
            line.1 += q.value(i);
        }
    }
    lines
}

async fn count_decisions(
    lake: &Lakehouse,
) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    use datafusion::arrow::array::{Array, AsArray};
    let batches = lake
        .context()
        .sql("SELECT decision, COUNT(*) AS n FROM events GROUP BY decision")
        .await?
        .collect()
        .await?;
    let mut out = std::collections::BTreeMap::new();
    for b in &batches {
        let d = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8)?;
        let d = d.as_string::<i32>();
        let n = b.column(1).as_primitive::<arrow::datatypes::Int64Type>();
        for i in 0..b.num_rows() {
            if !d.is_null(i) {
                out.insert(
                    d.value(i).to_owned(),
                    u64::try_from(n.value(i)).unwrap_or(0),
                );
            }
        }
    }
    Ok(out)
}

async fn print_human(
    lake: &Lakehouse,
    r: &DemoReport,
    billing: &[RecordBatch],
    top: usize,
) -> anyhow::Result<()> {
    let top_rows = lake
        .context()
        .read_batches(billing.to_vec())?
        .sort(vec![
            col("quantity").sort(false, false),
            col("customer").sort(true, false),
        ])?
        .limit(0, Some(top))?
        .collect()
        .await?;
    println!();
    println!(
        "Billing {} — top {top} of {} lines (customer × plan × feature × month), by quantity",
        r.period, r.billing_lines
    );
    crate::output::write_batches(
        &mut std::io::stdout(),
        &top_rows,
        crate::output::Format::Table,
    )?;
    println!(
        "Totals: {} lines, {} events billed, quantity {}",
        r.billing_lines, r.events_billed, r.quantity_billed
    );
    println!(
        "Pipeline: {} events generated ({} malformed, {} extra copies published), {} messages; \
         {} dead letters, {} duplicates dropped, {} Parquet files; {:.0} events/s end to end",
        r.events_generated,
        r.events_invalid,
        r.duplicates_published,
        r.messages_published,
        r.dead_letters,
        r.duplicates_dropped,
        r.files_written,
        r.events_per_second
    );
    let decisions: Vec<String> = r
        .decisions
        .iter()
        .map(|(d, n)| format!("{d} {n}"))
        .collect();
    println!("Decisions: {}", decisions.join(", "));
    let verdict = if r.matches { "MATCH" } else { "MISMATCH" };
    println!(
        "Check: {verdict}: lake holds {} of {} valid events; billed quantity {} of {} generated, {} expected by an independent replay of the decisions",
        r.events_in_lake,
        r.events_valid,
        r.quantity_billed,
        r.quantity_generated,
        r.quantity_expected
    );
    println!("Lake: {}/lake/events/date=YYYY-MM-DD/*.parquet", r.data_dir);
    Ok(())
}

/// The first day of the current UTC month.
pub fn this_month() -> NaiveDate {
    let today = Utc::now().date_naive();
    NaiveDate::from_ymd_opt(today.year(), today.month(), 1).unwrap_or(today)
}
