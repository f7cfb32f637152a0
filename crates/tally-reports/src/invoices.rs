//! Every customer's invoice for a period, rated with the plans' prices (`tally billing`,
//! `GET /api/v1/billing`).
//!
//! The usage comes from the lake ([`Lakehouse::billing`]: billable quantity per customer
//! × plan × feature, split into `accepted` and `overage`); the plans, add-ons and
//! customers are the definitions as they are now. Each customer whose definition is valid
//! at some time in the period gets an invoice ([`tally_core::pricing::invoice`]): its
//! usage lines rated by the plan that decided them, its plan's fee, its add-ons' fees and
//! the minimum. Usage of a customer without a definition is listed under an invoice with
//! no currency, at no charge. Usage of the period decided `late` (it arrived after its
//! counter had moved on) is not billed; each bill lists it apart, for review.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::{Float64Type, Int64Type};
use serde::{Serialize, Serializer};
use tally_core::entitlement::{Customer, UsagePeriod};
use tally_core::pricing::{self, Invoice, Line, LineKind, Usage};
use tally_query::{Lakehouse, Period, Scope};
use utoipa::ToSchema;

use crate::render::{Cell, Column, Kind, Report, Section, col};
use crate::{Definitions, Error, Result};

/// Which invoices to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceRequest {
    pub period: Period,
    /// Only this customer's.
    pub customer: Option<String>,
    /// Each customer's billing month that starts in the period, on its anchor day (the
    /// last day of a shorter month), instead of the calendar month.
    pub anniversary: bool,
}

/// The invoices of a period, by customer id.
#[derive(Debug, Clone, PartialEq)]
pub struct Invoices {
    pub period: Period,
    pub bills: Vec<Bill>,
}

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
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Late {
    pub plan: String,
    pub feature: String,
    pub events: u64,
    pub quantity: f64,
}

/// The lake's billable usage and late usage of a request, per customer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BillingUsage {
    pub usage: BTreeMap<String, Vec<Usage>>,
    pub late: BTreeMap<String, Vec<Late>>,
}

/// Every bill of the request, from the lake's usage.
pub async fn invoices(
    lake: &Lakehouse,
    defs: &Definitions,
    request: &InvoiceRequest,
) -> Result<Invoices> {
    let periods: Vec<(String, i64, i64)> = billed(defs, request)
        .iter()
        .map(|(id, (_, (s, e)))| (id.clone(), s.timestamp_micros(), e.timestamp_micros()))
        .collect();
    let scope = if request.anniversary {
        Scope::Periods {
            name: request.period,
            periods: &periods,
        }
    } else {
        Scope::Month(request.period)
    };
    let customer = request.customer.as_deref();
    let usage = BillingUsage {
        usage: usage_of(&lake.billing(&scope, customer).await?)?,
        late: late_of(&lake.late(&scope, customer).await?)?,
    };
    rate(defs, request, usage)
}

/// Every bill of the request: each customer valid in its period, and any other with usage
/// in the lake (calendar months only: an anniversary needs the definition's anchor day).
pub fn rate(defs: &Definitions, request: &InvoiceRequest, usage: BillingUsage) -> Result<Invoices> {
    let BillingUsage { usage, mut late } = usage;
    let mut customers = billed(defs, request);
    let month = bounds(request.period);
    for id in usage.keys().chain(late.keys()) {
        customers
            .entry(id.clone())
            .or_insert_with(|| (Customer::new(id.clone(), ""), month));
    }
    let mut bills = Vec::with_capacity(customers.len());
    for (id, (c, (start, end))) in &customers {
        let lines = usage.get(id).map_or(&[][..], Vec::as_slice);
        let invoice =
            pricing::invoice(c, lines, &defs.plans, &defs.addons).map_err(|e| Error::Rating {
                customer: id.clone(),
                message: e.to_string(),
            })?;
        bills.push(Bill {
            invoice,
            start: *start,
            end: *end,
            late: late.remove(id).unwrap_or_default(),
        });
    }
    Ok(Invoices {
        period: request.period,
        bills,
    })
}

/// A period as times, `[start, end)`.
type Span = (DateTime<Utc>, DateTime<Utc>);

