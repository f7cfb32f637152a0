//! Prices and rating: what a plan charges for a billing period, computed exactly.
//!
//! Money is [`Decimal`] (96-bit integer with a decimal scale), never floating point:
//! prices are written as strings in definitions (`unit_price = "0.0004"`), so they stay
//! exactly what was typed. A line's amount is rounded once, to the currency's minor unit
//! (half away from zero, as invoices do), after the whole line is computed; tiers and
//! packages are computed on unrounded values.
//!
//! The price models of a metered feature, each after the feature's `included` quantity:
//!
//! - `per_unit`: quantity × `unit_price`.
//! - `package`: `package_price` per started `package_size` units (rounded up).
//! - `graduated`: each unit at the price of the tier it falls in, plus each reached
//!   tier's `flat_price` (Stripe's and Lago's "graduated").
//! - `volume`: every unit at the price of the tier the whole quantity falls in, plus that
//!   tier's `flat_price`.
//!
//! Tier bounds are inclusive upper bounds on the quantity after `included`; the last tier
//! has no bound. Usage decided `overage` (past a soft limit) is charged at
//! `overage_unit_price` when the feature has one; otherwise it continues the model.

use std::collections::BTreeMap;

use rust_decimal::prelude::*;
use serde::{Deserialize, Serialize};

pub use rust_decimal::Decimal;

/// What a plan charges per billing period, in one currency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanPrices {
    /// ISO 4217 code: `USD`, `EUR`, `JPY`, …
    pub currency: String,
    /// Charged once per period.
    #[serde(default, with = "rust_decimal::serde::str")]
    pub flat_fee: Decimal,
    /// The least a customer on the plan pays for a period, fees and usage together; the
    /// difference is a line of its own.
    #[serde(default, with = "rust_decimal::serde::str")]
    pub minimum: Decimal,
    /// Prices of metered features; a metered feature without one is not charged.
    #[serde(default)]
    pub features: BTreeMap<String, FeaturePrice>,
}

/// The price of one metered feature. (Unknown fields are refused by the model, which
/// receives every field not named here: serde cannot refuse them at this level.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeaturePrice {
    /// Quantity per period charged nothing.
    #[serde(default, with = "rust_decimal::serde::str")]
    pub included: Decimal,
    #[serde(flatten)]
    pub model: PriceModel,
    /// Price per unit of usage decided `overage`; without it, overage continues the model.
    #[serde(
        default,
        with = "rust_decimal::serde::str_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub overage_unit_price: Option<Decimal>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "snake_case", deny_unknown_fields)]
pub enum PriceModel {
    PerUnit {
        #[serde(with = "rust_decimal::serde::str")]
        unit_price: Decimal,
    },
    Package {
        #[serde(with = "rust_decimal::serde::str")]
        package_size: Decimal,
        #[serde(with = "rust_decimal::serde::str")]
        package_price: Decimal,
    },
    Graduated {
        tiers: Vec<Tier>,
    },
    Volume {
        tiers: Vec<Tier>,
    },
}

/// A price tier: up to `up_to` units (inclusive; `None`: no bound).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    #[serde(
        default,
        with = "rust_decimal::serde::str_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub up_to: Option<Decimal>,
    #[serde(with = "rust_decimal::serde::str")]
    pub unit_price: Decimal,
    #[serde(default, with = "rust_decimal::serde::str")]
    pub flat_price: Decimal,
}

/// What an add-on charges per period for each unit bought, in its plan's currency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddOnPrice {
    #[serde(with = "rust_decimal::serde::str")]
    pub fee: Decimal,
}

/// A price definition that cannot be rated, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PriceError {
    pub field: String,
    pub message: String,
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> PriceError {
    PriceError {
        field: field.into(),
        message: message.into(),
    }
}

