//! Usage periods in UTC.
//!
//! Times are microseconds since the Unix epoch, as in the lake. A period is a half-open
//! interval `[start, end)`. Nothing here reads a clock: the quota engine decides an event
//! by the event's own time, so tests cross periods by sending times, never by sleeping.

use chrono::{DateTime, Datelike, Months, NaiveDate, Utc};

use crate::entitlement::UsagePeriod;

const HOUR_US: i64 = 3_600_000_000;
const DAY_US: i64 = 24 * HOUR_US;

/// The period of kind `period` that holds `t`. `anchor_day` (1–31) only matters for
/// [`UsagePeriod::Billing`]: such a period starts at 00:00 on that day of the month, or
/// on the month's last day when the month is shorter.
pub fn bounds(period: UsagePeriod, anchor_day: u8, t: i64) -> (i64, i64) {
    match period {
        UsagePeriod::Hour => {
            let start = t.div_euclid(HOUR_US) * HOUR_US;
            (start, start + HOUR_US)
        }
        UsagePeriod::Day => {
            let start = t.div_euclid(DAY_US) * DAY_US;
            (start, start + DAY_US)
        }
        UsagePeriod::Month => month_bounds(1, t),
        UsagePeriod::Billing => month_bounds(anchor_day, t),
    }
}

fn month_bounds(anchor_day: u8, t: i64) -> (i64, i64) {
    let Some(time) = DateTime::<Utc>::from_timestamp_micros(t) else {
        return (t, t.saturating_add(1));
    };
    let date = time.date_naive();
    let this_month = NaiveDate::from_ymd_opt(date.year(), date.month(), 1).unwrap_or(date);
    let start_in = |first: NaiveDate| anchored(first, anchor_day);
    let mut start = start_in(this_month);
    if start > date {
        start = start_in(this_month - Months::new(1));
    }
    let first_of_start = NaiveDate::from_ymd_opt(start.year(), start.month(), 1).unwrap_or(start);
    let end = start_in(first_of_start + Months::new(1));
    (micros(start), micros(end))
}

/// The anchor day within the month that starts on `first`, clamped to the month's end.
fn anchored(first: NaiveDate, anchor_day: u8) -> NaiveDate {
    let next = first + Months::new(1);
    let days = next.signed_duration_since(first).num_days() as u32;
    let day = u32::from(anchor_day).clamp(1, days);
    first.with_day(day).unwrap_or(first)
}

fn micros(date: NaiveDate) -> i64 {
    date.and_hms_opt(0, 0, 0)
        .map_or(0, |t| t.and_utc().timestamp_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_micros()
    }

    #[test]
    fn hours_days_and_calendar_months() {
        let t = at("2026-11-28T13:45:10Z");
        assert_eq!(
            bounds(UsagePeriod::Hour, 1, t),
            (at("2026-11-28T13:00:00Z"), at("2026-11-28T14:00:00Z"))
        );
        assert_eq!(
            bounds(UsagePeriod::Day, 1, t),
            (at("2026-11-28T00:00:00Z"), at("2026-11-29T00:00:00Z"))
        );
        assert_eq!(
            bounds(UsagePeriod::Month, 15, t),
            (at("2026-11-01T00:00:00Z"), at("2026-12-01T00:00:00Z"))
        );
        let dec = at("2026-12-31T23:59:59.999999Z");
        assert_eq!(
            bounds(UsagePeriod::Month, 1, dec),
            (at("2026-12-01T00:00:00Z"), at("2027-01-01T00:00:00Z"))
        );
        // Before the epoch, periods still start on their boundary.
        assert_eq!(bounds(UsagePeriod::Hour, 1, -1).0, -HOUR_US);
    }

    #[test]
    fn billing_periods_start_on_the_anchor_day_clamped_to_short_months() {
        let b = |anchor, t| bounds(UsagePeriod::Billing, anchor, at(t));
        assert_eq!(
            b(15, "2026-11-28T10:00:00Z"),
            (at("2026-11-15T00:00:00Z"), at("2026-12-15T00:00:00Z"))
        );
        assert_eq!(
            b(15, "2026-11-14T23:59:59Z"),
            (at("2026-10-15T00:00:00Z"), at("2026-11-15T00:00:00Z"))
        );
        // Anchored on the 31st: February's period starts on the 28th, March's on the 31st.
        assert_eq!(
            b(31, "2027-03-01T00:00:00Z"),
            (at("2027-02-28T00:00:00Z"), at("2027-03-31T00:00:00Z"))
        );
        assert_eq!(
            b(31, "2027-01-31T00:00:00Z"),
            (at("2027-01-31T00:00:00Z"), at("2027-02-28T00:00:00Z"))
        );
        assert_eq!(
            b(30, "2028-02-29T12:00:00Z"),
            (at("2028-02-29T00:00:00Z"), at("2028-03-30T00:00:00Z"))
        );
    }
}
