//! Tally's reports: every customer's invoice for a period, the month's upgrade candidates
//! (overage) and how the features are taken up (adoption).
//!
//! Each report has two halves:
//!
//! - **from the lake**: [`invoices`], [`overage`] and [`adoption`] read the aggregates
//!   they need through [`tally_query`] (never the raw files), then
//! - **pure**: [`rate`], [`overage_of`] and [`adoption_of`] turn the definitions
//!   ([`Definitions`]) and that usage into typed rows. They need neither NATS nor a lake,
//!   which is how the golden scenarios test them.
//!
//! A customer's entitlement to a feature is [`tally_core::entitlement::Effective`], the
//! rule the quota engine enforces, so a report never measures usage against a limit the
//! engine did not apply.
//!
//! Every report is written by one renderer ([`render`]): JSON, CSV, an Arrow IPC stream
//! with a declared schema, or aligned tables; `tally billing` and `GET /api/v1/billing`
//! (and the others) call the same functions and write the same bytes. [`LakeReports`]
//! runs them, and read-only SQL, for a server.

mod adoption;
mod definitions;
mod invoices;
pub mod meters;
mod overage;
pub mod render;
mod service;

pub use adoption::{
    ActiveUsersRow, AdoptionReport, AdoptionRequest, AdoptionUsage, FREE_PLAN, FeatureAdoption,
    FirstUseRow, FreeTierRow, RegionRow, adoption, adoption_of,
};
pub use definitions::Definitions;
pub use invoices::{
    Bill, BillingUsage, InvoiceJson, InvoiceRequest, Invoices, Late, LineJson, TierJson, invoices,
    rate,
};
pub use overage::{
    OverLine, OverageReport, OverageUsage, RejectionDay, Upgrade, overage, overage_of,
};
pub use render::{Format, Report, render};
pub use service::{LakeReports, ReportBody, ReportError};

use tally_query::Lakehouse;
use tally_query::catalog::DEFINITION_TABLES;

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the lake: {0}")]
    Lake(#[from] tally_query::Error),
    /// A named query's answer is not shaped as the report expects: a bug.
    #[error("the {query} query: {message}")]
    Shape {
        query: &'static str,
        message: String,
    },
    #[error("quantity {0} is not a number")]
    Quantity(f64),
    #[error("rating the usage of {customer}: {message}")]
    Rating { customer: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether `query` names one of the definitions' tables (`plans`, `prices`, `customers`,
/// `customer_addons`), which [`Definitions::register`] fills.
pub fn needs_definitions(lake: &Lakehouse, query: &str) -> bool {
    let named = tally_query::sql::tables_named(lake, query);
    DEFINITION_TABLES.iter().any(|t| named.contains(*t))
}

impl Definitions {
    /// Registers the plans and customers as `lake`'s definitions tables, for SQL.
    pub fn register(&self, lake: &Lakehouse) -> Result<()> {
        let plans: Vec<_> = self.plans.values().cloned().collect();
        let customers: Vec<_> = self.customers.values().cloned().collect();
        lake.register_definitions(&plans, &customers)?;
        Ok(())
    }
}
