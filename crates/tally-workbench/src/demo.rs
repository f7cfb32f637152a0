//! `tally demo`: the whole pipeline on the embedded default, checked against itself.
//!
//! Starts a local nats-server, loads the demo catalogue (`examples/catalog.toml`) and a
//! plan for every generated customer into the entitlement buckets, creates the streams and
//! consumers, generates a realistic month of usage, publishes it, runs the worker until
//! every message is durable and acknowledged, then bills the month from the lake. The
//! check: the lake holds every valid event once, and its decisions and billed lines equal
//! those of an independent replay of the published messages, in order, through a quota
//! engine of the demo's own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};
use tally_node::pipeline::Service;

use anyhow::{Context as _, bail};
use chrono::{Datelike, NaiveDate, Utc};
use datafusion::arrow::array::RecordBatch;
use indicatif::{MultiProgress, ProgressBar, ProgressState, ProgressStyle};
use serde::Serialize;
use tally_core::Frame;
use tally_core::entitlement::{AddOnRef, Catalog, Customer, Customers, Grant, Status};
use tally_core::pricing::{
    Decimal, FeaturePrice, format_money, quantity as quantity_of, round_money,
};
use tally_ingest::Stats;
use tally_ingest::definitions::Definitions;
use tally_query::{BillingTotals, Lakehouse, Period, Scope};
use tally_quota::{Engine, Usage};

use crate::workload::{self, Spec};
use tally_node::config::Config;
use tally_node::pipeline::{self, Nats, Pipeline};

/// What `tally demo` runs.
#[derive(Debug, Clone)]
pub struct DemoArgs {
    pub spec: Spec,
    /// Invoices and overage lines to show.
    pub top: usize,
    /// Print only the JSON report: no progress, no reports.
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
    pub decisions: BTreeMap<String, u64>,
    /// The same, from the demo's own replay.
    pub decisions_expected: BTreeMap<String, u64>,
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

/// The demo's progress on stderr: a bar for each long step, and a spinner while the
/// reports run. Hidden for `--format json`, and by indicatif when stderr is not a terminal.
struct Progress(Option<MultiProgress>);

impl Progress {
    fn new(quiet: bool) -> Progress {
        Progress((!quiet).then(MultiProgress::new))
    }

