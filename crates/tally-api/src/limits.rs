//! Limits per API key: requests per second and request-body bytes per second, each with a
//! burst.
//!
//! Each limit is a GCRA (the token bucket kept as one time: when the key's bucket would be
//! full again). A request costs one request and the bytes its `Content-Length` declares;
//! it passes only if both limits have room, and a refused request charges nothing. A body
//! of undeclared length (chunked) is charged as it is read and never cut short: it passes
//! unless the key is already over its bytes burst, and what it adds refuses the key's next
//! bodies until it is paid off. A declared length above the bytes burst is not charged: it
//! could never pass, and the body limit (`api.max_body_bytes`, at most the burst) refuses
//! it with 413.
//!
//! A key's state is two integers in a map behind a read-write lock, taken for reading on
//! the way of every request (a key's first request takes it for writing). An entry whose
//! buckets are full again is the same as no entry, so entries are dropped when the map has
//! doubled since the last sweep: the map holds about the keys used in the last burst's
//! worth of seconds, never every key ever seen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use futures::TryStreamExt;

use crate::ApiConfig;

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Bytes,
}

impl Limit {
    /// The name in the problem body and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Requests => "requests",
            Limit::Bytes => "bytes",
        }
    }
}

/// A request over one of its key's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub limit: Limit,
    /// How long until the same request would pass, if the key sends nothing else.
    pub wait: Duration,
    /// The limit's rate and burst, per second.
    pub per_sec: u64,
    pub burst: u64,
}

impl Refused {
    /// The wait in whole seconds, at least 1 (for `Retry-After`).
    pub fn retry_after_secs(&self) -> u32 {
        let secs = self.wait.as_nanos().div_ceil(NANOS_PER_SEC).max(1);
        u32::try_from(secs).unwrap_or(u32::MAX)
    }
}

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// One limit: `per_sec` units a second, at most `burst` at once. Times are nanoseconds
/// since the limiter's epoch; no clock is read here.
#[derive(Debug, Clone, Copy)]
struct Gcra {
    per_sec: u64,
    burst: u64,
    /// How long the bucket takes to fill from empty.
    capacity: u64,
}

impl Gcra {
    fn new(per_sec: u64, burst: u64) -> Gcra {
        let per_sec = per_sec.max(1);
        let mut gcra = Gcra {
            per_sec,
            burst,
            capacity: 0,
        };
        gcra.capacity = gcra.span(burst);
        gcra
    }

    /// The time `units` take to refill.
    fn span(&self, units: u64) -> u64 {
        let nanos = (u128::from(units) * NANOS_PER_SEC).div_ceil(u128::from(self.per_sec));
        u64::try_from(nanos).unwrap_or(u64::MAX)
    }

    /// The bucket's new time after `cost` units at `now`, or how long until they would fit.
    fn take(&self, full_at: u64, cost: u64, now: u64) -> Result<u64, Duration> {
        let next = full_at.max(now).saturating_add(self.span(cost));
        let ahead = next - now;
        if ahead <= self.capacity {
            Ok(next)
        } else {
            Err(Duration::from_nanos(ahead - self.capacity))
        }
    }

    fn refused(&self, limit: Limit, wait: Duration) -> Refused {
        Refused {
            limit,
            wait,
            per_sec: self.per_sec,
            burst: self.burst,
        }
    }
}

/// A key's two buckets: when each is full again.
#[derive(Debug, Default)]
struct KeyState {
    requests_full_at: u64,
    bytes_full_at: u64,
}

impl KeyState {
    fn idle(&self, now: u64) -> bool {
        self.requests_full_at <= now && self.bytes_full_at <= now
    }
}

#[derive(Debug)]
struct Table {
    keys: HashMap<String, Mutex<KeyState>>,
    /// The size at which a new key sweeps out the idle ones first.
    sweep_at: usize,
}

/// The smallest map that is swept.
const MIN_SWEEP: usize = 64;

/// The limits of every key, shared by the server's handlers.
#[derive(Debug, Clone)]
pub struct KeyLimits(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    requests: Gcra,
    bytes: Gcra,
    epoch: Instant,
    table: RwLock<Table>,
}

impl KeyLimits {
    /// The limits `api.key_*` configure.
    pub fn new(config: &ApiConfig) -> KeyLimits {
        KeyLimits(Arc::new(Inner {
            requests: Gcra::new(
                u64::from(config.key_requests_per_sec),
                u64::from(config.key_requests_burst),
            ),
            bytes: Gcra::new(config.key_bytes_per_sec, config.key_bytes_burst),
            epoch: Instant::now(),
            table: RwLock::new(Table {
                keys: HashMap::new(),
                sweep_at: MIN_SWEEP,
            }),
        }))
    }