impl PlanPrices {
    /// Checks what rating relies on: a three-letter currency, no negative amount, tiers
    /// in ascending order ending unbounded, packages of a positive size.
    pub fn validate(&self) -> Result<(), PriceError> {
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(bad(
                "currency",
                format!("{:?} is not an ISO 4217 code such as USD", self.currency),
            ));
        }
        non_negative("flat_fee", self.flat_fee)?;
        non_negative("minimum", self.minimum)?;
        for (feature, price) in &self.features {
            price.validate(&format!("features.{feature}"))?;
        }
        Ok(())
    }

    /// Digits after the decimal point of the currency's minor unit.
    pub fn minor_digits(&self) -> u32 {
        minor_digits(&self.currency)
    }
}

impl FeaturePrice {
    fn validate(&self, at: &str) -> Result<(), PriceError> {
        non_negative(&format!("{at}.included"), self.included)?;
        if let Some(p) = self.overage_unit_price {
            non_negative(&format!("{at}.overage_unit_price"), p)?;
        }
        match &self.model {
            PriceModel::PerUnit { unit_price } => {
                non_negative(&format!("{at}.unit_price"), *unit_price)
            }
            PriceModel::Package {
                package_size,
                package_price,
            } => {
                if *package_size <= Decimal::ZERO {
                    return Err(bad(format!("{at}.package_size"), "must be above zero"));
                }
                non_negative(&format!("{at}.package_price"), *package_price)
            }
            PriceModel::Graduated { tiers } | PriceModel::Volume { tiers } => {
                validate_tiers(&format!("{at}.tiers"), tiers)
            }
        }
    }

    /// Rates a period's usage of the feature: `quantity` decided within the limit
    /// (`accepted`), `overage` decided past a soft limit.
    pub fn rate(&self, quantity: Decimal, overage: Decimal) -> Rated {
        let total = quantity + overage;
        let included_used = total.min(self.included);
        let (model_quantity, overage_amount) = match self.overage_unit_price {
            // The included quantity is used by the accepted usage first.
            Some(price) => {
                let over_included = (self.included - quantity).max(Decimal::ZERO);
                let overage_charged = (overage - over_included).max(Decimal::ZERO);
                (
                    (quantity - self.included).max(Decimal::ZERO),
                    overage_charged * price,
                )
            }
            None => (total - included_used, Decimal::ZERO),
        };
        let mut tiers = Vec::new();
        let model_amount = self.model.amount(model_quantity, &mut tiers);
        Rated {
            quantity: total,
            included: included_used,
            charged: total - included_used,
            amount: model_amount + overage_amount,
            tiers,
        }
    }
}

impl PriceModel {
    /// The amount for `q` units (after the included quantity), unrounded, with the
    /// breakdown of tiered models.
    fn amount(&self, q: Decimal, breakdown: &mut Vec<TierCharge>) -> Decimal {
        if q <= Decimal::ZERO {
            return Decimal::ZERO;
        }
        match self {
            PriceModel::PerUnit { unit_price } => q * unit_price,
            PriceModel::Package {
                package_size,
                package_price,
            } => (q / package_size).ceil() * package_price,
            PriceModel::Graduated { tiers } => {
                let mut from = Decimal::ZERO;
                let mut amount = Decimal::ZERO;
                for tier in tiers {
                    if q <= from {
                        break;
                    }
                    let to = tier.up_to.map_or(q, |u| u.min(q));
                    let units = to - from;
                    let charge = units * tier.unit_price + tier.flat_price;
                    breakdown.push(TierCharge {
                        from,
                        to,
                        quantity: units,
                        unit_price: tier.unit_price,
                        flat_price: tier.flat_price,
                        amount: charge,
                    });
                    amount += charge;
                    from = to;
                }
                amount
            }
            PriceModel::Volume { tiers } => {
                let Some(tier) = tiers
                    .iter()
                    .find(|t| t.up_to.is_none_or(|u| q <= u))
                    .or(tiers.last())
                else {
                    return Decimal::ZERO;
                };
                let charge = q * tier.unit_price + tier.flat_price;
                breakdown.push(TierCharge {
                    from: Decimal::ZERO,
                    to: q,
                    quantity: q,
                    unit_price: tier.unit_price,
                    flat_price: tier.flat_price,
                    amount: charge,
                });
                charge
            }
        }
    }
}

