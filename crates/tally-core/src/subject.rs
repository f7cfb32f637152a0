//! NATS names every component agrees on, and the rule that turns a customer id into a
//! subject token.
//!
//! Producers publish to `tally.events.<customer-token>`. The events stream rewrites that
//! subject as it stores the message, with NATS's own deterministic `partition()` mapping:
//! `tally.part.<partition>.<customer-token>`. Each partition has one durable pull
//! consumer filtered on `tally.part.<partition>.*`, so a customer's events always reach
//! the one worker that owns its partition.

/// The stream that holds usage events.
pub const EVENTS_STREAM: &str = "TALLY_EVENTS";
/// What producers publish to (one token: the customer).
pub const EVENTS_SUBJECT_PREFIX: &str = "tally.events";
/// The stored, partitioned subject prefix.
pub const PARTITIONED_PREFIX: &str = "tally.part";
/// The stream that holds dead letters.
pub const DEAD_LETTER_STREAM: &str = "TALLY_DEADLETTER";
/// Dead letters are published to `tally.deadletter.<reason>`.
pub const DEAD_LETTER_PREFIX: &str = "tally.deadletter";

/// The servers of a NATS address: `nats://a:4222,nats://b:4222` (the nodes of a cluster,
/// commas between them, spaces allowed) as one URL each, for a client to connect to
/// whichever answers and fail over between them.
pub fn server_urls(address: &str) -> Vec<String> {
    address
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The subject a producer publishes a customer's events to.
pub fn events_subject(customer: &str) -> String {
    format!("{EVENTS_SUBJECT_PREFIX}.{}", customer_token(customer))
}

/// The filter subject of one partition's consumer.
pub fn partition_filter(partition: u16) -> String {
    format!("{PARTITIONED_PREFIX}.{partition}.*")
}

/// The durable consumer name of one partition.
pub fn partition_consumer(partition: u16) -> String {
    format!("tally-p{partition}")
}

/// The stream's subject transform: source and destination.
pub fn partition_transform(partitions: u16) -> (String, String) {
    (
        format!("{EVENTS_SUBJECT_PREFIX}.*"),
        format!("{PARTITIONED_PREFIX}.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}"),
    )
}

/// The partition count of a destination [`partition_transform`] made.
pub fn transform_count(destination: &str) -> Option<u16> {
    let rest = destination.strip_prefix(&format!("{PARTITIONED_PREFIX}.{{{{partition("))?;
    let (count, rest) = rest.split_once(',')?;
    (rest == "1)}}.{{wildcard(1)}}").then_some(())?;
    count.parse().ok()
}

/// A message carrying this header in the events stream is a marker, not usage: workers
/// acknowledge it with the messages around it and store nothing of it. `tally partitions
/// grow` publishes one to learn a sequence after every message of the old partitioning.
pub const MARKER_HEADER: &str = "Tally-Marker";

/// Splits a stored subject `tally.part.<partition>.<token>` into its partition and token.
pub fn parse_partitioned(subject: &str) -> Option<(u16, &str)> {
    let rest = subject
        .strip_prefix(PARTITIONED_PREFIX)?
        .strip_prefix('.')?;
    let (partition, token) = rest.split_once('.')?;
    Some((partition.parse().ok()?, token))
}

/// The subject token for a customer id.
///
/// The rule: an id made only of ASCII letters, digits, `-` and `_` is its own token.
/// Any other id (spaces, dots, `*`, `>`, non-ASCII, empty) becomes `~` followed by the
/// lowercase hex of its UTF-8 bytes. `~` never appears in a plain token, so the rule is
/// reversible ([`customer_from_token`]) and two ids never share a token.
pub fn customer_token(customer: &str) -> String {
    let plain = !customer.is_empty()
        && customer
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        customer.to_owned()
    } else {
        let mut token = String::with_capacity(1 + 2 * customer.len());
        token.push('~');
        for b in customer.bytes() {
            token.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
            token.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
        }
        token
    }
}

/// The customer id a token stands for; `None` for a malformed token.
pub fn customer_from_token(token: &str) -> Option<String> {
    match token.strip_prefix('~') {
        None => Some(token.to_owned()),
        Some(hex) => {
            if hex.len() % 2 != 0 {
                return None;
            }
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
                .collect::<Option<Vec<u8>>>()?;
            String::from_utf8(bytes).ok()
        }
    }
}

/// Whether a token names this customer, without allocating on the common path.
pub fn token_matches(token: &str, customer: &str) -> bool {
    if token.starts_with('~') {
        customer_from_token(token).is_some_and(|c| c == customer)
    } else {
        token == customer
    }
}

/// The key-value bucket of plans (`plan.<key>`), add-ons (`addon.<key>`) and SKU
/// mappings (`sku.<key>`).
pub const CATALOG_BUCKET: &str = "tally_catalog";
/// The key-value bucket of customers, by [`kv_key`] of the customer id.
pub const CUSTOMERS_BUCKET: &str = "tally_customers";
/// The stream every change to those buckets is also appended to.
pub const AUDIT_STREAM: &str = "TALLY_AUDIT";
/// Audit entries are published to `tally.audit.<kind>.<customer-token of the id>`.
pub const AUDIT_PREFIX: &str = "tally.audit";

/// The key-value key for an id. NATS keys allow `[-/_=.a-zA-Z0-9]`: an id of ASCII
/// letters, digits, `-` and `_` is its own key; any other becomes `=` followed by the
/// lowercase hex of its UTF-8 bytes (the token rule with `=` for `~`, which keys forbid).
pub fn kv_key(id: &str) -> String {
    let token = customer_token(id);
    match token.strip_prefix('~') {
        Some(hex) => format!("={hex}"),
        None => token,
    }
}