    /// Admits one request of key `id` whose body declares `bytes` (`None`: a body of
    /// undeclared length, charged with [`charge_read`](Self::charge_read) as it is read),
    /// charging both limits; a refused request charges nothing.
    pub fn admit(&self, id: &str, bytes: Option<u64>) -> Result<(), Refused> {
        self.admit_at(id, bytes, self.now())
    }

    /// Charges `bytes` read from a body of undeclared length to key `id`, never refusing.
    pub fn charge_read(&self, id: &str, bytes: u64) {
        self.charge_read_at(id, bytes, self.now());
    }

    fn now(&self) -> u64 {
        u64::try_from(self.0.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn admit_at(&self, id: &str, bytes: Option<u64>, now: u64) -> Result<(), Refused> {
        let (requests, limit) = (&self.0.requests, &self.0.bytes);
        self.with_key(id, now, |state| {
            let requests_full_at = requests
                .take(state.requests_full_at, 1, now)
                .map_err(|wait| requests.refused(Limit::Requests, wait))?;
            let bytes_full_at = match bytes {
                Some(0) => state.bytes_full_at,
                Some(n) if n > limit.burst => state.bytes_full_at,
                // Undeclared: charged as read, refused only while over the burst already.
                n => limit
                    .take(state.bytes_full_at, n.unwrap_or(0), now)
                    .map_err(|wait| limit.refused(Limit::Bytes, wait))?,
            };
            *state = KeyState {
                requests_full_at,
                bytes_full_at,
            };
            Ok(())
        })
    }

    fn charge_read_at(&self, id: &str, bytes: u64, now: u64) {
        let limit = &self.0.bytes;
        self.with_key(id, now, |state| {
            state.bytes_full_at = state
                .bytes_full_at
                .max(now)
                .saturating_add(limit.span(bytes));
        });
    }

    /// Runs `f` on key `id`'s state, adding it (and sweeping the idle ones when the map
    /// has doubled) on the key's first request.
    fn with_key<T>(&self, id: &str, now: u64, f: impl FnOnce(&mut KeyState) -> T) -> T {
        let lock = |state: &Mutex<KeyState>| {
            let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut state)
        };
        {
            let table = self.0.table.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(state) = table.keys.get(id) {
                return lock(state);
            }
        }
        let mut table = self.0.table.write().unwrap_or_else(PoisonError::into_inner);
        if !table.keys.contains_key(id) && table.keys.len() >= table.sweep_at {
            table.keys.retain(|_, state| {
                !state
                    .get_mut()
                    .unwrap_or_else(PoisonError::into_inner)
                    .idle(now)
            });
            table.sweep_at = (table.keys.len() * 2).max(MIN_SWEEP);
        }
        let state = table.keys.entry(id.to_owned()).or_default();
        lock(state)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0
            .table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys
            .len()
    }
}

/// Where the bytes of a body of undeclared length are charged: the middleware puts it in
/// the request, and the caller's key, once known, is bound to it.
#[derive(Debug, Clone, Default)]
pub(crate) struct BodyMeter(Arc<OnceLock<(KeyLimits, String)>>);

impl BodyMeter {
    /// Charges what is read from now on to key `id`.
    pub(crate) fn bind(&self, limits: &KeyLimits, id: &str) {
        let _ = self.0.set((limits.clone(), id.to_owned()));
    }