/// One feature's usage for a period, rated (amounts unrounded: see [`round_money`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Rated {
    /// Everything billable: accepted and overage.
    pub quantity: Decimal,
    /// The part of the included quantity used.
    pub included: Decimal,
    /// `quantity` past the included quantity.
    pub charged: Decimal,
    pub amount: Decimal,
    /// The tiers a graduated or volume price used.
    pub tiers: Vec<TierCharge>,
}

/// What one tier charged.
#[derive(Debug, Clone, PartialEq)]
pub struct TierCharge {
    pub from: Decimal,
    pub to: Decimal,
    pub quantity: Decimal,
    pub unit_price: Decimal,
    pub flat_price: Decimal,
    pub amount: Decimal,
}

/// A customer's billable usage of one feature in a period, under the plan that decided
/// it (the lake records the plan in force with every event).
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    pub plan: String,
    pub feature: String,
    /// Events decided `accepted` and `overage`.
    pub events: u64,
    /// Quantity decided `accepted`.
    pub accepted: Decimal,
    /// Quantity decided `overage` (past a soft limit).
    pub overage: Decimal,
}

/// What a line of an invoice is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    /// A metered feature's usage under one plan.
    Usage,
    /// A plan's fee for the period.
    FlatFee,
    /// An add-on's fee for the period (per unit bought).
    AddOn,
    /// What brings the total up to the plan's minimum.
    Minimum,
}

/// One line of an invoice; `amount` is rounded to the currency's minor unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub kind: LineKind,
    pub plan: String,
    /// The feature, or the add-on, or empty for a plan's fee and the minimum.
    pub item: String,
    pub events: u64,
    pub quantity: Decimal,
    pub included: Decimal,
    pub charged: Decimal,
    /// The price of one unit where the model has one (per unit, package, a single tier).
    pub unit_price: Option<Decimal>,
    pub tiers: Vec<TierCharge>,
    pub amount: Decimal,
}

/// A customer's bill for a period.
#[derive(Debug, Clone, PartialEq)]
pub struct Invoice {
    pub customer: String,
    /// `None` when no plan involved has prices (usage is listed, at no charge).
    pub currency: Option<String>,
    pub lines: Vec<Line>,
    /// The lines before the minimum.
    pub subtotal: Decimal,
    pub total: Decimal,
}

