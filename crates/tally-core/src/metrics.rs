//! The names of the metrics Tally exports (Prometheus, on the API's `GET /metrics`), in one
//! place: the libraries record them through the `metrics` facade, the binary installs the
//! recorder, the dashboards and `tests/compose.rs` read these names. Names only, no I/O.
//!
//! Labels are bounded: `decision` (the nine [`Decision`](crate::decision::Decision)s),
//! `reason` (the decoder's reasons), `kind` (notice kinds), `partition` (the stream's
//! partition count), `report` (billing, overage, adoption, sql), `route` (the router's
//! templates), `status`, and for the API's keys `reason` (the six [`AUTH_FAILURES`]
//! reasons) and `limit` (`requests`, `bytes`). Nothing is labelled by customer, feature or
//! key.

/// Counter: valid, first-seen events by `decision`, counted once per message.
pub const EVENTS: &str = "tally_events_total";
/// Counter: messages pulled from the events stream.
pub const MESSAGES: &str = "tally_messages_total";
/// Counter: events dropped as repeats of an event id already seen.
pub const DUPLICATES: &str = "tally_duplicates_total";
/// Counter: events refused whole and stored as dead letters, by `reason`.
pub const DEAD_LETTERS: &str = "tally_dead_letters_total";
/// Counter: notifications published (thresholds, limits reached, grants), by `kind`.
pub const NOTIFICATIONS: &str = "tally_notifications_total";
/// Histogram: rows per Parquet file written by a flush.
pub const FLUSH_ROWS: &str = "tally_flush_rows";
/// Histogram: seconds to write a sealed batch to the lake (encode, fsync, rename).
pub const FLUSH_SECONDS: &str = "tally_flush_seconds";
/// Counter: failed attempts to write a batch to the lake (each is retried).
pub const LAKE_WRITE_FAILURES: &str = "tally_lake_write_failures_total";
/// Counter: rows in batches durable in the lake and acknowledged.
pub const ROWS_DURABLE: &str = "tally_rows_durable_total";
/// Counter: batches acknowledged after the lake reported them durable.
pub const BATCHES_ACKED: &str = "tally_batches_acked_total";
/// Histogram: seconds from JetStream storing a message to its ack after the durable write.
pub const STORED_TO_DURABLE_SECONDS: &str = "tally_stored_to_durable_seconds";
/// Gauge: messages of a `partition`'s consumer not yet acknowledged or not yet delivered
/// (sampled every few seconds by the worker owning the partition; 0 where it owns none).
pub const CONSUMER_PENDING: &str = "tally_consumer_pending";
/// Gauge: partitions whose lease this worker holds and runs.
pub const PARTITIONS_OWNED: &str = "tally_partitions_owned";
/// Counter: partitions taken over from the lake (at start, after a failure, from another worker).
pub const TAKEOVERS: &str = "tally_takeovers_total";
/// Counter: times a partition found deliveries lost on the way to it (a dropped
/// connection, a slow consumer cut off) and pulled again from its ack floor.
pub const DELIVERY_GAPS: &str = "tally_delivery_gaps_total";
/// Gauge: 1 while the process's NATS connection is up, 0 otherwise.
pub const NATS_CONNECTED: &str = "tally_nats_connected";
/// Histogram: seconds to answer an entitlement check (the API's check routes), by `kind`
/// (`one` feature or the `list`) and `outcome` (`answered`, `failed`).
pub const CHECK_SECONDS: &str = "tally_check_seconds";
/// Histogram: seconds to answer a report, by `report` (billing, overage, adoption, sql).
pub const QUERY_SECONDS: &str = "tally_query_seconds";
/// Counter: reports that failed (an error status), by `report`.
pub const QUERY_FAILURES: &str = "tally_query_failures_total";
/// Counter: HTTP requests answered, by `route` (the router's template) and `status`.
pub const HTTP_REQUESTS: &str = "tally_http_requests_total";
/// Histogram: seconds to answer an HTTP request, by `route`.
pub const HTTP_REQUEST_SECONDS: &str = "tally_http_request_seconds";
/// Counter: API keys refused, by `reason` (`missing`, `malformed`, `unknown`,
/// `wrong_secret`, `revoked`, `expired`) and `transport` (`http`, `nats`).
pub const AUTH_FAILURES: &str = "tally_auth_failures_total";
/// Counter: requests refused (429) for being over their key's `limit` (`requests` or
/// `bytes` per second).
pub const RATE_LIMITED: &str = "tally_rate_limited_total";

/// Every metric name above.
pub const ALL: &[&str] = &[
    EVENTS,
    MESSAGES,
    DUPLICATES,
    DEAD_LETTERS,
    NOTIFICATIONS,
    FLUSH_ROWS,
    FLUSH_SECONDS,
    LAKE_WRITE_FAILURES,
    ROWS_DURABLE,
    BATCHES_ACKED,
    STORED_TO_DURABLE_SECONDS,
    CONSUMER_PENDING,
    PARTITIONS_OWNED,
    TAKEOVERS,
    DELIVERY_GAPS,
    NATS_CONNECTED,
    CHECK_SECONDS,
    QUERY_SECONDS,
    QUERY_FAILURES,
    HTTP_REQUESTS,
    HTTP_REQUEST_SECONDS,
    AUTH_FAILURES,
    RATE_LIMITED,
];

/// The histograms (exported with `_bucket`, `_sum`, `_count` series).
pub const HISTOGRAMS: &[&str] = &[
    FLUSH_ROWS,
    FLUSH_SECONDS,
    STORED_TO_DURABLE_SECONDS,
    CHECK_SECONDS,
    QUERY_SECONDS,
    HTTP_REQUEST_SECONDS,
];

/// Bucket bounds for the histograms measured in seconds.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

/// Bucket bounds for [`FLUSH_ROWS`].
pub const ROWS_BUCKETS: &[f64] = &[
    10.0, 100.0, 1_000.0, 5_000.0, 10_000.0, 25_000.0, 50_000.0, 100_000.0, 250_000.0, 1e6,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_prefixed_distinct_and_listed() {
        let mut seen = std::collections::HashSet::new();
        for name in ALL {
            assert!(name.starts_with("tally_"), "{name}");
            assert!(seen.insert(*name), "{name} twice");
        }
        for h in HISTOGRAMS {
            assert!(ALL.contains(h));
        }
    }
}
