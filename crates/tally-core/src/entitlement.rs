//! What a customer bought: plans, add-ons, SKU mappings and customers.
//!
//! These are the definitions an operator or a CRM writes (as TOML or JSON files for
//! `tally plans apply` / `tally customers apply`, and later through the API); they live in
//! NATS key-value buckets and the quota engine (`tally-quota`) decides events against
//! them. Times are UTC. Quantities are in the feature's own unit.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::pricing::{AddOnPrice, PlanPrices};

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
    /// What the plan charges per billing period (`None`: nothing; usage is still metered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prices: Option<PlanPrices>,
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
    /// What each unit bought costs per billing period, in the plan's currency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<AddOnPrice>,
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

/// A customer's entitlement to one feature: what its plan grants, as the add-ons it holds
/// change it. This is the one rule of what a customer may do, shared by the quota engine
/// (which enforces it) and the reports (which measure usage against it):
///
/// - an add-on that defines the feature replaces the plan's entitlement (the last such
///   add-on held wins);
/// - each held add-on's `extra` for a metered feature raises its limit (and its
///   allowance) by the extra times the units held; extra for a feature that is not
///   metered adds nothing;
/// - a plan that does not exist entitles to nothing (the caller passes no plan).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Effective<'a> {
    pub entitlement: &'a Entitlement,
    /// What the add-ons add to a metered feature's limit and allowance (0 otherwise).
    pub extra: f64,
}

impl<'a> Effective<'a> {
    /// `feature` on `plan` with the add-ons held (each with its units); `None`: neither
    /// the plan nor an add-on has it.
    pub fn of(plan: &'a Plan, addons: &[(&'a AddOn, u32)], feature: &str) -> Option<Self> {
        let mut entitlement = plan.features.get(feature);
        for (addon, _) in addons {
            if let Some(e) = addon.features.get(feature) {
                entitlement = Some(e);
            }
        }
        entitlement.map(|e| Self::with_extra(e, addons, feature))
    }

    /// Every feature the plan or a held add-on has, by name.
    pub fn all(plan: &'a Plan, addons: &[(&'a AddOn, u32)]) -> BTreeMap<&'a str, Self> {
        let mut features: BTreeMap<&'a str, &'a Entitlement> = plan
            .features
            .iter()
            .map(|(name, e)| (name.as_str(), e))
            .collect();
        for (addon, _) in addons {
            features.extend(addon.features.iter().map(|(name, e)| (name.as_str(), e)));
        }
        features
            .into_iter()
            .map(|(name, e)| (name, Self::with_extra(e, addons, name)))
            .collect()
    }

    fn with_extra(entitlement: &'a Entitlement, addons: &[(&AddOn, u32)], feature: &str) -> Self {
        let extra = match entitlement {
            Entitlement::Metered(_) => addons
                .iter()
                .filter_map(|(a, units)| a.extra.get(feature).map(|x| x * f64::from(*units)))
                .fold(0.0, |sum, x| sum + x),
            _ => 0.0,
        };
        Self { entitlement, extra }
    }

    pub fn metered(&self) -> Option<&'a Metered> {
        match self.entitlement {
            Entitlement::Metered(m) => Some(m),
            _ => None,
        }
    }

    /// Whether it lets the customer use the feature at all (not a disabled boolean).
    pub fn entitles(&self) -> bool {
        !matches!(self.entitlement, Entitlement::Boolean { enabled: false })
    }

    /// A metered feature's limit per usage period with the extra; `None`: unlimited, or
    /// not metered.
    pub fn limit(&self) -> Option<f64> {
        self.metered()?.limit.map(|l| l + self.extra)
    }

    /// A metered feature's allowance per usage period: `included`, else `limit`, with the
    /// extra; `None`: neither, or not metered.
    pub fn allowance(&self) -> Option<f64> {
        let m = self.metered()?;
        m.included.or(m.limit).map(|q| q + self.extra)
    }

    /// The customer's seats: its own, else the plan's, plus each held add-on's per unit.
    pub fn seats(customer: &Customer, plan: &Plan, addons: &[(&AddOn, u32)]) -> Option<u32> {
        let mut seats = customer.seats.or(plan.seats);
        for (addon, units) in addons {
            if let (Some(s), Some(more)) = (seats.as_mut(), addon.seats) {
                *s = s.saturating_add(more.saturating_mul(*units));
            }
        }
        seats
    }
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
    /// Meters (OpenMeter's definitions): what usage the events' `data` carries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub meters: Vec<crate::meter::Meter>,
    /// Features bound to meters: their entitlements count what the meter reads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<crate::meter::Feature>,
}

