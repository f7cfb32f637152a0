//! The decision recorded with every event.

use std::fmt;

/// What Tally decided about one usage event. Stored in the lake as its snake_case name and
/// as its [code](Decision::code).
///
/// Only `accepted` and `overage` are billable. Rejections are kept in the lake for audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
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
    /// No entitlement exists for the customer, and such customers are metered
    /// (`ingest.meter_unknown_customers`): read by meters, counted by no limit, billed
    /// nowhere.
    Metered,
}

impl Decision {
    /// Every decision, in a stable order.
    pub const ALL: [Decision; 10] = [
        Decision::Accepted,
        Decision::Overage,
        Decision::LimitReached,
        Decision::NotEntitled,
        Decision::Expired,
        Decision::RegionBlocked,
        Decision::UnknownCustomer,
        Decision::SeatLimit,
        Decision::Late,
        Decision::Metered,
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
            Decision::Metered => "metered",
        }
    }

    /// The decision's number in the lake's `decision_code` column: its place in
    /// [`Decision::ALL`]. Stored in files, so a decision keeps its number for good: a new
    /// decision is added at the end. The billable decisions are exactly the codes below
    /// [`Decision::BILLABLE_CODES`].
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The decision stored as `code` in the lake.
    pub fn from_code(code: u8) -> Option<Decision> {
        Decision::ALL.get(usize::from(code)).copied()
    }

    /// Codes below this are the billable decisions (`accepted` 0, `overage` 1).
    pub const BILLABLE_CODES: u8 = 2;

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
    fn codes_are_places_in_all_and_the_billable_ones_come_first() {
        for (i, d) in Decision::ALL.into_iter().enumerate() {
            assert_eq!(usize::from(d.code()), i);
            assert_eq!(Decision::from_code(d.code()), Some(d));
            assert_eq!(d.is_billable(), d.code() < Decision::BILLABLE_CODES);
        }
        // Stored in files: these numbers never change.
        assert_eq!(Decision::Accepted.code(), 0);
        assert_eq!(Decision::Overage.code(), 1);
        assert_eq!(Decision::Late.code(), 8);
        assert_eq!(Decision::Metered.code(), 9);
        assert_eq!(Decision::from_code(10), None);
    }

    #[test]
    fn names_parse_back() {
        for d in Decision::ALL {
            assert_eq!(Decision::parse(d.as_str()), Some(d));
        }
        assert_eq!(Decision::parse("nonsense"), None);
    }
}
