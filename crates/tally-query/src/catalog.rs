//! The definitions as tables, for SQL beside the lake's: what a product manager joins
//! the usage with.
//!
//! - `decisions`: every decision the lake records — `decision` (its name), `code` (the
//!   lake's `decision_code`), `billable`. Always registered.
//! - `plans`: `plan`, `name`, `seats`, `currency`, `flat_fee`, `minimum`.
//! - `prices`: one row per plan × priced feature × tier (one row for the models without
//!   tiers) — `plan`, `feature`, `currency`, `model` (`per_unit`, `package`, `graduated`,
//!   `volume`), `included`, `tier` (1, 2, … in order; null without tiers), `up_to` (the
//!   tier's bound, null for the last), `unit_price`, `flat_price` (a tier's),
//!   `package_size`, `package_price`, `overage_unit_price`.
//! - `customers`: `customer`, `plan`, `status`, `seats`, `valid_from`, `valid_until`,
//!   `regions` (a list), `anchor_day`.
//! - `customer_addons`: `customer`, `addon`, `quantity`.
//!
//! Money and quantities of prices are `Decimal128(38, s)`, `s` the most decimal places any
//! value of the column has, so every value is exact. The definition tables are snapshots,
//! empty when a lake is opened: [`Lakehouse::register_definitions`] replaces them with the
//! definitions it is given.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Decimal128Array, ListBuilder, RecordBatch, StringArray,
    StringBuilder, TimestampMicrosecondArray, UInt8Array, UInt32Array,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use tally_core::Decision;
use tally_core::entitlement::{Customer, Plan, Status};
use tally_core::pricing::{Decimal, PriceModel};

use crate::{Lakehouse, Result};

/// The tables [`Lakehouse::register_definitions`] registers.
pub const DEFINITION_TABLES: [&str; 4] = ["plans", "prices", "customers", "customer_addons"];

/// Every decision: `decision`, `code`, `billable`.
pub(crate) fn decisions() -> Result<RecordBatch> {
    let all = Decision::ALL;
    batch(vec![
        (
            "decision",
            Arc::new(StringArray::from_iter_values(
                all.iter().map(|d| d.as_str()),
            )),
            false,
        ),
        (
            "code",
            Arc::new(UInt8Array::from_iter_values(all.iter().map(|d| d.code()))),
            false,
        ),
        (
            "billable",
            Arc::new(BooleanArray::from_iter(
                all.iter().map(|d| Some(d.is_billable())),
            )),
            false,
        ),
    ])
}

impl Lakehouse {
    /// Registers `plans` and `customers` as the tables of [`DEFINITION_TABLES`] (see the
    /// module), replacing those registered before.
    pub fn register_definitions(&self, plans: &[Plan], customers: &[Customer]) -> Result<()> {
        let tables = [
            ("plans", plans_batch(plans)?),
            ("prices", prices_batch(plans)?),
            ("customers", customers_batch(customers)?),
            ("customer_addons", addons_batch(customers)?),
        ];
        for (name, batch) in tables {
            self.register_batch(name, batch)?;
        }
        Ok(())
    }

    /// Registers `batch` as the table `name`, replacing one of that name.
    pub(crate) fn register_batch(&self, name: &str, batch: RecordBatch) -> Result<()> {
        let table = MemTable::try_new(batch.schema(), vec![vec![batch]])?;
        self.context().deregister_table(name)?;
        self.context().register_table(name, Arc::new(table))?;
        Ok(())
    }
}