/// One flaw in a definition: the field's path (`plans[1].features.calls.limit`) and what
/// is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Collects problems under a path.
struct Check<'p> {
    problems: &'p mut Vec<Problem>,
}

impl Check<'_> {
    fn flag(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }

    fn id(&mut self, field: &str, id: &str) {
        if id.is_empty() {
            self.flag(field, "must not be empty");
        } else if id.len() > MAX_ID_LEN {
            self.flag(
                field,
                format!("is {} bytes; the limit is {MAX_ID_LEN}", id.len()),
            );
        }
    }

    fn quantity(&mut self, field: &str, q: f64) {
        if !q.is_finite() || q < 0.0 {
            self.flag(field, format!("must be a finite number ≥ 0, not {q}"));
        }
    }

    fn entitlement(&mut self, field: &str, e: &Entitlement) {
        let Entitlement::Metered(m) = e else {
            return;
        };
        if let Some(limit) = m.limit {
            self.quantity(&format!("{field}.limit"), limit);
        }
        if let Some(included) = m.included {
            self.quantity(&format!("{field}.included"), included);
        }
        if m.thresholds.len() > MAX_THRESHOLDS {
            self.flag(
                format!("{field}.thresholds"),
                format!("at most {MAX_THRESHOLDS} thresholds"),
            );
        }
        for (i, t) in m.thresholds.iter().enumerate() {
            if *t == 0 || *t > 10_000 {
                self.flag(
                    format!("{field}.thresholds[{i}]"),
                    format!("must be a percentage from 1 to 10000, not {t}"),
                );
            }
        }
        if let Some(next) = &m.next_plan {
            self.id(&format!("{field}.next_plan"), next);
        }
    }

    fn unique<'a>(&mut self, what: &str, ids: impl Iterator<Item = &'a str>) {
        let mut seen = std::collections::BTreeSet::new();
        for (i, id) in ids.enumerate() {
            if !seen.insert(id) {
                self.flag(format!("{what}[{i}].id"), format!("{id:?} appears twice"));
            }
        }
    }
}

/// The longest id of a plan, add-on, SKU, customer or grant.
pub const MAX_ID_LEN: usize = 256;
/// The most thresholds a metered feature may notify at.
pub const MAX_THRESHOLDS: usize = 31;

