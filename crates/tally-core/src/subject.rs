//! NATS names every component agrees on, and the rule that turns a customer id into a
//! subject token.
//!
//! Producers publish to `tally.events.<customer-token>`. The events stream rewrites that
//! subject as it stores the message, with NATS's own deterministic `partition()` mapping,
//! once per partition count the stream can ever have (its *levels*: the count it was made
//! with, doubled up to [`MAX_PARTITIONS`]): `tally.part.<p16>.<p32>.<p64>…<customer-token>`
//! for a stream made with 16. Each partition has one durable pull consumer filtered on
//! its number at the level of the count in force (`tally.part.*.*.<p64>.>`), so a
//! customer's events always reach the one worker that owns its partition.
//!
//! The transform is written once, when the stream is made, and never changed: a replica
//! applies a stream's transform as it stores each message, so a transform changed while
//! messages are published would store some of them under one partition on one replica and
//! under another on the next. Growing the partition count changes which level the
//! consumers filter on, never the stored subjects ([`crate::partitions`]).

use crate::partitions::MAX_PARTITIONS;

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

/// The durable consumer name of one partition.
pub fn partition_consumer(partition: u16) -> String {
    format!("tally-p{partition}")
}

/// The partition counts a stream made with `base` partitions can have, each a level of
/// its stored subjects: `base`, doubled while it stays within [`MAX_PARTITIONS`].
pub fn partition_levels(base: u16) -> Vec<u16> {
    let mut levels = vec![base.clamp(1, MAX_PARTITIONS)];
    while let Some(next) = levels.last().and_then(|l| l.checked_mul(2))
        && next <= MAX_PARTITIONS
    {
        levels.push(next);
    }
    levels
}

/// The stream's subject transform for these levels: source and destination.
pub fn partition_transform(levels: &[u16]) -> (String, String) {
    let mut destination = PARTITIONED_PREFIX.to_owned();
    for level in levels {
        destination.push_str(&format!(".{{{{partition({level},1)}}}}"));
    }
    destination.push_str(".{{wildcard(1)}}");
    (format!("{EVENTS_SUBJECT_PREFIX}.*"), destination)
}

/// The levels of a destination [`partition_transform`] made (a stream made by an older
/// Tally has one).
pub fn transform_levels(destination: &str) -> Option<Vec<u16>> {
    let rest = destination
        .strip_prefix(PARTITIONED_PREFIX)?
        .strip_suffix(".{{wildcard(1)}}")?;
    let mut levels = Vec::new();
    for token in rest.split('.').skip(1) {
        let count = token.strip_prefix("{{partition(")?.strip_suffix(",1)}}")?;
        levels.push(count.parse().ok().filter(|&c| c > 0)?);
    }
    (!levels.is_empty()).then_some(levels)
}

/// The filter subject of the messages `partition` holds at the partition count `count`
/// (one of `levels`): its number at that level, any at the others.
pub fn partition_filter(levels: &[u16], count: u16, partition: u16) -> Option<String> {
    let at = levels.iter().position(|&l| l == count)?;
    let mut filter = PARTITIONED_PREFIX.to_owned();
    for i in 0..levels.len() {
        if i == at {
            filter.push_str(&format!(".{partition}"));
        } else {
            filter.push_str(".*");
        }
    }
    filter.push_str(".*");
    Some(filter)
}

/// A message carrying this header in the events stream is a marker, not usage: workers
/// store nothing of it. `tally partitions grow` publishes one to every partition
/// ([`marker_subjects`]) to learn a sequence after every message of the old count.
pub const MARKER_HEADER: &str = "Tally-Marker";

/// For each partition of `count`, in order, a subject whose messages it holds:
/// `tally.events.tally-partitions-<n>` for the first `n` that lands there.
pub fn marker_subjects(count: u16) -> Vec<String> {
    let mut subjects = vec![None; usize::from(count.max(1))];
    let mut left = subjects.len();
    for n in 0u32.. {
        let token = format!("tally-partitions-{n}");
        let slot = &mut subjects[usize::from(partition_of(&token, count))];
        if slot.is_none() {
            *slot = Some(events_subject(&token));
            left -= 1;
            if left == 0 {
                break;
            }
        }
    }
    subjects.into_iter().flatten().collect()
}

/// A stored subject `tally.part.<partition at each level>.<token>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored<'s> {
    levels: &'s str,
    /// The customer token.
    pub token: &'s str,
}

impl Stored<'_> {
    /// The partition at level `level` (an index into the stream's levels).
    pub fn partition(&self, level: usize) -> Option<u16> {
        self.levels.split('.').nth(level)?.parse().ok()
    }
}

/// Splits a stored subject into its partitions and token.
pub fn parse_partitioned(subject: &str) -> Option<Stored<'_>> {
    let rest = subject
        .strip_prefix(PARTITIONED_PREFIX)?
        .strip_prefix('.')?;
    let (levels, token) = rest.rsplit_once('.')?;
    Some(Stored { levels, token })
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
    fn a_transform_says_its_levels() {
        assert_eq!(partition_levels(16), [16, 32, 64, 128, 256, 512, 1024]);
        assert_eq!(partition_levels(12), [12, 24, 48, 96, 192, 384, 768]);
        assert_eq!(partition_levels(1024), [1024]);
        for base in [1, 12, 16, 1000] {
            let levels = partition_levels(base);
            assert_eq!(
                transform_levels(&partition_transform(&levels).1),
                Some(levels)
            );
        }
        // A stream made by an older Tally: one level.
        assert_eq!(
            transform_levels("tally.part.{{partition(16,1)}}.{{wildcard(1)}}"),
            Some(vec![16])
        );
        assert_eq!(
            transform_levels("tally.part.{{partition(16,2)}}.{{wildcard(1)}}"),
            None
        );
        assert_eq!(transform_levels("tally.part.{{wildcard(1)}}"), None);
        assert_eq!(transform_levels("tally.part.x"), None);
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
    fn a_marker_reaches_every_partition() {
        for count in [1, 16, 64, 1024] {
            let subjects = marker_subjects(count);
            assert_eq!(subjects.len(), usize::from(count));
            for (p, subject) in subjects.iter().enumerate() {
                let token = subject.strip_prefix("tally.events.").unwrap();
                assert_eq!(usize::from(partition_of(token, count)), p);
            }
        }
    }

    #[test]
    fn partitioned_subjects_parse() {
        let stored = parse_partitioned("tally.part.7.23.55.acme").unwrap();
        assert_eq!(stored.token, "acme");
        assert_eq!(
            (0..4).map(|l| stored.partition(l)).collect::<Vec<_>>(),
            [Some(7), Some(23), Some(55), None]
        );
        assert_eq!(parse_partitioned("tally.events.acme"), None);
        let (src, dst) = partition_transform(&[16, 32, 64]);
        assert_eq!(src, "tally.events.*");
        assert_eq!(
            dst,
            "tally.part.{{partition(16,1)}}.{{partition(32,1)}}.{{partition(64,1)}}.{{wildcard(1)}}"
        );
        let levels = [16, 32, 64];
        assert_eq!(
            partition_filter(&levels, 32, 5).as_deref(),
            Some("tally.part.*.5.*.*")
        );
        assert_eq!(partition_filter(&levels, 48, 5), None);
    }
}