/// The customers billed and their periods: those defined and valid at some time of it.
fn billed(defs: &Definitions, request: &InvoiceRequest) -> BTreeMap<String, (Customer, Span)> {
    defs.customers
        .values()
        .filter(|c| request.customer.as_ref().is_none_or(|id| c.id == *id))
        .filter_map(|c| {
            let (start, end) = if request.anniversary {
                billing_month(request.period, c.anchor_day)
            } else {
                bounds(request.period)
            };
            let valid =
                c.valid_from.is_none_or(|f| f < end) && c.valid_until.is_none_or(|u| u > start);
            valid.then(|| (c.id.clone(), (c.clone(), (start, end))))
        })
        .collect()
}

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
    fn of(batch: &'a RecordBatch, query: &'static str) -> Result<Keyed<'a>> {
        let text = |name| Ok::<_, Error>(column(batch, query, name)?.as_string::<i32>());
        Ok(Keyed {
            batch,
            query,
            customer: text("customer")?,
            plan: text("plan")?,
            feature: text("feature")?,
            events: column(batch, query, "events")?.as_primitive::<Int64Type>(),
        })
    }

    fn quantity(&self, name: &str) -> Result<&'a Float64Array> {
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

fn column<'a>(batch: &'a RecordBatch, query: &'static str, name: &str) -> Result<&'a ArrayRef> {
    batch.column_by_name(name).ok_or_else(|| Error::Shape {
        query,
        message: format!("no column {name}"),
    })
}

/// The billing query's rows as usage per customer.
fn usage_of(batches: &[RecordBatch]) -> Result<BTreeMap<String, Vec<Usage>>> {
    let exact = |q: f64| pricing::quantity(q).ok_or(Error::Quantity(q));
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
fn late_of(batches: &[RecordBatch]) -> Result<BTreeMap<String, Vec<Late>>> {
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

/// An invoice as JSON: amounts as exact decimal strings.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Invoice)]
pub struct InvoiceJson<'a> {
    #[schema(value_type = String)]
    pub customer: &'a str,
    /// The month billed, `YYYY-MM`.
    pub period: String,
    /// The period billed, `[period_start, period_end)`, RFC 3339.
    pub period_start: String,
    pub period_end: String,
    /// ISO 4217; null for usage of a customer without a definition.
    #[schema(value_type = Option<String>)]
    pub currency: Option<&'a str>,
    pub lines: Vec<LineJson<'a>>,
    pub subtotal: String,
    pub total: String,
    /// Not billed: usage of the period that arrived after its counter moved on.
    #[schema(value_type = Vec<Late>)]
    pub late: &'a [Late],
}

/// A line of an invoice.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = InvoiceLine)]
pub struct LineJson<'a> {
    /// `usage`, `flat_fee`, `add_on` or `minimum`.
    #[schema(value_type = String)]
    pub kind: LineKind,
    #[schema(value_type = String)]
    pub plan: &'a str,
    /// The feature, add-on or plan the line is for.
    #[schema(value_type = String)]
    pub item: &'a str,
    pub events: u64,
    pub quantity: String,
    pub included: String,
    pub charged: String,
    pub unit_price: Option<String>,
    pub tiers: Vec<TierJson>,
    pub amount: String,
}

/// A tier's part of a usage line.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = InvoiceTier)]
pub struct TierJson {
    pub from: String,
    pub to: String,
    pub quantity: String,
    pub unit_price: String,
    pub flat_price: String,
    pub amount: String,
}

impl<'a> LineJson<'a> {
    fn of(l: &'a Line, currency: Option<&str>) -> Self {
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
}

impl<'a> InvoiceJson<'a> {
    fn of(bill: &'a Bill, period: Period) -> Self {
        let i = &bill.invoice;
        let currency = i.currency.as_deref();
        InvoiceJson {
            customer: &i.customer,
            period: period.to_string(),
            period_start: bill.start.to_rfc3339(),
            period_end: bill.end.to_rfc3339(),
            currency,
            lines: i.lines.iter().map(|l| LineJson::of(l, currency)).collect(),
            subtotal: pricing::format_money(i.subtotal, currency),
            total: pricing::format_money(i.total, currency),
            late: &bill.late,
        }
    }
}

/// JSON: one array of invoices.
impl Serialize for Invoices {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(self.bills.iter().map(|b| InvoiceJson::of(b, self.period)))
    }
}