    /// A bar of `len` events as wide as the terminal: `label`, the bar, how many, the mean
    /// rate and the time taken.
    fn bar(&self, len: u64, label: &'static str) -> ProgressBar {
        let Some(multi) = &self.0 else {
            return ProgressBar::hidden();
        };
        let bar = multi.add(ProgressBar::new(len).with_message(label));
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>10} [{wide_bar}] {human_pos}/{human_len} events ({rate}, {elapsed})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let rate = s.pos() as f64 / s.elapsed().as_secs_f64().max(1e-3);
                let _ = write!(w, "{}/s", grouped(rate.round() as u64));
            })
            .progress_chars("=> "),
        );
        bar
    }

    fn spinner(&self, label: &'static str) -> ProgressBar {
        let Some(multi) = &self.0 else {
            return ProgressBar::hidden();
        };
        let spinner = multi.add(ProgressBar::new_spinner().with_prefix(label));
        spinner.set_style(
            ProgressStyle::with_template("{prefix:>10} {spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        spinner.enable_steady_tick(Duration::from_millis(120));
        spinner
    }
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
    loop {
        let durable = Stats::get(&stats.rows_durable);
        progress.set_position(durable.min(target_rows));
        if pipeline.is_finished() {
            bail!("the ingest worker stopped early; see the log above");
        }
        let mut idle = true;
        for p in 0..partitions {
            // A consumer being re-created at its ack floor is briefly absent: not idle.
            if !tally_ingest::topology::caught_up(&nats.jetstream, p)
                .await
                .unwrap_or(false)
            {
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
    if !args.quiet {
        print_intro(spec, &config);
    }
    let progress = Progress::new(args.quiet);
    let nats = Nats::connect(&config, Service::Admin).await?;
    let (catalog, customers) = load_definitions(&nats, spec, "tally-demo").await?;
    let pipeline = pipeline::start(&config, &nats, None).await?;

    let generating = Instant::now();
    let generated_bar = progress.bar(spec.events, "generated");
    let (messages, totals) =
        workload::generate_with_progress(spec, |n| generated_bar.set_position(n));
    generated_bar.finish();
    let replayed_bar = progress.bar(
        totals.events_generated + totals.duplicates_published,
        "replayed",
    );
    let expected = replay(&messages, &catalog, &customers, |n| replayed_bar.inc(n));
    replayed_bar.finish();
    tracing::info!(
        messages = messages.len(),
        seconds = generating.elapsed().as_secs_f64(),
        "workload generated and replayed"
    );

    // Publishing and ingest overlap: the durable bar moves while the events are published.
    let published_bar = progress.bar(
        totals.events_generated + totals.duplicates_published,
        "published",
    );
    let durable_bar = progress.bar(totals.events_valid, "durable");
    let follow = {
        let (stats, bar, target) = (
            pipeline.stats.clone(),
            durable_bar.clone(),
            totals.events_valid,
        );
        tokio::spawn(async move {
            loop {
                bar.set_position(Stats::get(&stats.rows_durable).min(target));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let start = Instant::now();
    let published = workload::publish(
        &nats.jetstream,
        &messages,
        workload::MAX_ACKS_IN_FLIGHT,
        |n| published_bar.inc(n),
    )
    .await;
    follow.abort();
    let published = published?;
    published_bar.finish();
    let publish_seconds = start.elapsed().as_secs_f64();
    drop(messages);

    wait_drained(
        &nats,
        &tally_store::Lake::open(&config.lake())?,
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
    // The reports read the definitions from this run's nats-server: before it stops.
    let analyses = if args.quiet {
        None
    } else {
        let spinner = progress.spinner("reports");
        let analyses = analyse(&config, spec, period, &spinner).await?;
        spinner.finish_with_message("invoices, overage and adoption");
        Some(analyses)
    };
    drop(nats);

    let lake = Lakehouse::open(&config.lake()).await?;
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
        let overage = overage_charges(&billing, &catalog)?;
        print_pipeline(&report);
        let example = analyses.print(&overage, args.top);
        print_check(&report, lines_match, example.as_deref());
    }
    Ok(report)
}

/// What the demo is about to do, before the progress bars start.
fn print_intro(spec: &Spec, config: &Config) {
    let first = spec
        .start
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc();
    let last = spec
        .until
        .min(first + chrono::Months::new(1))
        .max(first + chrono::Duration::minutes(1));
    println!(
        "Tally demo: {} usage events from {} customers ({} features, {} regions) between {} and {}, \
         through NATS JetStream into a Parquet lake under {}.",
        grouped(spec.events),
        grouped(u64::from(spec.customers)),
        workload::features(spec.features).len(),
        workload::regions(spec.regions).len(),
        first.format("%Y-%m-%d %H:%M"),
        last.format("%Y-%m-%d %H:%M UTC"),
        config.data_dir.display(),
    );
}

/// The month's invoices, overage report and adoption, as a billing job and a product
/// manager would ask for them.
struct Analyses {
    period: Period,
    bills: Vec<tally_reports::Bill>,
    overage: tally_reports::OverageReport,
    adoption: tally_reports::AdoptionReport,
}

async fn analyse(
    config: &Config,
    spec: &Spec,
    period: Period,
    progress: &ProgressBar,
) -> anyhow::Result<Analyses> {
    let lake = Lakehouse::open(&config.lake()).await?;
    let defs = tally_node::definitions(config).await?;
    progress.set_message("invoices (tally billing)");
    let request = tally_reports::InvoiceRequest {
        period,
        customer: None,
        anniversary: false,
    };
    let bills = tally_reports::invoices(&lake, &defs, &request).await?.bills;
    progress.set_message("overage (tally overage)");
    let overage = tally_reports::overage(&lake, &defs, period).await?;
    progress.set_message("adoption (tally adoption)");
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
        period,
        bills,
        overage,
        adoption,
    })
}

/// One customer's invoice, summed by kind of line.
#[derive(Default)]
struct InvoiceSums {
    fees: Decimal,
    usage: Decimal,
    /// The part of `usage` past a soft limit.
    overage: Decimal,
    minimum: Decimal,
}

impl Analyses {
    /// Prints the three reports; returns the customer with the largest usage charges.
    fn print(&self, overage_by_customer: &BTreeMap<String, Decimal>, top: usize) -> Option<String> {
        let example = self.print_invoices(overage_by_customer, top);
        self.print_overage(top);
        self.print_adoption();
        example
    }

    /// The invoices' totals, and those with the largest usage charges.
    fn print_invoices(
        &self,
        overage_by_customer: &BTreeMap<String, Decimal>,
        top: usize,
    ) -> Option<String> {
        use tally_core::pricing::LineKind;
        let mut bills: Vec<(&tally_reports::Bill, InvoiceSums)> = self
            .bills
            .iter()
            .map(|b| {
                let mut sums = InvoiceSums::default();
                for l in &b.invoice.lines {
                    match l.kind {
                        LineKind::FlatFee | LineKind::AddOn => sums.fees += l.amount,
                        LineKind::Usage => sums.usage += l.amount,
                        LineKind::Minimum => sums.minimum += l.amount,
                    }
                }
                sums.overage = overage_by_customer
                    .get(&b.invoice.customer)
                    .copied()
                    .unwrap_or_default();
                (b, sums)
            })
            .collect();
        bills.sort_by(|(a, sa), (b, sb)| {
            (sb.usage, b.invoice.total)
                .cmp(&(sa.usage, a.invoice.total))
                .then_with(|| a.invoice.customer.cmp(&b.invoice.customer))
        });
        let currency = bills
            .iter()
            .find_map(|(b, _)| b.invoice.currency.clone())
            .unwrap_or_default();
        let sum = |f: fn(&InvoiceSums) -> Decimal| bills.iter().map(|(_, s)| f(s)).sum::<Decimal>();
        let count = |f: fn(&InvoiceSums) -> bool| bills.iter().filter(|(_, s)| f(s)).count();
        let total: Decimal = bills.iter().map(|(b, _)| b.invoice.total).sum();
        let paying = bills
            .iter()
            .filter(|(b, _)| b.invoice.total > Decimal::ZERO)
            .count();
        println!();
        println!(
            "Invoices for {} (tally billing): {} customers, {} of them paying, {} {currency} in all",
            self.period,
            grouped(bills.len() as u64),
            grouped(paying as u64),
            money(total),
        );
        println!(
            "  fees      {:>12} {currency}  plans and add-ons",
            money(sum(|s| s.fees))
        );
        println!(
            "  usage     {:>12} {currency}  past the included quantities, on {} invoices",
            money(sum(|s| s.usage)),
            grouped(count(|s| s.usage > Decimal::ZERO) as u64),
        );
        println!(
            "  overage   {:>12} {currency}  the part of usage past a soft limit, on {} invoices",
            money(sum(|s| s.overage)),
            grouped(count(|s| s.overage > Decimal::ZERO) as u64),
        );
        println!(
            "  minimum   {:>12} {currency}  topping up to a plan's minimum, on {} invoices",
            money(sum(|s| s.minimum)),
            grouped(count(|s| s.minimum > Decimal::ZERO) as u64),
        );
        println!("  The largest usage charges:");
        println!(
            "  {:<12} {:<11} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "customer", "plan", "fees", "usage", "overage", "minimum", "total"
        );
        for (b, s) in bills.iter().take(top) {
            let show = |d: Decimal| {
                if d.is_zero() {
                    "-".to_owned()
                } else {
                    money(d)
                }
            };
            println!(
                "  {:<12} {:<11} {:>10} {:>10} {:>10} {:>10} {:>10} {}",
                b.invoice.customer,
                current_plan(b),
                show(s.fees),
                show(s.usage),
                show(s.overage),
                show(s.minimum),
                money(b.invoice.total),
                b.invoice.currency.as_deref().unwrap_or(""),
            );
        }
        bills
            .first()
            .filter(|(_, s)| s.usage > Decimal::ZERO)
            .map(|(b, _)| b.invoice.customer.clone())
    }

    fn print_overage(&self, top: usize) {
        let o = &self.overage;
        let added = |l: &tally_reports::OverLine| -> Decimal {
            l.added
                .as_deref()
                .and_then(|a| a.parse().ok())
                .unwrap_or_default()
        };
        let mut over: Vec<&tally_reports::OverLine> = o.over.iter().collect();
        over.sort_by(|a, b| {
            added(b)
                .cmp(&added(a))
                .then_with(|| b.over.total_cmp(&a.over))
        });
        let past_soft = o.over.iter().filter(|l| l.overage > 0.0).count();
        let customers = |ids: Vec<&str>| ids.into_iter().collect::<BTreeSet<&str>>().len();
        println!();
        println!(
            "Overage for {} (tally overage): {} customer × feature pairs went past their plan's allowance, \
             {} of them past a soft limit and billed for it. The largest additions to a bill:",
            self.period,
            grouped(o.over.len() as u64),
            grouped(past_soft as u64),
        );
        println!(
            "  {:<12} {:<11} {:<14} {:>10} {:>10} {:>10} {:>10}",
            "customer", "plan", "feature", "allowance", "used", "over", "adds"
        );
        for l in over.iter().take(top) {
            println!(
                "  {:<12} {:<11} {:<14} {:>10} {:>10} {:>10} {:>10} {}",
                l.customer,
                l.plan,
                l.feature,
                quantity(l.allowance),
                quantity(l.quantity),
                quantity(l.over),
                l.added.as_deref().map_or("-".to_owned(), |a| {
                    a.parse::<Decimal>().map_or(a.to_owned(), money)
                }),
                l.currency.as_deref().unwrap_or(""),
            );
        }
        let covered: Vec<&str> = o
            .upgrades
            .iter()
            .filter(|u| u.covered_by.is_some())
            .map(|u| u.customer.as_str())
            .collect();
        let refused_events: u64 = o.upgrades.iter().map(|u| u.refused_events).sum();
        println!(
            "  Hard limits refused {} events of {} customers ({} customer × feature); the next \
             plan would have covered {} of those customers: upgrade candidates.",
            grouped(refused_events),
            grouped(customers(o.upgrades.iter().map(|u| u.customer.as_str()).collect()) as u64),
            grouped(o.upgrades.len() as u64),
            grouped(customers(covered) as u64),
        );
    }

    fn print_adoption(&self) {
        let a = &self.adoption;
        println!();
        println!(
            "Adoption {} to {} (tally adoption): {} customers on the free plan never used a \
             feature beyond it",
            a.from,
            a.to,
            grouped(a.free_tier.len() as u64)
        );
        println!(
            "  {:<14} {:>8} {:>8} {:>10} {:>10} {:>8} {:>8}",
            "feature", "entitled", "active", "activation", "events", "DAU avg", "MAU"
        );
        for f in &a.features {
            println!(
                "  {:<14} {:>8} {:>8} {:>10} {:>10} {:>8} {:>8}",
                f.feature,
                grouped(f.entitled_customers),
                grouped(f.active_customers),
                f.activation_rate
                    .map_or("-".to_owned(), |r| format!("{:.0} %", r * 100.0)),
                grouped(f.events),
                group_digits(&format!("{:.1}", f.dau_avg)),
                grouped(f.mau_last)
            );
        }
    }
}

/// The plan an invoice's fee is for, else the plan of its first line.
fn current_plan(b: &tally_reports::Bill) -> &str {
    let lines = &b.invoice.lines;
    lines
        .iter()
        .find(|l| l.kind == tally_core::pricing::LineKind::FlatFee)
        .or(lines.first())
        .map_or("-", |l| l.plan.as_str())
}

/// What usage past a soft limit adds to one feature's bill line: the line rated with its
/// overage less the line rated without it, each rounded as an invoice line is.
fn overage_charge(
    price: &FeaturePrice,
    accepted: Decimal,
    overage: Decimal,
    currency: &str,
) -> Decimal {
    let line = |o| round_money(price.rate(accepted, o).amount, currency);
    line(overage) - line(Decimal::ZERO)
}

/// Per customer, what usage past a soft limit adds to the month's bill, from the billing
/// query's rows (accepted and overage per customer × plan × feature) and the prices of
/// the plan that decided them.
fn overage_charges(
    billing: &[RecordBatch],
    catalog: &Catalog,
) -> anyhow::Result<BTreeMap<String, Decimal>> {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{DataType, Float64Type};
    let prices: BTreeMap<&str, &tally_core::pricing::PlanPrices> = catalog
        .plans
        .iter()
        .filter_map(|p| Some((p.id.as_str(), p.prices.as_ref()?)))
        .collect();
    let mut out = BTreeMap::new();
    for b in billing {
        let column = |name: &str| {
            b.column_by_name(name)
                .with_context(|| format!("the billing rows have no {name} column"))
        };
        let text = |name: &str| -> anyhow::Result<_> {
            Ok(arrow::compute::cast(column(name)?, &DataType::Utf8)?)
        };
        let (customer, plan, feature) = (text("customer")?, text("plan")?, text("feature")?);
        let (customer, plan, feature) = (
            customer.as_string::<i32>(),
            plan.as_string::<i32>(),
            feature.as_string::<i32>(),
        );
        let accepted = column("accepted")?.as_primitive::<Float64Type>();
        let overage = column("overage")?.as_primitive::<Float64Type>();
        for i in 0..b.num_rows() {
            if plan.is_null(i) || overage.value(i) <= 0.0 {
                continue;
            }
            let Some(prices) = prices.get(plan.value(i)) else {
                continue;
            };
            let Some(price) = prices.features.get(feature.value(i)) else {
                continue;
            };
            let exact = |q: f64| quantity_of(q).with_context(|| format!("quantity {q}"));
            let charge = overage_charge(
                price,
                exact(accepted.value(i))?,
                exact(overage.value(i))?,
                &prices.currency,
            );
            *out.entry(customer.value(i).to_owned())
                .or_insert(Decimal::ZERO) += charge;
        }
    }
    Ok(out)
}

/// The demo catalogue, and a definition for 99 % of the generated customers: the largest
/// ten on enterprise, every fourth on pro (some with add-ons or a grant), the rest on free;
/// every fiftieth suspended, every thirtieth fenced to its home region. Every hundredth
/// has no definition at all (its events are decided `unknown_customer`).
pub fn definitions(spec: &Spec) -> anyhow::Result<(Catalog, Customers)> {
    let catalog: Catalog = toml::from_str(include_str!("../../../examples/catalog.toml"))
        .context("the demo catalogue")?;
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
    let defs = Definitions::open(&nats.jetstream, nats.replicas).await?;
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
    let defs = Definitions::open(&nats.jetstream, nats.replicas).await?;
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
    pub decisions: BTreeMap<String, u64>,
    /// Billable events and quantity per customer × feature.
    pub lines: BTreeMap<(String, String), (u64, f64)>,
    /// Quantity decided `overage` per customer × feature (part of `lines`).
    pub overage: BTreeMap<(String, String), f64>,
    pub quantity: f64,
}

/// Decides the published messages, in order, through a quota engine of its own: what
/// the worker must have decided (a customer's events reach its partition in publish
/// order; an event id seen before is dropped; malformed events are dead letters).
/// `progress` is told the events of each message decided.
pub fn replay(
    messages: &[workload::OutMessage],
    catalog: &Catalog,
    customers: &Customers,
    mut progress: impl FnMut(u64),
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
        progress(u64::from(m.events));
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
                if decision == tally_core::Decision::Overage {
                    *expected
                        .overage
                        .entry((event.subject.to_string(), event.feature.to_string()))
                        .or_default() += event.quantity;
                }
            }
        }
    }
    expected
}

/// Billable events and quantity per customer × feature from the billing query's rows,
/// summed over plans.
pub fn lines_of(billing: &[RecordBatch]) -> BTreeMap<(String, String), (u64, f64)> {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{Float64Type, Int64Type};
    let mut lines = BTreeMap::new();
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

async fn count_decisions(lake: &Lakehouse) -> anyhow::Result<BTreeMap<String, u64>> {
    use datafusion::arrow::array::{Array, AsArray};
    let batches = lake
        .context()
        .sql("SELECT decision, COUNT(*) AS n FROM events GROUP BY decision")
        .await?
        .collect()
        .await?;
    let mut out = BTreeMap::new();
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

/// What went through the pipeline, and how each event was decided.
fn print_pipeline(r: &DemoReport) {
    let published = r.events_generated + r.duplicates_published;
    println!();
    println!("Pipeline for {}", r.period);
    println!(
        "  published {:>11} events in {} NATS messages: {} generated ({} malformed), {} sent twice",
        grouped(published),
        grouped(r.messages_published),
        grouped(r.events_generated),
        grouped(r.events_invalid),
        grouped(r.duplicates_published),
    );
    println!(
        "  recorded  {:>11} events in the lake ({} Parquet files), {} events/s from the first \
         publish to the last acknowledgement",
        grouped(r.events_in_lake),
        grouped(r.files_written),
        grouped(r.events_per_second.round() as u64),
    );
    println!(
        "  set aside {:>11} dead letters (malformed), {} duplicates dropped",
        grouped(r.dead_letters),
        grouped(r.duplicates_dropped),
    );
    let mut decisions: Vec<(&String, &u64)> = r.decisions.iter().collect();
    decisions.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    let billable = |d: &str| d == "accepted" || d == "overage";
    let group = |keep: bool| {
        let picked: Vec<(&String, &u64)> = decisions
            .iter()
            .copied()
            .filter(|(d, _)| billable(d) == keep)
            .collect();
        let total: u64 = picked.iter().map(|(_, n)| **n).sum();
        let each: Vec<String> = picked
            .iter()
            .map(|(d, n)| format!("{d} {}", grouped(**n)))
            .collect();
        (grouped(total), each.join(", "))
    };
    let (billed, billed_each) = group(true);
    let (refused, refused_each) = group(false);
    println!("  billable  {billed:>11} events: {billed_each}");
    println!("  not billed{refused:>11} events: {refused_each}");
}

/// The demo's verdict, and where to look next.
fn print_check(r: &DemoReport, lines_match: bool, example: Option<&str>) {
    println!();
    if r.matches {
        println!(
            "Check: MATCH. The lake holds each of the {} valid events once, and its decisions \
             and {} billing lines ({} events, quantity {}) equal those of an independent replay \
             of the published events.",
            grouped(r.events_valid),
            grouped(r.billing_lines),
            grouped(r.events_billed),
            quantity(r.quantity_billed),
        );
    } else {
        println!(
            "Check: MISMATCH. The lake holds {} events of {} valid; billed quantity {}, the \
             replay expects {}; billing lines {}; decisions in the lake {:?}, in the replay {:?}.",
            grouped(r.events_in_lake),
            grouped(r.events_valid),
            quantity(r.quantity_billed),
            quantity(r.quantity_expected),
            if lines_match { "equal" } else { "differ" },
            r.decisions,
            r.decisions_expected,
        );
    }
    println!(
        "The lake: {}/lake/events/date=YYYY-MM-DD/*.parquet. Ask it more, for example:",
        r.data_dir
    );
    println!(
        "  tally billing --period {}{} --data-dir {}",
        r.period,
        example.map_or(String::new(), |c| format!(" --customer {c}")),
        r.data_dir
    );
    println!(
        "  tally sql \"SELECT feature, SUM(quantity) AS quantity FROM events GROUP BY feature \
         ORDER BY quantity DESC\" --data-dir {}",
        r.data_dir
    );
}

/// Digits in groups of three: `1234567.5` as `1,234,567.5`.
fn group_digits(number: &str) -> String {
    let (sign, rest) = number
        .strip_prefix('-')
        .map_or(("", number), |rest| ("-", rest));
    let (whole, fraction) = rest.split_at(rest.find('.').unwrap_or(rest.len()));
    let mut out = String::from(sign);
    for (i, c) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out + fraction
}

fn grouped(n: u64) -> String {
    group_digits(&n.to_string())
}

/// An amount with two decimals (the demo catalogue's USD), grouped.
fn money(amount: Decimal) -> String {
    group_digits(&format_money(amount, None))
}

/// A quantity, grouped, with its fraction when it has one.
fn quantity(q: f64) -> String {
    group_digits(&q.to_string())
}

/// The first day of the current UTC month.
pub fn this_month() -> NaiveDate {
    let today = Utc::now().date_naive();
    NaiveDate::from_ymd_opt(today.year(), today.month(), 1).unwrap_or(today)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::pricing::{self, LineKind};

    #[test]
    fn digits_are_grouped_in_threes() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_000), "1,000");
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(quantity(13_458.5), "13,458.5");
        assert_eq!(quantity(40_910.0), "40,910");
        assert_eq!(money(Decimal::new(-5_202_583, 2)), "-52,025.83");
        assert_eq!(money(Decimal::new(49, 0)), "49.00");
    }

    /// The demo catalogue is priced for the demo's workload: over a month of it, most
    /// paying customers owe usage charges, and some owe money for usage past a soft limit.
    #[test]
    fn the_demo_catalogue_charges_usage_and_overage_on_the_demo_workload() {
        // A closed month, so that the decisions depend on nothing but the workload: the
        // default demo's thousand events per customer, on a tenth of its size.
        let mut spec = Spec::new(100_000, NaiveDate::from_ymd_opt(2026, 11, 1).unwrap());
        spec.customers = 100;
        spec.until = "2026-12-01T00:00:00Z".parse().unwrap();
        let (catalog, customers) = definitions(&spec).unwrap();
        let (messages, _) = workload::generate(&spec);
        let expected = replay(&messages, &catalog, &customers, |_| {});
        assert!(
            expected.decisions["overage"] > 0,
            "{:?}",
            expected.decisions
        );

        let plans = catalog
            .plans
            .iter()
            .map(|p| (p.id.clone(), p.clone()))
            .collect();
        let addons = catalog
            .addons
            .iter()
            .map(|a| (a.id.clone(), a.clone()))
            .collect();
        let (mut paying, mut with_usage, mut with_overage) = (0, 0, 0);
        for c in &customers.customers {
            let usage: Vec<pricing::Usage> = expected
                .lines
                .iter()
                .filter(|((customer, _), _)| *customer == c.id)
                .map(|(key, (events, q))| {
                    let over = expected.overage.get(key).copied().unwrap_or(0.0);
                    pricing::Usage {
                        plan: c.plan.clone(),
                        feature: key.1.clone(),
                        events: *events,
                        accepted: quantity_of(q - over).unwrap(),
                        overage: quantity_of(over).unwrap(),
                    }
                })
                .collect();
            let invoice = pricing::invoice(c, &usage, &plans, &addons).unwrap();
            if invoice.total.is_zero() {
                continue;
            }
            paying += 1;
            let charged = |kind| {
                invoice
                    .lines
                    .iter()
                    .any(|l| l.kind == kind && !l.amount.is_zero())
            };
            if charged(LineKind::Usage) {
                with_usage += 1;
            }
            let prices = plans[&c.plan].prices.as_ref().unwrap();
            let overage: Decimal = usage
                .iter()
                .filter_map(|u| {
                    let price = prices.features.get(&u.feature)?;
                    Some(overage_charge(
                        price,
                        u.accepted,
                        u.overage,
                        &prices.currency,
                    ))
                })
                .sum();
            if overage > Decimal::ZERO {
                with_overage += 1;
            }
        }
        assert!(
            paying > 20 && with_usage * 4 >= paying * 3 && with_overage * 5 >= paying,
            "{paying} paying customers, {with_usage} with usage charges, {with_overage} with overage"
        );
    }
}
