//! What a customer bought: plans, add-ons, SKU mappings and customers.
//!
//! These are the definitions an operator or a CRM writes (as TOML or JSON files for
//! `tally plans apply` / `tally customers apply`, and later through the API); they live in
//! NATS key-value buckets and the quota engine (`tally-quota`) decides events against
//! them. Times are UTC. Quantities are in the feature's own unit.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A plan: a named set of feature entitlements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub features: BTreeMap<String, Entitlement>,
    /// Distinct users allowed per billing period across the whole plan (`None`: any
    /// number). A customer's own `seats` replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seats: Option<u32>,
}

/// One feature's entitlement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entitlement {
    /// On or off; events of an enabled feature are accepted and never counted.
    Boolean {
        #[serde(default = "enabled")]
        enabled: bool,
    },
    /// A configuration value (`max_projects = 10`), returned by checks, never counted.
    Static { value: serde_json::Value },
    /// Counted per usage period against a limit.
    Metered(Metered),
}

fn enabled() -> bool {
    true
}

/// A metered feature: a limit per usage period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metered {
    /// Quantity allowed per period before the limit applies; `None`: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<f64>,
    #[serde(default)]
    pub period: UsagePeriod,
    /// Hard: an event that would cross the limit is refused whole (`limit_reached`).
    /// Soft: it is counted and billed as `overage`.
    #[serde(default)]
    pub enforcement: Enforcement,
    /// Quantity per period included in the plan's price (for rating); defaults to the
    /// limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub included: Option<f64>,
    /// Percentages of the limit whose crossing sends one notification per period.
    #[serde(default = "default_thresholds")]
    pub thresholds: Vec<u32>,
    /// The plan that lifts this limit, named in upgrade prompts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_plan: Option<String>,
    /// Distinct users allowed per period for this feature (`None`: any number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seats: Option<u32>,
}

/// Notifications at 80 % and 100 % of a limit unless a plan says otherwise.
pub fn default_thresholds() -> Vec<u32> {
    vec![80, 100]
}

impl Metered {
    /// An unlimited, hard, monthly feature with the default thresholds.
    pub fn new(limit: Option<f64>) -> Self {
        Self {
            limit,
            period: UsagePeriod::default(),
            enforcement: Enforcement::default(),
            included: None,
            thresholds: default_thresholds(),
            next_plan: None,
            seats: None,
        }
    }
}

/// The window a usage counter covers. All periods are UTC.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsagePeriod {
    Hour,
    Day,
    /// The calendar month.
    #[default]
    Month,
    /// A month that starts on the customer's billing anchor day.
    Billing,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    #[default]
    Hard,
    Soft,
}

/// An add-on: extra features, or extra quantity on top of a plan's limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddOn {
    pub id: String,
    pub name: String,
    /// Features the add-on turns on (they replace the plan's entitlement of that feature).
    #[serde(default)]
    pub features: BTreeMap<String, Entitlement>,
    /// Quantity added per period to a metered feature's limit, per unit bought.
    #[serde(default)]
    pub extra: BTreeMap<String, f64>,
    /// Seats added per unit bought.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seats: Option<u32>,
}

/// Maps an order's SKU to what it provisions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sku {
    pub sku: String,
    #[serde(flatten)]
    pub target: SkuTarget,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkuTarget {
    /// The order sets the customer's plan.
    Plan(String),
    /// The order adds this many units of an add-on per unit ordered.
    Addon {
        id: String,
        #[serde(default = "one")]
        quantity: u32,
    },
}

fn one() -> u32 {
    1
}

/// A customer's entitlement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Customer {
    pub id: String,
    pub plan: String,
    #[serde(default)]
    pub addons: Vec<AddOnRef>,
    /// Distinct users allowed per billing period (replaces the plan's `seats`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seats: Option<u32>,
    #[serde(default)]
    pub grants: Vec<Grant>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_from: Option<DateTime<Utc>>,
    /// The first instant the entitlement no longer holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<DateTime<Utc>>,
    /// Regions events may come from; empty: anywhere. An event without a region is
    /// blocked when the list is not empty.
    #[serde(default)]
    pub regions: Vec<String>,
    #[serde(default)]
    pub status: Status,
    /// The day of the month billing periods start (1–31; a shorter month starts its
    /// period on its last day).
    #[serde(default = "first_day")]
    pub anchor_day: u8,
}

fn first_day() -> u8 {
    1
}

impl Customer {
    /// An active customer on `plan` with nothing else.
    pub fn new(id: impl Into<String>, plan: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            plan: plan.into(),
            addons: Vec::new(),
            seats: None,
            grants: Vec::new(),
            valid_from: None,
            valid_until: None,
            regions: Vec::new(),
            status: Status::Active,
            anchor_day: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddOnRef {
    pub id: String,
    #[serde(default = "one")]
    pub quantity: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    #[default]
    Active,
    Suspended,
}

/// A top-up of a metered feature: used after the period's limit, in priority order
/// (lowest number first), then earliest expiry first. What is left when it expires is
/// gone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub id: String,
    pub feature: String,
    pub amount: f64,
    pub effective: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<DateTime<Utc>>,
    #[serde(default)]
    pub priority: u32,
    /// A recurring grant comes back whole at the start of each such period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recurring: Option<UsagePeriod>,
}

/// A file of definitions, as `tally plans apply` reads it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    #[serde(default)]
    pub plans: Vec<Plan>,
    #[serde(default)]
    pub addons: Vec<AddOn>,
    #[serde(default)]
    pub skus: Vec<Sku>,
}