/// Bills one customer for a period.
///
/// - Each usage line is rated with the prices of the plan that decided it, so a plan
///   change inside the period splits a feature's usage between the plans by when each
///   event happened, each part with its own included quantity and tiers.
/// - The fee of the customer's plan at billing time is charged once, in full, and so is
///   each add-on's fee times the units held at billing time; the minimum is that plan's.
/// - A feature that its plan does not price is listed at no charge.
///
/// Every plan involved must charge in one currency.
pub fn invoice(
    customer: &crate::entitlement::Customer,
    usage: &[Usage],
    plans: &BTreeMap<String, crate::entitlement::Plan>,
    addons: &BTreeMap<String, crate::entitlement::AddOn>,
) -> Result<Invoice, PriceError> {
    let prices_of = |plan: &str| plans.get(plan).and_then(|p| p.prices.as_ref());
    let mut currency: Option<String> = None;
    let mut agree = |prices: &PlanPrices, plan: &str| -> Result<(), PriceError> {
        match &currency {
            Some(c) if *c != prices.currency => Err(bad(
                format!("plans.{plan}.prices.currency"),
                format!(
                    "{} differs from {c}: one invoice has one currency",
                    prices.currency
                ),
            )),
            Some(_) => Ok(()),
            None => {
                currency = Some(prices.currency.clone());
                Ok(())
            }
        }
    };
    let current = prices_of(&customer.plan);
    if let Some(p) = current {
        agree(p, &customer.plan)?;
    }
    for u in usage {
        if let Some(p) = prices_of(&u.plan) {
            agree(p, &u.plan)?;
        }
    }
    let code = currency.clone().unwrap_or_default();
    let round = |amount: Decimal| round_money(amount, &code);
    let mut lines = Vec::new();
    for u in usage {
        let price = prices_of(&u.plan).and_then(|p| p.features.get(&u.feature));
        let (rated, unit_price) = match price {
            Some(price) => (price.rate(u.accepted, u.overage), price.model.unit_price()),
            None => (
                Rated {
                    quantity: u.accepted + u.overage,
                    included: Decimal::ZERO,
                    charged: Decimal::ZERO,
                    amount: Decimal::ZERO,
                    tiers: Vec::new(),
                },
                None,
            ),
        };
        lines.push(Line {
            kind: LineKind::Usage,
            plan: u.plan.clone(),
            item: u.feature.clone(),
            events: u.events,
            quantity: rated.quantity,
            included: rated.included,
            charged: rated.charged,
            unit_price,
            tiers: rated.tiers,
            amount: round(rated.amount),
        });
    }
    let fee_line = |kind, plan: &str, item: &str, quantity: Decimal, unit: Decimal| Line {
        kind,
        plan: plan.to_owned(),
        item: item.to_owned(),
        events: 0,
        quantity,
        included: Decimal::ZERO,
        charged: quantity,
        unit_price: Some(unit),
        tiers: Vec::new(),
        amount: round(quantity * unit),
    };
    if let Some(p) = current
        && p.flat_fee > Decimal::ZERO
    {
        lines.push(fee_line(
            LineKind::FlatFee,
            &customer.plan,
            "",
            Decimal::ONE,
            p.flat_fee,
        ));
    }
    for held in &customer.addons {
        if let Some(price) = addons.get(&held.id).and_then(|a| a.price.as_ref()) {
            if currency.is_none() {
                return Err(bad(
                    format!("addons.{}.price", held.id),
                    "an add-on fee needs the customer's plan to have prices (its currency)",
                ));
            }
            lines.push(fee_line(
                LineKind::AddOn,
                &customer.plan,
                &held.id,
                Decimal::from(held.quantity),
                price.fee,
            ));
        }
    }
    let subtotal: Decimal = lines.iter().map(|l| l.amount).sum();
    let mut total = subtotal;
    if let Some(p) = current
        && subtotal < p.minimum
    {
        let top_up = round(p.minimum - subtotal);
        lines.push(Line {
            kind: LineKind::Minimum,
            plan: customer.plan.clone(),
            item: String::new(),
            events: 0,
            quantity: Decimal::ONE,
            included: Decimal::ZERO,
            charged: Decimal::ONE,
            unit_price: None,
            tiers: Vec::new(),
            amount: top_up,
        });
        total += top_up;
    }
    Ok(Invoice {
        customer: customer.id.clone(),
        currency,
        lines,
        subtotal,
        total,
    })
}

impl PriceModel {
    /// The price of one unit, where the model has a single one.
    pub fn unit_price(&self) -> Option<Decimal> {
        match self {
            PriceModel::PerUnit { unit_price } => Some(*unit_price),
            PriceModel::Package {
                package_size,
                package_price,
            } => Some(package_price / package_size),
            PriceModel::Graduated { .. } | PriceModel::Volume { .. } => None,
        }
    }
}

/// Rounds an amount to the currency's minor unit, half away from zero.
pub fn round_money(amount: Decimal, currency: &str) -> Decimal {
    amount.round_dp_with_strategy(
        minor_digits(currency),
        RoundingStrategy::MidpointAwayFromZero,
    )
}

/// An amount written with the currency's digits (`4.6` → `4.60`; two without a
/// currency).
pub fn format_money(amount: Decimal, currency: Option<&str>) -> String {
    let mut a = amount;
    a.rescale(currency.map_or(2, minor_digits));
    a.to_string()
}

