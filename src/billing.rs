//! `tally billing`: every customer's invoice for a period, rated with the plans' prices.
//!
//! The usage comes from the lake (`Lakehouse::billing`: billable quantity per customer ×
//! plan × feature, split into `accepted` and `overage`); the plans, add-ons and customers
//! from the key-value buckets as they are now. Each customer whose definition is valid at
//! some time in the period gets an invoice ([`tally_core::pricing::invoice`]): its usage
//! lines rated by the plan that decided them, its plan's fee, its add-ons' fees and the
//! minimum. Usage of a customer without a definition is listed under an invoice with no
//! currency, at no charge. Usage of the period decided `late` (it arrived after its
//! counter had moved on) is not billed; each bill lists it apart, for review.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::Context as _;
use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::{Float64Type, Int64Type};
use serde::Serialize;
use tally_core::entitlement::{Customer, UsagePeriod};
use tally_core::pricing::{self, Invoice, Line, LineKind, Usage};
use tally_query::{Lakehouse, Period, Scope};

use crate::config::Config;
use crate::output::{ReportFormat, csv_to_arrow};

/// A customer's invoice for its period, and the usage of the period decided `late`.
#[derive(Debug, Clone, PartialEq)]
pub struct Bill {
    pub invoice: Invoice,
    /// The period billed, `[start, end)`.
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub late: Vec<Late>,
}

/// Late usage of one feature under one plan: not billed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Late {
    pub plan: String,
    pub feature: String,
    pub events: u64,
    pub quantity: f64,
}

/// Every bill of the period (only `customer`'s when given), by customer id: the calendar
/// month, or with `anniversary` each customer's billing month that starts in it, on the
/// customer's anchor day (the last day of a shorter month).
pub async fn invoices(
    config: &Config,
    period: Period,
    customer: Option<&str>,
    anniversary: bool,
) -> anyhow::Result<Vec<Bill>> {
    let crate::analytics::Defs {
        plans,
        addons,
        customers: defined,
    } = crate::analytics::definitions(config).await?;
    let month = bounds(period);
    let period_of = |c: &Customer| {
        if anniversary {
            billing_month(period, c.anchor_day)
        } else {
            month
        }
    };
    let mut customers: BTreeMap<String, (Customer, Span)> = defined
        .into_values()
        .filter(|c| customer.is_none_or(|id| c.id == id))
        .filter_map(|c| {
            let (start, end) = period_of(&c);
            let valid =
                c.valid_from.is_none_or(|f| f < end) && c.valid_until.is_none_or(|u| u > start);
            valid.then(|| (c.id.clone(), (c, (start, end))))
        })
        .collect();
    let periods: Vec<(String, i64, i64)> = customers
        .iter()
        .map(|(id, (_, (s, e)))| (id.clone(), s.timestamp_micros(), e.timestamp_micros()))
        .collect();
    let scope = if anniversary {
        Scope::Periods {
            name: period,
            periods: &periods,
        }
    } else {
        Scope::Month(period)
    };
    let lake = Lakehouse::open(&config.lake_dir()).await?;
    let usage = usage_of(&lake.billing(&scope, customer).await?)?;
    let mut late = late_of(&lake.late(&scope, customer).await?)?;
    // Usage of a customer no longer defined is still listed (calendar months only: an
    // anniversary needs the definition's anchor day).
    for id in usage.keys().chain(late.keys()) {
        customers
            .entry(id.clone())
            .or_insert_with(|| (Customer::new(id.clone(), ""), month));
    }
    let mut out = Vec::with_capacity(customers.len());
    for (id, (c, (start, end))) in &customers {
        let lines = usage.get(id).map_or(&[][..], Vec::as_slice);
        out.push(Bill {
            invoice: pricing::invoice(c, lines, &plans, &addons)
                .with_context(|| format!("rating the usage of {id}"))?,
            start: *start,
            end: *end,
            late: late.remove(id).unwrap_or_default(),
        });
    }
    Ok(out)
}

/// A period as times, `[start, end)`.
type Span = (DateTime<Utc>, DateTime<Utc>);

/// A calendar month's bounds as times.
fn bounds(period: Period) -> Span {
    (
        midnight(period.first_day()),
        midnight(period.next().first_day()),
    )
}

/// The billing month of a customer anchored on `anchor_day` that starts in `period`.
fn billing_month(period: Period, anchor_day: u8) -> Span {
    let first = period.first_day();
    let days = (period.next().first_day() - first).num_days() as u32;
    let start = first
        .with_day(u32::from(anchor_day).clamp(1, days))
        .unwrap_or(first);
    let start_us = midnight(start).timestamp_micros();
    let (s, e) = tally_core::period::bounds(UsagePeriod::Billing, anchor_day, start_us);
    let at = |us| DateTime::from_timestamp_micros(us).unwrap_or_default();
    (at(s), at(e))
}