/// A row per invoice line and per late usage.
const LINES: &[Column] = &[
    col("customer", Kind::Text),
    col("period", Kind::Text),
    col("currency", Kind::Text),
    col("kind", Kind::Text),
    col("plan", Kind::Text),
    col("item", Kind::Text),
    col("events", Kind::Int),
    col("quantity", Kind::Decimal),
    col("included", Kind::Decimal),
    col("charged", Kind::Decimal),
    col("unit_price", Kind::Decimal),
    col("amount", Kind::Decimal),
];

/// An invoice for people: a line per row.
const FOR_PEOPLE: &[Column] = &[
    col("line", Kind::Text),
    col("used", Kind::Decimal),
    col("included", Kind::Decimal),
    col("charged", Kind::Decimal),
    col("amount", Kind::Decimal),
];

fn kind_name(kind: LineKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

impl Report for Invoices {
    fn sections(&self) -> Vec<Section> {
        let period = self.period.to_string();
        let mut rows = Vec::new();
        for bill in &self.bills {
            let i = &bill.invoice;
            let currency = i.currency.as_deref();
            let lead = |kind: String, plan: &str, item: &str, events: u64| -> Vec<Cell> {
                vec![
                    Cell::from(i.customer.as_str()),
                    Cell::from(period.as_str()),
                    Cell::from(currency),
                    Cell::Text(kind),
                    Cell::from(plan),
                    Cell::from(item),
                    Cell::from(events),
                ]
            };
            for l in &bill.late {
                let mut row = lead("late".to_owned(), &l.plan, &l.feature, l.events);
                row.extend([
                    Cell::Text(l.quantity.to_string()),
                    Cell::Null,
                    Cell::Null,
                    Cell::Null,
                    Cell::Null,
                ]);
                rows.push(row);
            }
            for l in &i.lines {
                let j = LineJson::of(l, currency);
                let mut row = lead(kind_name(l.kind), &l.plan, &l.item, l.events);
                row.extend([
                    Cell::Text(j.quantity),
                    Cell::Text(j.included),
                    Cell::Text(j.charged),
                    Cell::from(j.unit_price),
                    Cell::Text(j.amount),
                ]);
                rows.push(row);
            }
        }
        vec![Section {
            name: "lines",
            title: format!("{period}: invoice lines"),
            columns: LINES,
            rows,
        }]
    }

    /// An invoice per customer: its period and total, then its lines.
    fn for_people(&self) -> Vec<Section> {
        self.bills
            .iter()
            .map(|bill| {
                let i = &bill.invoice;
                let currency = i.currency.as_deref();
                let mut rows: Vec<Vec<Cell>> = i
                    .lines
                    .iter()
                    .map(|l| {
                        let j = LineJson::of(l, currency);
                        let usage = l.kind == LineKind::Usage;
                        let line = match l.kind {
                            LineKind::Usage => format!("{} ({})", l.item, l.plan),
                            LineKind::FlatFee => format!("{} plan fee", l.plan),
                            LineKind::AddOn => format!("add-on {} × {}", l.item, j.quantity),
                            LineKind::Minimum => format!("up to the {} minimum", l.plan),
                        };
                        let only_usage = |v: String| if usage { Cell::Text(v) } else { Cell::Null };
                        vec![
                            Cell::Text(line),
                            only_usage(j.quantity),
                            only_usage(j.included),
                            only_usage(j.charged),
                            Cell::Text(j.amount),
                        ]
                    })
                    .collect();
                rows.extend(bill.late.iter().map(|l| {
                    vec![
                        Cell::Text(format!(
                            "late, not billed: {} ({}), {} events",
                            l.feature, l.plan, l.events
                        )),
                        Cell::Text(l.quantity.to_string()),
                        Cell::Null,
                        Cell::Null,
                        Cell::Null,
                    ]
                }));
                Section {
                    name: "invoice",
                    title: format!(
                        "{} — {} to {} — total {} {}",
                        i.customer,
                        bill.start.date_naive(),
                        bill.end.date_naive(),
                        pricing::format_money(i.total, currency),
                        currency.unwrap_or("(no prices)")
                    ),
                    columns: FOR_PEOPLE,
                    rows,
                }
            })
            .collect()
    }
}
