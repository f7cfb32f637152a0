//! Tally's query layer: a DataFusion session over the lake, and the named queries.
//!
//! The lake's `events` directory is registered as a hive-partitioned listing table with
//! the schema from [`tally_core::schema`] (given explicitly, so an empty lake is an empty
//! table rather than an error). Named queries live as `.sql` files under `queries/` and
//! take their arguments as parameters.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{Datelike, NaiveDate};
use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::prelude::{SessionContext, col, lit};
use datafusion::scalar::ScalarValue;
use tally_core::schema::{self, lake_schema};

const BILLING_SQL: &str = include_str!("../queries/billing.sql");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("query engine: {0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),
    #[error("lake directory {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("bad period {0:?}: expected YYYY-MM")]
    BadPeriod(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A calendar month, the billing period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Period {
    pub year: i32,
    pub month: u32,
}

impl Period {
    pub fn first_day(self) -> NaiveDate {
        NaiveDate::from_ymd_opt(self.year, self.month, 1).expect("month is 1..=12")
    }

    pub fn next(self) -> Period {
        if self.month == 12 {
            Period {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Period {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// The period holding a date.
    pub fn of(date: NaiveDate) -> Period {
        Period {
            year: date.year(),
            month: date.month(),
        }
    }
}

impl FromStr for Period {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::BadPeriod(s.to_owned());
        let (y, m) = s.split_once('-').ok_or_else(bad)?;
        let (year, month) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if y.len() != 4 || m.len() != 2 || !(1..=12).contains(&month) {
            return Err(bad());
        }
        Ok(Period { year, month })
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// A DataFusion session with the lake's tables registered.
pub struct Lakehouse {
    ctx: SessionContext,
}

impl Lakehouse {
    /// Opens the lake rooted at `root` (its `events/` directory is created if missing).
    pub async fn open(root: &Path) -> Result<Self> {
        let events = root.join(schema::EVENTS_TABLE);
        std::fs::create_dir_all(&events).map_err(|source| Error::Io {
            path: events.display().to_string(),
            source,
        })?;
        let ctx = SessionContext::new();
        let url = ListingTableUrl::parse(format!("{}/", events.display()))?;
        let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
            .with_file_extension(".parquet")
            .with_table_partition_cols(vec![(schema::DATE.to_owned(), DataType::Utf8)]);
        let config = ListingTableConfig::new(url)
            .with_listing_options(options)
            .with_schema(lake_schema());
        ctx.register_table(
            schema::EVENTS_TABLE,
            Arc::new(ListingTable::try_new(config)?),
        )?;
        Ok(Self { ctx })
    }

    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Billable usage per customer × feature in a period: `customer, feature, period,
    /// events, quantity`, ordered by customer and feature.
    pub async fn billing(
        &self,
        period: Period,
        customer: Option<&str>,
    ) -> Result<Vec<RecordBatch>> {
        let mut df = self.ctx.sql(BILLING_SQL).await?.with_param_values(vec![
            ScalarValue::from(period.first_day().format("%Y-%m-%d").to_string()),
            ScalarValue::from(period.next().first_day().format("%Y-%m-%d").to_string()),
            ScalarValue::from(period.to_string()),
        ])?;
        if let Some(c) = customer {
            df = df.filter(col("customer").eq(lit(c)))?;
        }
        Ok(df.collect().await?)
    }
}

/// Sums of a billing result: lines, events and quantity.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BillingTotals {
    pub lines: u64,
    pub events: u64,
    pub quantity: f64,
}

impl BillingTotals {
    pub fn of(batches: &[RecordBatch]) -> BillingTotals {
        let mut t = BillingTotals::default();
        for b in batches {
            t.lines += b.num_rows() as u64;
            if let Some(events) = b.column_by_name("events") {
                t.events += events
                    .as_primitive::<Int64Type>()
                    .iter()
                    .map(|v| v.unwrap_or(0) as u64)
                    .sum::<u64>();
            }
            if let Some(q) = b.column_by_name("quantity") {
                t.quantity += q
                    .as_primitive::<Float64Type>()
                    .iter()
                    .map(|v| v.unwrap_or(0.0))
                    .sum::<f64>();
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_parse_and_roll_over() {
        let p: Period = "2026-12".parse().unwrap();
        assert_eq!(p.next().to_string(), "2027-01");
        assert_eq!(p.first_day().to_string(), "2026-12-01");
        for bad in ["2026-13", "2026-1", "26-11", "2026/11", "x"] {
            assert!(bad.parse::<Period>().is_err(), "{bad}");
        }
    }
}