fn midnight(d: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&d.and_time(chrono::NaiveTime::MIN))
}

/// The columns the billing and late queries share.
struct Keyed<'a> {
    batch: &'a RecordBatch,
    query: &'static str,
    customer: &'a StringArray,
    plan: &'a StringArray,
    feature: &'a StringArray,
    events: &'a Int64Array,
}

impl<'a> Keyed<'a> {
    fn of(batch: &'a RecordBatch, query: &'static str) -> anyhow::Result<Keyed<'a>> {
        let text = |name| Ok::<_, anyhow::Error>(column(batch, query, name)?.as_string::<i32>());
        Ok(Keyed {
            batch,
            query,
            customer: text("customer")?,
            plan: text("plan")?,
            feature: text("feature")?,
            events: column(batch, query, "events")?.as_primitive::<Int64Type>(),
        })
    }

    fn quantity(&self, name: &str) -> anyhow::Result<&'a Float64Array> {
        Ok(column(self.batch, self.query, name)?.as_primitive::<Float64Type>())
    }

    fn customer(&self, i: usize) -> String {
        self.customer.value(i).to_owned()
    }

    /// The plan that decided the events; empty where none did.
    fn plan(&self, i: usize) -> String {
        if self.plan.is_null(i) {
            String::new()
        } else {
            self.plan.value(i).to_owned()
        }
    }

    fn feature(&self, i: usize) -> String {
        self.feature.value(i).to_owned()
    }

    fn events(&self, i: usize) -> u64 {
        u64::try_from(self.events.value(i)).unwrap_or(0)
    }
}

fn column<'a>(batch: &'a RecordBatch, query: &str, name: &str) -> anyhow::Result<&'a ArrayRef> {
    batch
        .column_by_name(name)
        .with_context(|| format!("the {query} query has no {name}"))
}

/// The billing query's rows as usage per customer.
fn usage_of(batches: &[RecordBatch]) -> anyhow::Result<BTreeMap<String, Vec<Usage>>> {
    let exact =
        |q: f64| pricing::quantity(q).with_context(|| format!("quantity {q} is not a number"));
    let mut usage: BTreeMap<String, Vec<Usage>> = BTreeMap::new();
    for b in batches {
        let k = Keyed::of(b, "billing")?;
        let (accepted, overage) = (k.quantity("accepted")?, k.quantity("overage")?);
        for i in 0..b.num_rows() {
            usage.entry(k.customer(i)).or_default().push(Usage {
                plan: k.plan(i),
                feature: k.feature(i),
                events: k.events(i),
                accepted: exact(accepted.value(i))?,
                overage: exact(overage.value(i))?,
            });
        }
    }
    Ok(usage)
}

/// The late query's rows per customer.
fn late_of(batches: &[RecordBatch]) -> anyhow::Result<BTreeMap<String, Vec<Late>>> {
    let mut late: BTreeMap<String, Vec<Late>> = BTreeMap::new();
    for b in batches {
        let k = Keyed::of(b, "late")?;
        let quantity = k.quantity("quantity")?;
        for i in 0..b.num_rows() {
            late.entry(k.customer(i)).or_default().push(Late {
                plan: k.plan(i),
                feature: k.feature(i),
                events: k.events(i),
                quantity: quantity.value(i),
            });
        }
    }
    Ok(late)
}

/// An invoice as JSON: amounts as strings, so that they stay exact.
#[derive(Serialize)]
struct InvoiceJson<'a> {
    customer: &'a str,
    period: String,
    /// The period billed, `[period_start, period_end)`.
    period_start: String,
    period_end: String,
    currency: Option<&'a str>,
    lines: Vec<LineJson<'a>>,
    subtotal: String,
    total: String,
    /// Not billed: usage of the period that arrived after its counter moved on.
    late: &'a [Late],
}

#[derive(Serialize)]
struct LineJson<'a> {
    kind: LineKind,
    plan: &'a str,
    item: &'a str,
    events: u64,
    quantity: String,
    included: String,
    charged: String,
    unit_price: Option<String>,
    tiers: Vec<TierJson>,
    amount: String,
}

#[derive(Serialize)]
struct TierJson {
    from: String,
    to: String,
    quantity: String,
    unit_price: String,
    flat_price: String,
    amount: String,
}