impl Catalog {
    /// Every problem in the catalogue; empty when it may be applied.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut c = Check {
            problems: &mut problems,
        };
        c.unique("plans", self.plans.iter().map(|p| p.id.as_str()));
        c.unique("addons", self.addons.iter().map(|a| a.id.as_str()));
        let mut slugs = std::collections::BTreeSet::new();
        for (i, m) in self.meters.iter().enumerate() {
            c.problems.extend(m.problems(&format!("meters[{i}]")));
            if !slugs.insert(m.slug.as_str()) {
                c.flag(
                    format!("meters[{i}].slug"),
                    format!("{:?} appears twice", m.slug),
                );
            }
        }
        let mut keys = std::collections::BTreeSet::new();
        for (i, f) in self.features.iter().enumerate() {
            // A meter stored before is checked where the file is applied.
            let meter = self.meters.iter().find(|m| m.slug == f.meter_slug);
            c.problems
                .extend(f.problems(&format!("features[{i}]"), meter));
            if !keys.insert(f.key.as_str()) {
                c.flag(
                    format!("features[{i}].key"),
                    format!("{:?} appears twice", f.key),
                );
            }
        }
        for (i, p) in self.plans.iter().enumerate() {
            c.id(&format!("plans[{i}].id"), &p.id);
            for (name, e) in &p.features {
                c.id(&format!("plans[{i}].features"), name);
                c.entitlement(&format!("plans[{i}].features.{name}"), e);
            }
            if let Some(prices) = &p.prices {
                if let Err(e) = prices.validate() {
                    c.flag(format!("plans[{i}].prices.{}", e.field), e.message);
                }
                for name in prices.features.keys() {
                    if !matches!(p.features.get(name), Some(Entitlement::Metered(_))) {
                        c.flag(
                            format!("plans[{i}].prices.features.{name}"),
                            "is not a metered feature of the plan",
                        );
                    }
                }
            }
        }
        for (i, a) in self.addons.iter().enumerate() {
            c.id(&format!("addons[{i}].id"), &a.id);
            for (name, e) in &a.features {
                c.entitlement(&format!("addons[{i}].features.{name}"), e);
            }
            for (name, q) in &a.extra {
                c.quantity(&format!("addons[{i}].extra.{name}"), *q);
            }
            if let Some(price) = &a.price
                && price.fee < crate::pricing::Decimal::ZERO
            {
                c.flag(format!("addons[{i}].price.fee"), "is below zero");
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in self.skus.iter().enumerate() {
            c.id(&format!("skus[{i}].sku"), &s.sku);
            if !seen.insert(s.sku.as_str()) {
                c.flag(
                    format!("skus[{i}].sku"),
                    format!("{:?} appears twice", s.sku),
                );
            }
            match &s.target {
                SkuTarget::Plan(p) => c.id(&format!("skus[{i}].plan"), p),
                SkuTarget::Addon { id, quantity } => {
                    c.id(&format!("skus[{i}].addon.id"), id);
                    if *quantity == 0 {
                        c.flag(format!("skus[{i}].addon.quantity"), "must be at least 1");
                    }
                }
            }
        }
        problems
    }
}

impl Customer {
    /// Every problem in the definition, each field under `at` (`customers[3]`).
    pub fn problems(&self, at: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut c = Check {
            problems: &mut problems,
        };
        c.id(&format!("{at}.id"), &self.id);
        c.id(&format!("{at}.plan"), &self.plan);
        if !(1..=31).contains(&self.anchor_day) {
            c.flag(
                format!("{at}.anchor_day"),
                format!(
                    "must be a day of the month from 1 to 31, not {}",
                    self.anchor_day
                ),
            );
        }
        if let (Some(from), Some(until)) = (self.valid_from, self.valid_until)
            && until <= from
        {
            c.flag(format!("{at}.valid_until"), "must be after valid_from");
        }
        for (i, a) in self.addons.iter().enumerate() {
            c.id(&format!("{at}.addons[{i}].id"), &a.id);
            if a.quantity == 0 {
                c.flag(format!("{at}.addons[{i}].quantity"), "must be at least 1");
            }
        }
        c.unique(
            &format!("{at}.grants"),
            self.grants.iter().map(|g| g.id.as_str()),
        );
        for (i, g) in self.grants.iter().enumerate() {
            c.id(&format!("{at}.grants[{i}].id"), &g.id);
            c.id(&format!("{at}.grants[{i}].feature"), &g.feature);
            c.quantity(&format!("{at}.grants[{i}].amount"), g.amount);
            if g.expires.is_some_and(|e| e <= g.effective) {
                c.flag(
                    format!("{at}.grants[{i}].expires"),
                    "must be after effective",
                );
            }
        }
        for (i, r) in self.regions.iter().enumerate() {
            c.id(&format!("{at}.regions[{i}]"), r);
        }
        problems
    }
}

/// A file of customers, as `tally customers apply` reads it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Customers {
    #[serde(default)]
    pub customers: Vec<Customer>,
}

impl Customers {
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for (i, c) in self.customers.iter().enumerate() {
            problems.extend(c.problems(&format!("customers[{i}]")));
            if !seen.insert(c.id.as_str()) {
                problems.push(Problem {
                    field: format!("customers[{i}].id"),
                    message: format!("{:?} appears twice", c.id),
                });
            }
        }
        problems
    }
}

