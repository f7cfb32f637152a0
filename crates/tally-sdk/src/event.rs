//! A usage event as the app records it, and its CloudEvents JSON as it travels.

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};
use tally_core::event::{DecodeLimits, Frame, SPEC_VERSION};

use crate::error::{Error, Result};

/// One usage of a feature by a customer.
///
/// `id` and `time` are filled when the event is recorded (a UUID v7, and the moment of
/// recording) unless the app sets them; an app that has its own idempotency key (an order
/// number, a job id) sets `id` to it, and the server counts that id once however often it
/// arrives.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event id; `None`: a UUID v7 assigned at record time.
    pub id: Option<String>,
    /// The customer id (the CloudEvents `subject`).
    pub customer: String,
    /// The feature used (`data.feature`, and the CloudEvents `type`).
    pub feature: String,
    /// How much; a finite number ≥ 0.
    pub quantity: f64,
    /// When the usage happened; `None`: the moment it is recorded.
    pub time: Option<DateTime<Utc>>,
    /// The user, for seat-limited features (`data.user`).
    pub user: Option<String>,
    /// The region the usage came from, for geo-fenced customers (`data.region`).
    pub region: Option<String>,
    /// Further `data` properties, stored with the event. The keys `feature`, `quantity`,
    /// `user` and `region` are taken from the fields above and override these.
    pub data: Map<String, Value>,
}

impl Event {
    /// `quantity` of `feature` used by `customer`, now.
    pub fn new(customer: impl Into<String>, feature: impl Into<String>, quantity: f64) -> Self {
        Self {
            id: None,
            customer: customer.into(),
            feature: feature.into(),
            quantity,
            time: None,
            user: None,
            region: None,
            data: Map::new(),
        }
    }

    /// Sets the event id (the app's own idempotency key).
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets when the usage happened.
    pub fn at(mut self, time: DateTime<Utc>) -> Self {
        self.time = Some(time);
        self
    }

    /// Sets the user.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Sets the region.
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Adds a `data` property.
    pub fn data(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.data.insert(key.into(), value.into());
        self
    }
}

/// A recorded event: id and time fixed, and its JSON encoded once, so that every retry
/// sends the same bytes.
#[derive(Debug, Clone)]
pub(crate) struct Stamped {
    pub(crate) id: String,
    pub(crate) event: Event,
    pub(crate) json: Bytes,
}

/// Fixes the id and time, encodes the event and runs Tally's own decoder over it, so an
/// event the server would refuse is refused here, before it is buffered.
pub(crate) fn stamp(mut event: Event, source: &str, now: DateTime<Utc>) -> Result<Stamped> {
    let id = event
        .id
        .get_or_insert_with(|| uuid::Uuid::now_v7().to_string())
        .clone();
    let time = *event.time.get_or_insert(now);
    let invalid = |field: Option<&str>, message: String| Error::InvalidEvent {
        field: field.map(str::to_owned),
        message,
    };
    if event.customer.is_empty() {
        return Err(invalid(Some("subject"), "the customer is empty".into()));
    }
    if event.feature.is_empty() {
        return Err(invalid(Some("data.feature"), "the feature is empty".into()));
    }
    if !event.quantity.is_finite() || event.quantity < 0.0 {
        return Err(invalid(
            Some("data.quantity"),
            format!(
                "quantity must be a finite number ≥ 0, not {}",
                event.quantity
            ),
        ));
    }
    for (field, value) in [("data.user", &event.user), ("data.region", &event.region)] {
        if value.as_deref() == Some("") {
            return Err(invalid(Some(field), format!("{field} is empty")));
        }
    }
    let json = encode(&event, &id, source, time);
    let limits = DecodeLimits::default();
    let decoded = Frame::decode(&json, &limits)
        .map_err(|e| invalid(e.field.as_deref(), e.message))?
        .events
        .pop();
    match decoded {
        Some(Ok(_)) => {}
        Some(Err(e)) => return Err(invalid(e.field.as_deref(), e.message)),
        None => return Err(Error::Protocol("the event did not encode".into())),
    }
    limits
        .check_time(Some(time), now.timestamp_micros())
        .map_err(|e| invalid(e.field.as_deref(), e.message))?;
    Ok(Stamped {
        id,
        event,
        json: json.into(),
    })
}

fn encode(event: &Event, id: &str, source: &str, time: DateTime<Utc>) -> Vec<u8> {
    let mut data = event.data.clone();
    data.insert("feature".into(), event.feature.clone().into());
    data.insert("quantity".into(), event.quantity.into());
    if let Some(user) = &event.user {
        data.insert("user".into(), user.clone().into());
    }
    if let Some(region) = &event.region {
        data.insert("region".into(), region.clone().into());
    }
    let value = serde_json::json!({
        "specversion": SPEC_VERSION,
        "id": id,
        "source": source,
        "type": event.feature,
        "subject": event.customer,
        "time": time.to_rfc3339_opts(SecondsFormat::Micros, true),
        "data": data,
    });
    // A `Value` always serialises.
    serde_json::to_vec(&value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamping_assigns_a_v7_id_and_the_time() {
        let now = Utc::now();
        let s = stamp(Event::new("acme", "api-calls", 2.0), "app", now).unwrap();
        let id = uuid::Uuid::parse_str(&s.id).unwrap();
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(s.event.time, Some(now));
        let v: Value = serde_json::from_slice(&s.json).unwrap();
        assert_eq!(v["subject"], "acme");
        assert_eq!(v["data"]["feature"], "api-calls");
        assert_eq!(v["data"]["quantity"], 2.0);
        assert_eq!(v["id"], s.id.as_str());
    }

    #[test]
    fn bad_events_are_refused_before_buffering() {
        let now = Utc::now();
        for (event, field) in [
            (Event::new("", "f", 1.0), "subject"),
            (Event::new("c", "", 1.0), "data.feature"),
            (Event::new("c", "f", -1.0), "data.quantity"),
            (Event::new("c", "f", f64::NAN), "data.quantity"),
            (Event::new("c", "f", f64::INFINITY), "data.quantity"),
            (Event::new("c", "f", 1.0).user(""), "data.user"),
            (
                Event::new("c", "f", 1.0).at(now + chrono::Duration::hours(1)),
                "time",
            ),
            (Event::new("c".repeat(300), "f", 1.0), "subject"),
        ] {
            match stamp(event.clone(), "app", now) {
                Err(Error::InvalidEvent { field: Some(f), .. }) => {
                    assert_eq!(f, field, "{event:?}")
                }
                other => panic!("{event:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn extra_data_travels_and_reserved_keys_are_overridden() {
        let e = Event::new("c", "f", 1.0)
            .data("quantity", 99)
            .data("model", "gpt")
            .region("eu")
            .with_id("order-1");
        let s = stamp(e, "app", Utc::now()).unwrap();
        assert_eq!(s.id, "order-1");
        let v: Value = serde_json::from_slice(&s.json).unwrap();
        assert_eq!(v["data"]["quantity"], 1.0);
        assert_eq!(v["data"]["model"], "gpt");
        assert_eq!(v["data"]["region"], "eu");
    }
}