/// Digits of the minor unit (ISO 4217): 0 for JPY, KRW and the like, 3 for BHD, JOD,
/// KWD, OMR and TND, 2 for the rest.
pub fn minor_digits(currency: &str) -> u32 {
    match currency {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "UYI" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        _ => 2,
    }
}

/// A quantity as it leaves the lake (a sum of `Float64`), exactly: every finite `f64` is
/// a binary fraction with a finite decimal expansion, and the conversion keeps all of it
/// that fits 28 digits. `None` for NaN or infinity.
pub fn quantity(q: f64) -> Option<Decimal> {
    Decimal::from_f64_retain(q).map(|d| d.normalize())
}

fn non_negative(field: &str, value: Decimal) -> Result<(), PriceError> {
    if value < Decimal::ZERO {
        return Err(bad(field, format!("{value} is below zero")));
    }
    Ok(())
}

fn validate_tiers(at: &str, tiers: &[Tier]) -> Result<(), PriceError> {
    let Some(last) = tiers.last() else {
        return Err(bad(at, "at least one tier is needed"));
    };
    if last.up_to.is_some() {
        return Err(bad(
            at,
            "the last tier must have no `up_to`: usage past it would have no price",
        ));
    }
    let mut below = Decimal::ZERO;
    for (i, tier) in tiers.iter().enumerate() {
        non_negative(&format!("{at}[{i}].unit_price"), tier.unit_price)?;
        non_negative(&format!("{at}[{i}].flat_price"), tier.flat_price)?;
        match tier.up_to {
            Some(u) if u <= below => {
                return Err(bad(
                    format!("{at}[{i}].up_to"),
                    format!("{u} must be above the tier before ({below})"),
                ));
            }
            Some(u) => below = u,
            None if i + 1 < tiers.len() => {
                return Err(bad(
                    format!("{at}[{i}].up_to"),
                    "only the last tier may be unbounded",
                ));
            }
            None => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn price(toml_text: &str) -> FeaturePrice {
        let p: FeaturePrice = toml::from_str(toml_text).unwrap();
        p.validate("f").unwrap();
        p
    }

    #[test]
    fn per_unit_after_the_included_quantity() {
        let p = price("included = \"1000\"\nmodel = \"per_unit\"\nunit_price = \"0.0004\"\n");
        let r = p.rate(d("12500"), Decimal::ZERO);
        assert_eq!(
            (r.quantity, r.included, r.charged),
            (d("12500"), d("1000"), d("11500"))
        );
        assert_eq!(r.amount, d("4.6"));
        // Below the included quantity nothing is charged.
        assert_eq!(p.rate(d("999"), Decimal::ZERO).amount, Decimal::ZERO);
    }

    #[test]
    fn packages_are_charged_per_started_package() {
        let p = price("model = \"package\"\npackage_size = \"100\"\npackage_price = \"2.50\"\n");
        assert_eq!(p.rate(d("1"), Decimal::ZERO).amount, d("2.50"));
        assert_eq!(p.rate(d("100"), Decimal::ZERO).amount, d("2.50"));
        assert_eq!(p.rate(d("101"), Decimal::ZERO).amount, d("5.00"));
        assert_eq!(p.rate(d("0"), Decimal::ZERO).amount, Decimal::ZERO);
    }

    const TIERS: &str = r#"
        [[tiers]]
        up_to = "1000"
        unit_price = "0.10"
        [[tiers]]
        up_to = "5000"
        unit_price = "0.08"
        flat_price = "5"
        [[tiers]]
        unit_price = "0.05"
    "#;

    #[test]
    fn graduated_tiers_price_each_unit_by_its_tier() {
        let p = price(&format!("model = \"graduated\"\n{TIERS}"));
        // 1000 × 0.10 + (4000 × 0.08 + 5) + 1000 × 0.05 = 100 + 325 + 50.
        let r = p.rate(d("6000"), Decimal::ZERO);
        assert_eq!(r.amount, d("475"));
        let per_tier: Vec<(Decimal, Decimal)> =
            r.tiers.iter().map(|t| (t.quantity, t.amount)).collect();
        assert_eq!(
            per_tier,
            [
                (d("1000"), d("100")),
                (d("4000"), d("325")),
                (d("1000"), d("50"))
            ]
        );
        // Within the first tier, only it.
        assert_eq!(p.rate(d("10"), Decimal::ZERO).tiers.len(), 1);
    }

    #[test]
    fn volume_tiers_price_every_unit_by_the_tier_of_the_total() {
        let p = price(&format!("model = \"volume\"\n{TIERS}"));
        assert_eq!(p.rate(d("1000"), Decimal::ZERO).amount, d("100"));
        // 1001 units fall in the second tier: all at 0.08, plus its flat price.
        assert_eq!(p.rate(d("1001"), Decimal::ZERO).amount, d("85.08"));
        assert_eq!(p.rate(d("6000"), Decimal::ZERO).amount, d("300"));
    }

    #[test]
    fn overage_is_charged_at_its_own_price_after_the_included_quantity() {
        let p = price(
            "included = \"100\"\nmodel = \"per_unit\"\nunit_price = \"1\"\noverage_unit_price = \"3\"\n",
        );
        // 150 accepted: 50 charged at 1; 20 overage at 3.
        assert_eq!(p.rate(d("150"), d("20")).amount, d("110"));
        // 80 accepted leave 20 included for the overage: 10 of 30 are charged at 3.
        assert_eq!(p.rate(d("80"), d("30")).amount, d("30"));
        // Without an overage price, overage continues the model.
        let q = price("model = \"per_unit\"\nunit_price = \"1\"\n");
        assert_eq!(q.rate(d("150"), d("20")).amount, d("170"));
    }

    #[test]
    fn amounts_round_once_to_the_minor_unit_half_away_from_zero() {
        assert_eq!(round_money(d("4.605"), "USD"), d("4.61"));
        assert_eq!(round_money(d("4.6049"), "USD"), d("4.60"));
        assert_eq!(round_money(d("10.5"), "JPY"), d("11"));
        assert_eq!(round_money(d("1.2345"), "KWD"), d("1.235"));
    }

    #[test]
    fn quantities_from_the_lake_convert_exactly() {
        assert_eq!(quantity(12_500.0), Some(d("12500")));
        assert_eq!(quantity(0.5), Some(d("0.5")));
        assert_eq!(quantity(f64::NAN), None);
    }

    #[test]
    fn a_price_that_cannot_be_rated_is_refused_naming_the_field() {
        let plan = |features: &str| -> Result<(), PriceError> {
            let p: PlanPrices = toml::from_str(&format!("currency = \"USD\"\n{features}")).unwrap();
            p.validate()
        };
        let err = plan("[features.a]\nmodel = \"graduated\"\n[[features.a.tiers]]\nup_to = \"10\"\nunit_price = \"1\"\n")
            .unwrap_err();
        assert_eq!(err.field, "features.a.tiers");
        let err = plan("[features.a]\nmodel = \"volume\"\n[[features.a.tiers]]\nup_to = \"10\"\nunit_price = \"1\"\n[[features.a.tiers]]\nup_to = \"5\"\nunit_price = \"1\"\n[[features.a.tiers]]\nunit_price = \"1\"\n")
            .unwrap_err();
        assert_eq!(err.field, "features.a.tiers[1].up_to");
        let err = plan(
            "[features.a]\nmodel = \"package\"\npackage_size = \"0\"\npackage_price = \"1\"\n",
        )
        .unwrap_err();
        assert_eq!(err.field, "features.a.package_size");
        let err = plan("flat_fee = \"-1\"\n").unwrap_err();
        assert_eq!(err.field, "flat_fee");
        let bad_currency: PlanPrices = toml::from_str("currency = \"dollars\"\n").unwrap();
        assert_eq!(bad_currency.validate().unwrap_err().field, "currency");
        // A price written as a float is refused: it may not be what was typed.
        assert!(
            toml::from_str::<FeaturePrice>("model = \"per_unit\"\nunit_price = 0.1\n").is_err()
        );
        // So is a misspelt field.
        let typo = toml::from_str::<FeaturePrice>(
            "model = \"per_unit\"\nunit_price = \"1\"\nincluded_qty = \"5\"\n",
        );
        assert!(typo.unwrap_err().to_string().contains("included_qty"));
    }

    fn catalogue() -> crate::entitlement::Catalog {
        toml::from_str(
            r#"
            [[plans]]
            id = "pro"
            name = "Pro"
            [plans.features.calls]
            kind = "metered"
            [plans.features.mails]
            kind = "metered"
            [plans.prices]
            currency = "EUR"
            flat_fee = "49"
            minimum = "100"
            [plans.prices.features.calls]
            included = "1000"
            model = "per_unit"
            unit_price = "0.01"

            [[plans]]
            id = "free"
            name = "Free"
            [plans.features.calls]
            kind = "metered"
            [plans.prices]
            currency = "EUR"
            [plans.prices.features.calls]
            included = "500"
            model = "per_unit"
            unit_price = "0.02"

            [[plans]]
            id = "dollars"
            name = "Dollars"
            [plans.prices]
            currency = "USD"

            [[addons]]
            id = "seats"
            name = "Seats"
            price = { fee = "4.50" }
            "#,
        )
        .unwrap()
    }

    fn usage(plan: &str, feature: &str, accepted: &str, overage: &str) -> Usage {
        Usage {
            plan: plan.to_owned(),
            feature: feature.to_owned(),
            events: 1,
            accepted: d(accepted),
            overage: d(overage),
        }
    }

    #[test]
    fn an_invoice_rates_usage_by_the_plan_that_decided_it_and_adds_fees_and_the_minimum() {
        let c = catalogue();
        let plans = c.plans.iter().map(|p| (p.id.clone(), p.clone())).collect();
        let addons = c.addons.iter().map(|a| (a.id.clone(), a.clone())).collect();
        let mut customer = crate::entitlement::Customer::new("acme", "pro");
        customer.addons = vec![crate::entitlement::AddOnRef {
            id: "seats".to_owned(),
            quantity: 2,
        }];
        // An upgrade from free to pro inside the period: each part has its own included
        // quantity and price.
        let bill = invoice(
            &customer,
            &[
                usage("free", "calls", "700", "0"),
                usage("pro", "calls", "3000", "0"),
                usage("pro", "mails", "10", "0"),
            ],
            &plans,
            &addons,
        )
        .unwrap();
        let amounts: Vec<(LineKind, &str, &str, Decimal)> = bill
            .lines
            .iter()
            .map(|l| (l.kind, l.plan.as_str(), l.item.as_str(), l.amount))
            .collect();
        assert_eq!(
            amounts,
            [
                (LineKind::Usage, "free", "calls", d("4.00")),
                (LineKind::Usage, "pro", "calls", d("20.00")),
                (LineKind::Usage, "pro", "mails", d("0")),
                (LineKind::FlatFee, "pro", "", d("49")),
                (LineKind::AddOn, "pro", "seats", d("9.00")),
                (LineKind::Minimum, "pro", "", d("18.00")),
            ]
        );
        assert_eq!(bill.subtotal, d("82.00"));
        assert_eq!(bill.total, d("100.00"));
        assert_eq!(bill.currency.as_deref(), Some("EUR"));

        // Past the minimum there is no minimum line.
        let big = invoice(
            &customer,
            &[usage("pro", "calls", "10000", "0")],
            &plans,
            &addons,
        )
        .unwrap();
        assert!(big.lines.iter().all(|l| l.kind != LineKind::Minimum));
        assert_eq!(big.total, d("148.00"));

        // Two currencies on one invoice are refused, naming the plan.
        let err = invoice(
            &customer,
            &[usage("dollars", "calls", "1", "0")],
            &plans,
            &addons,
        )
        .unwrap_err();
        assert_eq!(err.field, "plans.dollars.prices.currency");
    }
}
