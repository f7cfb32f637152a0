//! Entitlement checks: the answer, its wire shapes over NATS and HTTP, and the short
//! local cache in front of them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// "May this customer use this feature now?", as the worker owning the customer answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckAnswer {
    /// Whether usage of the quantity asked would be allowed now (accepted or overage).
    pub has_access: bool,
    /// The decision an event would get now: `accepted`, `overage`, `limit_reached`,
    /// `not_entitled`, `unknown_customer`, …
    pub decision: String,
    /// Quantity counted in the open period.
    pub usage: f64,
    /// The period's limit; `None` when unlimited or not metered.
    pub limit: Option<f64>,
    /// What is left of the limit and the usable grants.
    pub remaining: Option<f64>,
    /// When the period's counter starts again.
    pub resets_at: Option<DateTime<Utc>>,
    /// A static feature's value.
    pub value: Option<Value>,
}

/// The JSON request on `tally.check.<partition>` (`tally_ingest::checks::CheckRequest`).
#[derive(Debug, Serialize)]
pub(crate) struct NatsRequest<'a> {
    pub(crate) customer: &'a str,
    pub(crate) feature: &'a str,
    pub(crate) quantity: f64,
}

/// The reply (`tally_ingest::checks::CheckReply`, or `CheckError` when `error` is set).
#[derive(Debug, Deserialize)]
pub(crate) struct NatsReply {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    decision: Option<String>,
    #[serde(default)]
    has_access: bool,
    #[serde(default)]
    usage: f64,
    #[serde(default)]
    limit: Option<f64>,
    #[serde(default)]
    remaining: Option<f64>,
    #[serde(default)]
    resets_at: Option<DateTime<Utc>>,
    #[serde(default)]
    value: Option<Value>,
}

impl NatsReply {
    pub(crate) fn into_answer(self) -> crate::Result<CheckAnswer> {
        if let Some(message) = self.error {
            return Err(crate::Error::Check {
                message,
                field: self.field,
            });
        }
        let decision = self
            .decision
            .ok_or_else(|| crate::Error::Protocol("a check reply without a decision".into()))?;
        Ok(CheckAnswer {
            has_access: self.has_access,
            decision,
            usage: self.usage,
            limit: self.limit,
            remaining: self.remaining,
            resets_at: self.resets_at,
            value: self.value,
        })
    }
}

/// OpenMeter's entitlement value, as `GET /api/v1/customers/{c}/entitlements/{f}` answers.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EntitlementValue {
    has_access: bool,
    #[serde(default)]
    balance: Option<f64>,
    #[serde(default)]
    usage: f64,
    #[serde(default)]
    limit: Option<f64>,
    #[serde(default)]
    resets_at: Option<DateTime<Utc>>,
    /// A static feature's value as JSON text.
    #[serde(default)]
    config: Option<String>,
    decision: String,
}

impl From<EntitlementValue> for CheckAnswer {
    fn from(v: EntitlementValue) -> Self {
        Self {
            has_access: v.has_access,
            decision: v.decision,
            usage: v.usage,
            limit: v.limit,
            remaining: v.balance,
            resets_at: v.resets_at,
            value: v
                .config
                .map(|text| serde_json::from_str(&text).unwrap_or(Value::String(text))),
        }
    }
}

/// The answer given for a customer the server does not know (HTTP answers 404).
pub(crate) fn unknown_customer() -> CheckAnswer {
    CheckAnswer {
        has_access: false,
        decision: "unknown_customer".into(),
        usage: 0.0,
        limit: None,
        remaining: None,
        resets_at: None,
        value: None,
    }
}

/// The most answers the cache keeps; past it, expired ones are dropped, then all.
const CACHE_ENTRIES: usize = 10_000;

type Key = (String, String, u64);

/// Answers by customer × feature × quantity, each kept for the TTL.
#[derive(Debug)]
pub(crate) struct Cache {
    ttl: Duration,
    entries: Mutex<HashMap<Key, (Instant, CheckAnswer)>>,
}

impl Cache {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn key(customer: &str, feature: &str, quantity: f64) -> Key {
        (customer.to_owned(), feature.to_owned(), quantity.to_bits())
    }

    pub(crate) fn get(&self, customer: &str, feature: &str, quantity: f64) -> Option<CheckAnswer> {
        if self.ttl.is_zero() {
            return None;
        }
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (at, answer) = entries.get(&Self::key(customer, feature, quantity))?;
        (at.elapsed() < self.ttl).then(|| answer.clone())
    }

    pub(crate) fn put(&self, customer: &str, feature: &str, quantity: f64, answer: &CheckAnswer) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= CACHE_ENTRIES {
            entries.retain(|_, (at, _)| at.elapsed() < self.ttl);
            if entries.len() >= CACHE_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(
            Self::key(customer, feature, quantity),
            (Instant::now(), answer.clone()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entitlement_values_become_answers() {
        let v: EntitlementValue = serde_json::from_str(
            r#"{"hasAccess":true,"balance":90,"usage":10,"overage":0,"limit":100,
                "resetsAt":"2026-12-01T00:00:00Z","config":"{\"tier\":2}","decision":"accepted"}"#,
        )
        .unwrap();
        let a = CheckAnswer::from(v);
        assert!(a.has_access);
        assert_eq!(a.remaining, Some(90.0));
        assert_eq!(a.limit, Some(100.0));
        assert_eq!(a.value, Some(serde_json::json!({"tier": 2})));
    }

    #[test]
    fn error_replies_become_errors() {
        let r: NatsReply =
            serde_json::from_str(r#"{"error":"no feature","field":"feature"}"#).unwrap();
        assert!(
            matches!(r.into_answer(), Err(crate::Error::Check { field: Some(f), .. }) if f == "feature")
        );
    }

    #[test]
    fn the_cache_keeps_answers_for_the_ttl_only() {
        let cache = Cache::new(Duration::from_millis(50));
        let answer = unknown_customer();
        cache.put("c", "f", 1.0, &answer);
        assert_eq!(cache.get("c", "f", 1.0), Some(answer));
        assert_eq!(cache.get("c", "f", 2.0), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get("c", "f", 1.0), None);
        let off = Cache::new(Duration::ZERO);
        off.put("c", "f", 1.0, &unknown_customer());
        assert_eq!(off.get("c", "f", 1.0), None);
    }
}