    fn charge(&self, bytes: usize) {
        if let Some((limits, id)) = self.0.get() {
            limits.charge_read(id, bytes as u64);
        }
    }
}

/// Meters a request body without `Content-Length` as it is read (see [`BodyMeter`]);
/// other requests pass untouched.
pub(crate) async fn meter_undeclared_body(mut request: Request, next: Next) -> Response {
    use axum::body::HttpBody as _;
    if !request.headers().contains_key(header::CONTENT_LENGTH) && !request.body().is_end_stream() {
        let meter = BodyMeter::default();
        request.extensions_mut().insert(meter.clone());
        let body = std::mem::take(request.body_mut()).into_data_stream();
        *request.body_mut() =
            Body::from_stream(body.inspect_ok(move |chunk| meter.charge(chunk.len())));
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn limits(requests: (u32, u32), bytes: (u64, u64)) -> KeyLimits {
        KeyLimits::new(&ApiConfig {
            key_requests_per_sec: requests.0,
            key_requests_burst: requests.1,
            key_bytes_per_sec: bytes.0,
            key_bytes_burst: bytes.1,
            ..ApiConfig::default()
        })
    }

    #[test]
    fn a_burst_passes_then_one_request_per_interval() {
        let l = limits((1, 2), (1 << 30, 1 << 30));
        let now = 10 * SEC;
        assert!(l.admit_at("a", Some(0), now).is_ok());
        assert!(l.admit_at("a", Some(0), now).is_ok());
        let refused = l.admit_at("a", Some(0), now).unwrap_err();
        assert_eq!(refused.limit, Limit::Requests);
        assert_eq!(refused.wait, Duration::from_secs(1));
        assert_eq!(refused.retry_after_secs(), 1);
        // Another key has its own buckets.
        assert!(l.admit_at("b", Some(0), now).is_ok());
        // A refusal charged nothing: one second later exactly one more passes.
        assert!(l.admit_at("a", Some(0), now + SEC - 1).is_err());
        assert!(l.admit_at("a", Some(0), now + SEC).is_ok());
        assert!(l.admit_at("a", Some(0), now + SEC).is_err());
    }

    #[test]
    fn bytes_are_charged_as_declared_and_a_refusal_names_the_limit() {
        let l = limits((1000, 1000), (1000, 4000));
        let now = SEC;
        assert!(l.admit_at("a", Some(3000), now).is_ok());
        let refused = l.admit_at("a", Some(2000), now).unwrap_err();
        assert_eq!(refused.limit, Limit::Bytes);
        assert_eq!(refused.wait, Duration::from_secs(1));
        assert_eq!((refused.per_sec, refused.burst), (1000, 4000));
        // What still fits passes, and a request without a body is not held back by bytes.
        assert!(l.admit_at("a", Some(1000), now).is_ok());
        assert!(l.admit_at("a", Some(0), now).is_ok());
        // More than the burst can never fit: not charged (the body limit refuses it).
        assert!(l.admit_at("a", Some(4001), now).is_ok());
        // Half a second refills 500 bytes.
        assert!(l.admit_at("a", Some(500), now + SEC / 2).is_ok());
        let refused = l.admit_at("a", Some(1), now + SEC / 2).unwrap_err();
        assert_eq!(refused.retry_after_secs(), 1);
    }

    #[test]
    fn a_refused_bytes_request_spends_no_request() {
        let l = limits((1, 2), (1000, 1000));
        let now = SEC;
        assert!(l.admit_at("a", Some(1000), now).is_ok());
        assert_eq!(
            l.admit_at("a", Some(1000), now).unwrap_err().limit,
            Limit::Bytes
        );
        // The refused request left the second request of the burst unspent.
        assert!(l.admit_at("a", Some(0), now).is_ok());
        assert_eq!(
            l.admit_at("a", Some(0), now).unwrap_err().limit,
            Limit::Requests
        );
    }

    #[test]
    fn bodies_read_without_a_declared_length_run_into_debt() {
        let l = limits((1000, 1000), (1000, 2000));
        let now = SEC;
        assert!(l.admit_at("a", None, now).is_ok());
        l.charge_read_at("a", 1500, now);
        // Within the burst: the next undeclared body passes, however long it turns out.
        assert!(l.admit_at("a", None, now).is_ok());
        l.charge_read_at("a", 3500, now);
        assert_eq!(l.admit_at("a", None, now).unwrap_err().limit, Limit::Bytes);
        // Without a body the key still passes.
        assert!(l.admit_at("a", Some(0), now).is_ok());
        let refused = l.admit_at("a", Some(1), now).unwrap_err();
        assert_eq!(refused.limit, Limit::Bytes);
        // 5000 bytes charged against a 2000-byte burst: three seconds and a byte's worth.
        assert_eq!(refused.wait, Duration::from_millis(3001));
        assert_eq!(refused.retry_after_secs(), 4);
        assert!(l.admit_at("a", Some(1), now + 3 * SEC + SEC / 1000).is_ok());
    }

    #[test]
    fn idle_keys_are_swept_when_the_map_doubles() {
        let l = limits((1, 1), (1000, 1000));
        for i in 0..MIN_SWEEP {
            assert!(l.admit_at(&format!("k{i}"), Some(0), SEC).is_ok());
        }
        assert_eq!(l.len(), MIN_SWEEP);
        // Still busy: nothing is dropped, and the next sweep waits for twice as many.
        assert!(l.admit_at("busy", Some(0), SEC).is_ok());
        assert_eq!(l.len(), MIN_SWEEP + 1);
        // A second on, the first keys' buckets are full again: the key that finds the map
        // doubled sweeps them (and `busy`) out before it is added.
        for i in 0..MIN_SWEEP {
            assert!(l.admit_at(&format!("j{i}"), Some(0), 2 * SEC + 1).is_ok());
        }
        assert_eq!(l.len(), MIN_SWEEP);
        // A swept key starts with its full burst, as it would have anyway.
        assert!(l.admit_at("k0", Some(0), 3 * SEC).is_ok());
    }
}