/// The id a key-value key stands for; `None` for a malformed key.
pub fn id_from_kv_key(key: &str) -> Option<String> {
    match key.strip_prefix('=') {
        Some(hex) => customer_from_token(&format!("~{hex}")),
        None => Some(key.to_owned()),
    }
}

/// The partition NATS's `partition(P, token)` transform gives a customer: FNV-1a (32-bit)
/// of the customer's subject token, modulo the partition count.
pub fn partition_of(customer: &str, partitions: u16) -> u16 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in customer_token(customer).bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % u32::from(partitions.max(1))) as u16
}

/// Checks are requests on `tally.check.<partition>.<customer-token>`.
pub const CHECK_PREFIX: &str = "tally.check";
/// Reserve-and-record requests go to `tally.record.<partition>.<customer-token>`.
pub const RECORD_PREFIX: &str = "tally.record";

/// The subject of a check (`prefix` [`CHECK_PREFIX`]) or a reserve-and-record request
/// ([`RECORD_PREFIX`]) for a customer: its partition, then its token, so that NATS
/// permissions can limit an application's key to its customers' requests.
pub fn request_subject(prefix: &str, customer: &str, partitions: u16) -> String {
    format!(
        "{prefix}.{}.{}",
        partition_of(customer, partitions),
        customer_token(customer)
    )
}

/// The key-value bucket of partition leases.
pub const LEASES_BUCKET: &str = "tally_leases";
/// The key-value bucket of live workers.
pub const WORKERS_BUCKET: &str = "tally_workers";
/// The key-value bucket of API keys (digests of their secrets).
pub const KEYS_BUCKET: &str = "tally_api_keys";
/// The key-value bucket of license signing keys.
pub const LICENSE_KEYS_BUCKET: &str = "tally_license_keys";
/// The key-value bucket of idempotency keys of the HTTP API.
pub const IDEMPOTENCY_BUCKET: &str = "tally_idempotency";
/// The key-value bucket of customers' access requests.
pub const ACCESS_REQUESTS_BUCKET: &str = "tally_access_requests";

/// The stream of notifications (upgrade prompts).
pub const NOTIFY_STREAM: &str = "TALLY_NOTIFY";
/// Notifications are published to `tally.notify.<kind>.<customer-token>`.
pub const NOTIFY_PREFIX: &str = "tally.notify";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_lists_each_server_once() {
        assert_eq!(
            server_urls("nats://a:4222, nats://b:4222,,tls://c:4222 "),
            ["nats://a:4222", "nats://b:4222", "tls://c:4222"]
        );
        assert_eq!(
            server_urls("nats://127.0.0.1:4222"),
            ["nats://127.0.0.1:4222"]
        );
    }

    #[test]
    fn a_transform_says_its_partition_count() {
        for count in [1, 16, 64, 1024] {
            assert_eq!(transform_count(&partition_transform(count).1), Some(count));
        }
        assert_eq!(
            transform_count("tally.part.{{partition(16,2)}}.{{wildcard(1)}}"),
            None
        );
        assert_eq!(transform_count("tally.part.x"), None);
    }

    #[test]
    fn plain_ids_are_their_own_token() {
        assert_eq!(customer_token("acme-42_x"), "acme-42_x");
        assert_eq!(events_subject("acme"), "tally.events.acme");
    }

    #[test]
    fn other_ids_round_trip_through_hex() {
        for id in ["acme corp/eu.1", "a.b", "*", ">", "Zürich", "", "~x"] {
            let token = customer_token(id);
            assert!(token.starts_with('~'), "{id}");
            assert!(!token.contains(['.', '*', '>', ' ']));
            assert_eq!(customer_from_token(&token).as_deref(), Some(id));
            assert!(token_matches(&token, id));
        }
        assert_eq!(customer_token("a.b"), "~612e62");
        assert!(!token_matches("~612e62", "a-b"));
        assert!(customer_from_token("~6").is_none());
    }

    #[test]
    fn kv_keys_use_only_allowed_characters() {
        assert_eq!(kv_key("acme-42_x"), "acme-42_x");
        assert_eq!(kv_key("a.b"), "=612e62");
        for id in ["acme corp/eu.1", "Zürich", "", "~x", "=y"] {
            let key = kv_key(id);
            assert!(
                key.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b)),
                "{id} -> {key}"
            );
            assert!(key.starts_with('='), "{id}");
        }
    }

    #[test]
    fn kv_keys_map_back_to_ids() {
        for id in ["acme", "a.b", "Zürich corp", "=x"] {
            assert_eq!(id_from_kv_key(&kv_key(id)).as_deref(), Some(id));
        }
    }

    #[test]
    fn partitions_follow_fnv1a_of_the_token() {
        // FNV-1a of "a" is 0xe40c292c.
        assert_eq!(partition_of("a", 16), (0xe40c_292c_u32 % 16) as u16);
        assert!((0..1000).all(|i| partition_of(&format!("cust-{i}"), 16) < 16));
    }

    #[test]
    fn partitioned_subjects_parse() {
        assert_eq!(parse_partitioned("tally.part.7.acme"), Some((7, "acme")));
        assert_eq!(parse_partitioned("tally.events.acme"), None);
        let (src, dst) = partition_transform(16);
        assert_eq!(src, "tally.events.*");
        assert_eq!(dst, "tally.part.{{partition(16,1)}}.{{wildcard(1)}}");
    }
}
