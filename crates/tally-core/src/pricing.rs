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

/// Rounds an amount to the currency's minor unit, half away from zero.
pub fn round_money(amount: Decimal, currency: &str) -> Decimal {
    amount.round_dp_with_strategy(
        minor_digits(currency),
        RoundingStrategy::MidpointAwayFromZero,
    )
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
}
