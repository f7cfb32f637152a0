//! The decision recorded with every event.

use std::fmt;

/// What Tally decided about one usage event. Stored in the lake as its snake_case name.
///
/// Only `accepted` and `overage` are billable. Rejections are kept in the lake for audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Within the entitlement; counted and billed.
    Accepted,
    /// A soft limit was passed; counted and billed at the overage price.
    Overage,
    /// A hard limit would be crossed; not counted, not billed.
    LimitReached,
    /// The customer's plan does not include the feature.
    NotEntitled,
    /// Outside the entitlement's validity, or the customer is suspended.
    Expired,
    /// The event's region is outside the customer's allowed regions.
    RegionBlocked,
    /// No entitlement exists for the customer.
    UnknownCustomer,
    /// A new distinct user beyond the customer's seats.
    SeatLimit,
    /// Older than the open usage period of its counter: stored, not counted, and billed
    /// apart from the period's lines.
    Late,
}

impl Decision {
    /// Every decision, in a stable order.
    pub const ALL: [Decision; 9] = [
        Decision::Accepted,
        Decision::Overage,
        Decision::LimitReached,
        Decision::NotEntitled,
        Decision::Expired,
        Decision::RegionBlocked,
        Decision::UnknownCustomer,
        Decision::SeatLimit,
        Decision::Late,
    ];

    /// The name stored in the lake and used in queries.
    pub const fn as_str(self) -> &'static str {
        match self {
            Decision::Accepted => "accepted",
            Decision::Overage => "overage",
            Decision::LimitReached => "limit_reached",
            Decision::NotEntitled => "not_entitled",
            Decision::Expired => "expired",
            Decision::RegionBlocked => "region_blocked",
            Decision::UnknownCustomer => "unknown_customer",
            Decision::SeatLimit => "seat_limit",
            Decision::Late => "late",
        }
    }

    /// The decision stored under `name` in the lake.
    pub fn parse(name: &str) -> Option<Decision> {
        Decision::ALL.into_iter().find(|d| d.as_str() == name)
    }

    /// Whether events with this decision appear on a bill.
    pub const fn is_billable(self) -> bool {
        matches!(self, Decision::Accepted | Decision::Overage)
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_accepted_and_overage_bill() {
        let billable: Vec<_> = Decision::ALL.iter().filter(|d| d.is_billable()).collect();
        assert_eq!(billable, [&Decision::Accepted, &Decision::Overage]);
    }

    #[test]
    fn names_parse_back() {
        for d in Decision::ALL {
            assert_eq!(Decision::parse(d.as_str()), Some(d));
        }
        assert_eq!(Decision::parse("nonsense"), None);
    }
}