fn plans_batch(plans: &[Plan]) -> Result<RecordBatch> {
    let prices = |f: fn(&tally_core::pricing::PlanPrices) -> Decimal| {
        plans
            .iter()
            .map(|p| p.prices.as_ref().map(f))
            .collect::<Vec<_>>()
    };
    batch(vec![
        (
            "plan",
            texts(plans.iter().map(|p| Some(p.id.as_str()))),
            false,
        ),
        (
            "name",
            texts(plans.iter().map(|p| Some(p.name.as_str()))),
            false,
        ),
        (
            "seats",
            Arc::new(UInt32Array::from_iter(plans.iter().map(|p| p.seats))),
            true,
        ),
        (
            "currency",
            texts(
                plans
                    .iter()
                    .map(|p| p.prices.as_ref().map(|x| x.currency.as_str())),
            ),
            true,
        ),
        ("flat_fee", decimals(&prices(|x| x.flat_fee))?, true),
        ("minimum", decimals(&prices(|x| x.minimum))?, true),
    ])
}

/// One row of `prices`.
#[derive(Debug, Clone, Copy, Default)]
struct PriceRow<'a> {
    plan: &'a str,
    feature: &'a str,
    currency: &'a str,
    model: &'static str,
    included: Decimal,
    tier: Option<u32>,
    up_to: Option<Decimal>,
    unit_price: Option<Decimal>,
    flat_price: Option<Decimal>,
    package_size: Option<Decimal>,
    package_price: Option<Decimal>,
    overage_unit_price: Option<Decimal>,
}

fn prices_batch(plans: &[Plan]) -> Result<RecordBatch> {
    let mut rows = Vec::new();
    for plan in plans {
        let Some(prices) = &plan.prices else { continue };
        for (feature, price) in &prices.features {
            let row = PriceRow {
                plan: &plan.id,
                feature,
                currency: &prices.currency,
                included: price.included,
                overage_unit_price: price.overage_unit_price,
                ..PriceRow::default()
            };
            match &price.model {
                PriceModel::PerUnit { unit_price } => rows.push(PriceRow {
                    model: "per_unit",
                    unit_price: Some(*unit_price),
                    ..row
                }),
                PriceModel::Package {
                    package_size,
                    package_price,
                } => rows.push(PriceRow {
                    model: "package",
                    package_size: Some(*package_size),
                    package_price: Some(*package_price),
                    ..row
                }),
                PriceModel::Graduated { tiers } | PriceModel::Volume { tiers } => {
                    let model = match &price.model {
                        PriceModel::Graduated { .. } => "graduated",
                        _ => "volume",
                    };
                    for (i, tier) in tiers.iter().enumerate() {
                        rows.push(PriceRow {
                            model,
                            tier: Some(u32::try_from(i + 1).unwrap_or(u32::MAX)),
                            up_to: tier.up_to,
                            unit_price: Some(tier.unit_price),
                            flat_price: Some(tier.flat_price),
                            ..row
                        });
                    }
                }
            }
        }
    }
    let column =
        |f: fn(&PriceRow<'_>) -> Option<Decimal>| decimals(&rows.iter().map(f).collect::<Vec<_>>());
    batch(vec![
        ("plan", texts(rows.iter().map(|r| Some(r.plan))), false),
        (
            "feature",
            texts(rows.iter().map(|r| Some(r.feature))),
            false,
        ),
        (
            "currency",
            texts(rows.iter().map(|r| Some(r.currency))),
            false,
        ),
        ("model", texts(rows.iter().map(|r| Some(r.model))), false),
        ("included", column(|r| Some(r.included))?, false),
        (
            "tier",
            Arc::new(UInt32Array::from_iter(rows.iter().map(|r| r.tier))),
            true,
        ),
        ("up_to", column(|r| r.up_to)?, true),
        ("unit_price", column(|r| r.unit_price)?, true),
        ("flat_price", column(|r| r.flat_price)?, true),
        ("package_size", column(|r| r.package_size)?, true),
        ("package_price", column(|r| r.package_price)?, true),
        (
            "overage_unit_price",
            column(|r| r.overage_unit_price)?,
            true,
        ),
    ])
}

fn customers_batch(customers: &[Customer]) -> Result<RecordBatch> {
    let times = |f: fn(&Customer) -> Option<i64>| -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from_iter(customers.iter().map(f)).with_timezone("UTC"))
    };
    let mut regions = ListBuilder::new(StringBuilder::new());
    for c in customers {
        for r in &c.regions {
            regions.values().append_value(r);
        }
        regions.append(true);
    }
    let regions = regions.finish();
    let regions_type = regions.data_type().clone();
    batch_typed(vec![
        (
            Field::new("customer", DataType::Utf8, false),
            texts(customers.iter().map(|c| Some(c.id.as_str()))),
        ),
        (
            Field::new("plan", DataType::Utf8, false),
            texts(customers.iter().map(|c| Some(c.plan.as_str()))),
        ),
        (
            Field::new("status", DataType::Utf8, false),
            texts(customers.iter().map(|c| {
                Some(match c.status {
                    Status::Active => "active",
                    Status::Suspended => "suspended",
                })
            })),
        ),
        (
            Field::new("seats", DataType::UInt32, true),
            Arc::new(UInt32Array::from_iter(customers.iter().map(|c| c.seats))),
        ),
        (
            Field::new("valid_from", utc(), true),
            times(|c| c.valid_from.map(|t| t.timestamp_micros())),
        ),
        (
            Field::new("valid_until", utc(), true),
            times(|c| c.valid_until.map(|t| t.timestamp_micros())),
        ),
        (
            Field::new("regions", regions_type, false),
            Arc::new(regions),
        ),
        (
            Field::new("anchor_day", DataType::UInt8, false),
            Arc::new(UInt8Array::from_iter_values(
                customers.iter().map(|c| c.anchor_day),
            )),
        ),
    ])
}