fn line_json<'a>(l: &'a Line, currency: Option<&str>) -> LineJson<'a> {
    LineJson {
        kind: l.kind,
        plan: &l.plan,
        item: &l.item,
        events: l.events,
        quantity: l.quantity.normalize().to_string(),
        included: l.included.normalize().to_string(),
        charged: l.charged.normalize().to_string(),
        unit_price: l.unit_price.map(|p| p.normalize().to_string()),
        tiers: l
            .tiers
            .iter()
            .map(|t| TierJson {
                from: t.from.normalize().to_string(),
                to: t.to.normalize().to_string(),
                quantity: t.quantity.normalize().to_string(),
                unit_price: t.unit_price.normalize().to_string(),
                flat_price: t.flat_price.normalize().to_string(),
                amount: t.amount.normalize().to_string(),
            })
            .collect(),
        amount: pricing::format_money(l.amount, currency),
    }
}

/// Prints the invoices: a table per customer, JSON (one array of invoices) or CSV (one
/// row per line).
pub fn write(
    out: &mut dyn Write,
    bills: &[Bill],
    period: Period,
    format: ReportFormat,
) -> anyhow::Result<()> {
    match format {
        ReportFormat::Json => {
            let json: Vec<InvoiceJson<'_>> = bills
                .iter()
                .map(|bill| {
                    let i = &bill.invoice;
                    let currency = i.currency.as_deref();
                    InvoiceJson {
                        customer: &i.customer,
                        period: period.to_string(),
                        period_start: bill.start.to_rfc3339(),
                        period_end: bill.end.to_rfc3339(),
                        currency,
                        lines: i.lines.iter().map(|l| line_json(l, currency)).collect(),
                        subtotal: pricing::format_money(i.subtotal, currency),
                        total: pricing::format_money(i.total, currency),
                        late: &bill.late,
                    }
                })
                .collect();
            serde_json::to_writer(&mut *out, &json)?;
            writeln!(out)?;
        }
        // The CSV rows as a table: `events` an int64 and every other column text, so that
        // amounts stay exact.
        ReportFormat::Arrow => {
            let mut csv = Vec::new();
            write(&mut csv, bills, period, ReportFormat::Csv)?;
            out.write_all(&csv_to_arrow(&csv)?)?;
        }
        ReportFormat::Csv => {
            writeln!(
                out,
                "customer,period,currency,kind,plan,item,events,quantity,included,charged,unit_price,amount"
            )?;
            for bill in bills {
                let i = &bill.invoice;
                let currency = i.currency.as_deref();
                for l in &bill.late {
                    writeln!(
                        out,
                        "{},{period},{},late,{},{},{},{},,,,",
                        csv(&i.customer),
                        currency.unwrap_or(""),
                        csv(&l.plan),
                        csv(&l.feature),
                        l.events,
                        l.quantity
                    )?;
                }
                for l in &i.lines {
                    let j = line_json(l, currency);
                    writeln!(
                        out,
                        "{},{},{},{},{},{},{},{},{},{},{},{}",
                        csv(&i.customer),
                        period,
                        currency.unwrap_or(""),
                        serde_json::to_value(l.kind)?.as_str().unwrap_or(""),
                        csv(&l.plan),
                        csv(&l.item),
                        l.events,
                        j.quantity,
                        j.included,
                        j.charged,
                        j.unit_price.unwrap_or_default(),
                        j.amount,
                    )?;
                }
            }
        }
        ReportFormat::Table => {
            for bill in bills {
                let i = &bill.invoice;
                let currency = i.currency.as_deref();
                writeln!(
                    out,
                    "{} — {} to {} — total {} {}",
                    i.customer,
                    bill.start.date_naive(),
                    bill.end.date_naive(),
                    pricing::format_money(i.total, currency),
                    currency.unwrap_or("(no prices)")
                )?;
                for l in &i.lines {
                    let j = line_json(l, currency);
                    let what = match l.kind {
                        LineKind::Usage => format!("{} ({})", l.item, l.plan),
                        LineKind::FlatFee => format!("{} plan fee", l.plan),
                        LineKind::AddOn => format!("add-on {} × {}", l.item, j.quantity),
                        LineKind::Minimum => format!("up to the {} minimum", l.plan),
                    };
                    let detail = if l.kind == LineKind::Usage {
                        format!(
                            "{} used, {} included, {} charged",
                            j.quantity, j.included, j.charged
                        )
                    } else {
                        String::new()
                    };
                    writeln!(out, "  {what:<40} {detail:<48} {:>14}", j.amount)?;
                }
                for l in &bill.late {
                    writeln!(
                        out,
                        "  late, not billed: {} ({}): {} events, {} used",
                        l.feature, l.plan, l.events, l.quantity
                    )?;
                }
            }
        }
    }
    Ok(())
}

/// A CSV field, quoted when it must be.
fn csv(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}