/// One order line from a CRM or ERP, its SKU resolved: a plan bought (a new subscription,
/// or a change of plan) or units of an add-on.
#[derive(Debug, Clone, PartialEq)]
pub struct Order {
    pub customer: String,
    /// What the order's SKU maps to.
    pub target: SkuTarget,
    /// Units ordered: of the add-on (times the SKU's own quantity); 1 for a plan.
    pub quantity: u32,
    /// Replaces the customer's seats.
    pub seats: Option<u32>,
    /// When a new subscription starts (`valid_from`).
    pub starts_at: Option<DateTime<Utc>>,
    /// When the subscription ends (`valid_until`).
    pub ends_at: Option<DateTime<Utc>>,
    /// The billing anchor day.
    pub anchor_day: Option<u8>,
}

impl Order {
    /// The customer after this order, or every problem with it, each naming the order's
    /// field (`quantity`, `starts_at`, …).
    ///
    /// - A plan order on no customer creates one on that plan, starting at `starts_at`.
    /// - On a customer whose entitlement has ended (`valid_until` ≤ `now`) it starts a new
    ///   term: the plan, from `starts_at` (or `now`) until `ends_at`, without the ended
    ///   term's add-ons (grants, bought separately, stay).
    /// - On a current customer it changes the plan at once (upgrade or downgrade); it may
    ///   move the end (`ends_at`) and the anchor day, not the start.
    /// - An add-on order adds `quantity` × the SKU's units to the customer's add-on of that
    ///   id; the customer must exist, and the subscription's dates are the plan order's
    ///   to set (an add-on order may repeat them, not change them).
    /// - `seats` replaces the customer's seats either way. Suspension is left as it is.
    pub fn apply(
        &self,
        current: Option<&Customer>,
        now: DateTime<Utc>,
    ) -> Result<Customer, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut c = Check {
            problems: &mut problems,
        };
        if self.quantity == 0 {
            c.flag("quantity", "must be at least 1");
        }
        let mut customer = match (&self.target, current) {
            (SkuTarget::Plan(plan), current) => {
                if self.quantity > 1 {
                    c.flag(
                        "quantity",
                        format!(
                            "is {}: a plan is ordered once; order seats with `seats`",
                            self.quantity
                        ),
                    );
                }
                let mut customer = match current {
                    None => {
                        let mut new = Customer::new(self.customer.clone(), plan.clone());
                        new.valid_from = self.starts_at;
                        new
                    }
                    Some(ended) if ended.valid_until.is_some_and(|until| until <= now) => {
                        let mut renewed = ended.clone();
                        renewed.addons.clear();
                        renewed.valid_from = Some(self.starts_at.unwrap_or(now));
                        renewed.valid_until = None;
                        renewed
                    }
                    Some(current) => {
                        if self.starts_at.is_some() && self.starts_at != current.valid_from {
                            c.flag(
                                "starts_at",
                                format!(
                                    "customer {:?} is subscribed already (since {}); a plan \
                                     order changes its plan at once, and starts_at is for a \
                                     new subscription",
                                    current.id,
                                    current
                                        .valid_from
                                        .map_or("its creation".to_owned(), |t| t.to_rfc3339())
                                ),
                            );
                        }
                        current.clone()
                    }
                };
                customer.plan.clone_from(plan);
                if let Some(ends_at) = self.ends_at {
                    customer.valid_until = Some(ends_at);
                }
                if let Some(day) = self.anchor_day {
                    customer.anchor_day = day;
                }
                customer
            }
            (SkuTarget::Addon { .. }, None) => {
                c.flag(
                    "customer",
                    format!(
                        "no customer {:?}: an add-on is bought on top of a plan; order the plan first",
                        self.customer
                    ),
                );
                return Err(problems);
            }
            (SkuTarget::Addon { id, quantity }, Some(current)) => {
                let mut customer = current.clone();
                let same = |field: &str, ordered: bool, c: &mut Check<'_>| {
                    if ordered {
                        c.flag(
                            field,
                            format!(
                                "differs from customer {:?}'s; an add-on order cannot change \
                                 the subscription's dates (order the plan again)",
                                current.id
                            ),
                        );
                    }
                };
                same(
                    "starts_at",
                    self.starts_at.is_some() && self.starts_at != current.valid_from,
                    &mut c,
                );
                same(
                    "ends_at",
                    self.ends_at.is_some() && self.ends_at != current.valid_until,
                    &mut c,
                );
                same(
                    "anchor_day",
                    self.anchor_day.is_some_and(|d| d != current.anchor_day),
                    &mut c,
                );
                let units = self.quantity.checked_mul(*quantity);
                let existing = customer.addons.iter_mut().find(|a| a.id == *id);
                match (units, existing) {
                    (None, _) => c.flag(
                        "quantity",
                        format!("{} × {quantity} units is too many", self.quantity),
                    ),
                    (Some(units), Some(existing)) => match existing.quantity.checked_add(units) {
                        Some(total) => existing.quantity = total,
                        None => c.flag(
                            "quantity",
                            format!("{units} more units of {id:?} is too many"),
                        ),
                    },
                    (Some(units), None) => customer.addons.push(AddOnRef {
                        id: id.clone(),
                        quantity: units,
                    }),
                }
                customer
            }
        };
        if let Some(seats) = self.seats {
            customer.seats = Some(seats);
        }
        // The customer's own rules, named by the order field that set what is wrong.
        for p in customer.problems("") {
            let field = match p.field.trim_start_matches('.') {
                "id" => "customer".to_owned(),
                "plan" => "sku".to_owned(),
                "valid_from" => "starts_at".to_owned(),
                "valid_until" if self.ends_at.is_none() => "starts_at".to_owned(),
                "valid_until" => "ends_at".to_owned(),
                other => other.to_owned(),
            };
            if !problems.iter().any(|q| q.field == field) {
                problems.push(Problem {
                    field,
                    message: p.message,
                });
            }
        }
        if problems.is_empty() {
            Ok(customer)
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CATALOG: &str = r#"
        [[plans]]
        id = "free"
        name = "Free"
        [plans.features.api-calls]
        kind = "metered"
        limit = 1000
        period = "day"
        enforcement = "hard"
        next_plan = "pro"
        [plans.features.sso]
        kind = "boolean"
        enabled = false
        [plans.features.max-projects]
        kind = "static"
        value = 3

        [[addons]]
        id = "calls-pack"
        name = "10k calls"
        extra = { api-calls = 10000 }

        [[skus]]
        sku = "PRO-M"
        plan = "pro"

        [[skus]]
        sku = "CALLS-10K"
        addon = { id = "calls-pack", quantity = 1 }
    "#;

    #[test]
    fn a_toml_catalogue_reads_as_plans_addons_and_skus() {
        let catalog: Catalog = toml::from_str(CATALOG).unwrap();
        assert!(catalog.problems().is_empty(), "{:?}", catalog.problems());
        let free = &catalog.plans[0];
        let Entitlement::Metered(calls) = &free.features["api-calls"] else {
            panic!("api-calls is metered");
        };
        assert_eq!(calls.limit, Some(1000.0));
        assert_eq!(calls.period, UsagePeriod::Day);
        assert_eq!(calls.thresholds, [80, 100]);
        assert_eq!(
            free.features["sso"],
            Entitlement::Boolean { enabled: false }
        );
        assert_eq!(catalog.skus[0].target, SkuTarget::Plan("pro".to_owned()));
        assert_eq!(
            catalog.skus[1].target,
            SkuTarget::Addon {
                id: "calls-pack".to_owned(),
                quantity: 1
            }
        );
        // JSON carries the same definitions.
        let json = serde_json::to_string(&catalog).unwrap();
        assert_eq!(serde_json::from_str::<Catalog>(&json).unwrap(), catalog);
    }

    #[test]
    fn every_problem_names_its_field() {
        let mut catalog: Catalog = toml::from_str(CATALOG).unwrap();
        catalog.plans.push(catalog.plans[0].clone());
        if let Entitlement::Metered(m) = catalog.plans[0].features.get_mut("api-calls").unwrap() {
            m.limit = Some(-1.0);
            m.thresholds = vec![0, 80];
        }
        catalog.plans[0].prices = Some(
            toml::from_str(
                r#"
                currency = "usd"
                [features.api-calls]
                model = "per_unit"
                unit_price = "0.001"
                [features.nothing-metered]
                model = "per_unit"
                unit_price = "1"
                "#,
            )
            .unwrap(),
        );
        let fields: Vec<String> = catalog.problems().into_iter().map(|p| p.field).collect();
        assert_eq!(
            fields,
            [
                "plans[1].id",
                "plans[0].features.api-calls.limit",
                "plans[0].features.api-calls.thresholds[0]",
                "plans[0].prices.currency",
                "plans[0].prices.features.nothing-metered",
            ]
        );

        let customers: Customers = toml::from_str(
            r#"
            [[customers]]
            id = "acme"
            plan = "free"
            anchor_day = 32
            valid_from = "2026-11-01T00:00:00Z"
            valid_until = "2026-10-01T00:00:00Z"
            [[customers.grants]]
            id = "g"
            feature = "api-calls"
            amount = -5
            effective = "2026-11-01T00:00:00Z"
            expires = "2026-11-01T00:00:00Z"
            [[customers]]
            id = "acme"
            plan = ""
            "#,
        )
        .unwrap();
        let fields: Vec<String> = customers.problems().into_iter().map(|p| p.field).collect();
        assert_eq!(
            fields,
            [
                "customers[0].anchor_day",
                "customers[0].valid_until",
                "customers[0].grants[0].amount",
                "customers[0].grants[0].expires",
                "customers[1].plan",
                "customers[1].id",
            ]
        );
        // Unknown fields are refused by name when the file is read.
        let err =
            toml::from_str::<Customers>("[[customers]]\nid = \"a\"\nplan = \"p\"\nplna = 1\n")
                .unwrap_err();
        assert!(err.to_string().contains("plna"), "{err}");
    }

    fn utc(t: &str) -> DateTime<Utc> {
        t.parse().unwrap()
    }

    fn order(target: SkuTarget) -> Order {
        Order {
            customer: "acme".to_owned(),
            target,
            quantity: 1,
            seats: None,
            starts_at: None,
            ends_at: None,
            anchor_day: None,
        }
    }

    fn plan(id: &str) -> SkuTarget {
        SkuTarget::Plan(id.to_owned())
    }

    fn pack(per_unit: u32) -> SkuTarget {
        SkuTarget::Addon {
            id: "pack".to_owned(),
            quantity: per_unit,
        }
    }

    fn fields(problems: Vec<Problem>) -> Vec<String> {
        problems.into_iter().map(|p| p.field).collect()
    }

    const NOW: &str = "2026-11-10T00:00:00Z";

    #[test]
    fn a_plan_order_creates_the_customer_then_changes_its_plan() {
        let now = utc(NOW);
        let mut first = order(plan("free"));
        first.starts_at = Some(utc("2026-11-01T00:00:00Z"));
        first.ends_at = Some(utc("2027-11-01T00:00:00Z"));
        first.anchor_day = Some(15);
        first.seats = Some(5);
        let created = first.apply(None, now).unwrap();
        let mut expected = Customer::new("acme", "free");
        expected.valid_from = first.starts_at;
        expected.valid_until = first.ends_at;
        expected.anchor_day = 15;
        expected.seats = Some(5);
        assert_eq!(created, expected);

        // An upgrade keeps everything else; repeating the start is allowed.
        let mut with_pack = created.clone();
        with_pack.addons.push(AddOnRef {
            id: "pack".to_owned(),
            quantity: 2,
        });
        let mut upgrade = order(plan("pro"));
        upgrade.starts_at = first.starts_at;
        let upgraded = upgrade.apply(Some(&with_pack), now).unwrap();
        assert_eq!(upgraded.plan, "pro");
        assert_eq!(upgraded.addons, with_pack.addons);
        assert_eq!(upgraded.valid_until, first.ends_at);

        // Moving the start of a running subscription is refused, naming the field.
        upgrade.starts_at = Some(utc("2026-12-01T00:00:00Z"));
        upgrade.quantity = 3;
        assert_eq!(
            fields(upgrade.apply(Some(&with_pack), now).unwrap_err()),
            ["quantity", "starts_at"]
        );
    }

    #[test]
    fn a_plan_order_on_an_ended_customer_starts_a_new_term_without_the_old_add_ons() {
        let mut ended = Customer::new("acme", "free");
        ended.valid_from = Some(utc("2025-01-01T00:00:00Z"));
        ended.valid_until = Some(utc("2026-01-01T00:00:00Z"));
        ended.addons.push(AddOnRef {
            id: "pack".to_owned(),
            quantity: 2,
        });
        ended.status = Status::Suspended;
        let renewed = order(plan("pro")).apply(Some(&ended), utc(NOW)).unwrap();
        assert_eq!(renewed.plan, "pro");
        assert_eq!(renewed.valid_from, Some(utc(NOW)));
        assert_eq!(renewed.valid_until, None);
        assert!(renewed.addons.is_empty());
        // Suspension is lifted by resuming, not by an order.
        assert_eq!(renewed.status, Status::Suspended);
    }

    #[test]
    fn an_add_on_order_adds_units_to_an_existing_customer() {
        let now = utc(NOW);
        let customer = Customer::new("acme", "free");
        let mut buy = order(pack(5));
        buy.quantity = 2;
        let once = buy.apply(Some(&customer), now).unwrap();
        assert_eq!(
            once.addons,
            [AddOnRef {
                id: "pack".to_owned(),
                quantity: 10
            }]
        );
        let twice = buy.apply(Some(&once), now).unwrap();
        assert_eq!(twice.addons[0].quantity, 20);
        assert_eq!(twice.plan, "free");

        // No customer, no add-on.
        assert_eq!(fields(buy.apply(None, now).unwrap_err()), ["customer"]);
        // Dates are the plan's: an add-on order may repeat them, not change them.
        buy.anchor_day = Some(1);
        assert!(buy.apply(Some(&customer), now).is_ok());
        buy.anchor_day = Some(9);
        buy.ends_at = Some(utc("2027-01-01T00:00:00Z"));
        assert_eq!(
            fields(buy.apply(Some(&customer), now).unwrap_err()),
            ["ends_at", "anchor_day"]
        );
        // Overflowing units are refused, not wrapped.
        let mut huge = order(pack(u32::MAX));
        huge.quantity = 2;
        assert_eq!(
            fields(huge.apply(Some(&customer), now).unwrap_err()),
            ["quantity"]
        );
        let mut full = customer.clone();
        full.addons.push(AddOnRef {
            id: "pack".to_owned(),
            quantity: u32::MAX,
        });
        assert_eq!(
            fields(order(pack(1)).apply(Some(&full), now).unwrap_err()),
            ["quantity"]
        );
    }

    #[test]
    fn an_order_s_flaws_are_named_by_the_order_s_fields() {
        let now = utc(NOW);
        let mut bad = order(plan("free"));
        bad.customer = String::new();
        bad.quantity = 0;
        bad.anchor_day = Some(32);
        bad.starts_at = Some(utc("2027-01-01T00:00:00Z"));
        bad.ends_at = Some(utc("2026-01-01T00:00:00Z"));
        assert_eq!(
            fields(bad.apply(None, now).unwrap_err()),
            ["quantity", "customer", "anchor_day", "ends_at"]
        );
        let mut current = Customer::new("acme", "free");
        current.valid_until = Some(utc("2027-01-01T00:00:00Z"));
        current.valid_from = Some(utc("2026-12-01T00:00:00Z"));
        // An end before the stored start, set by this order: ends_at is at fault.
        let mut early = order(plan("free"));
        early.ends_at = Some(utc("2026-11-15T00:00:00Z"));
        assert_eq!(
            fields(early.apply(Some(&current), now).unwrap_err()),
            ["ends_at"]
        );
    }
}