fn addons_batch(customers: &[Customer]) -> Result<RecordBatch> {
    let rows: Vec<(&str, &str, u32)> = customers
        .iter()
        .flat_map(|c| {
            c.addons
                .iter()
                .map(|a| (c.id.as_str(), a.id.as_str(), a.quantity))
        })
        .collect();
    batch(vec![
        ("customer", texts(rows.iter().map(|r| Some(r.0))), false),
        ("addon", texts(rows.iter().map(|r| Some(r.1))), false),
        (
            "quantity",
            Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.2))),
            false,
        ),
    ])
}

fn utc() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn texts<'a>(values: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(StringArray::from_iter(values))
}

/// `values` as `Decimal128(38, s)`, `s` the most decimal places among them: every value
/// exact.
fn decimals(values: &[Option<Decimal>]) -> Result<ArrayRef> {
    let scale = values
        .iter()
        .flatten()
        .map(Decimal::scale)
        .max()
        .unwrap_or(0);
    let exact = |d: &Decimal| -> Result<i128> {
        10i128
            .checked_pow(scale - d.scale())
            .and_then(|f| d.mantissa().checked_mul(f))
            .ok_or_else(|| {
                DataFusionError::Execution(format!("{d} does not fit 38 digits at scale {scale}"))
                    .into()
            })
    };
    let array = values
        .iter()
        .map(|v| v.as_ref().map(exact).transpose())
        .collect::<Result<Decimal128Array>>()?
        .with_precision_and_scale(38, i8::try_from(scale).unwrap_or(i8::MAX))
        .map_err(DataFusionError::from)?;
    Ok(Arc::new(array))
}

/// A batch of `(name, column, nullable)`, typed as the columns are.
fn batch(columns: Vec<(&str, ArrayRef, bool)>) -> Result<RecordBatch> {
    batch_typed(
        columns
            .into_iter()
            .map(|(name, c, nullable)| (Field::new(name, c.data_type().clone(), nullable), c))
            .collect(),
    )
}

fn batch_typed(columns: Vec<(Field, ArrayRef)>) -> Result<RecordBatch> {
    let (fields, arrays): (Vec<Field>, Vec<ArrayRef>) = columns.into_iter().unzip();
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
        .map_err(DataFusionError::from)?)
}
