//! Who may do what on NATS: the subjects each kind of client may publish and subscribe to,
//! enforced by nats-server, not by Tally.
//!
//! Tally's own processes connect as a [`Service`] (a worker, the API, the operator's CLI),
//! each with an nkey of its own named in the server's configuration. Applications, SDKs and
//! notification consumers connect with a Tally API key: the server asks Tally (its auth
//! callout) and gets back a short-lived user with [`for_key`]'s permissions.
//!
//! JetStream is reached through subjects too (`$JS.API.…`, `$KV.<bucket>.…`), so a grant
//! names the streams and buckets a client may use: a worker can read the customers but not
//! the API keys, an application can publish its customers' events but call no JetStream API
//! at all (a publish to a stream's subject is stored without one).

use crate::subject::{
    ACCESS_REQUESTS_BUCKET, AUDIT_PREFIX, AUDIT_STREAM, CATALOG_BUCKET, CHECK_PREFIX,
    CUSTOMERS_BUCKET, DEAD_LETTER_PREFIX, DEAD_LETTER_STREAM, EVENTS_STREAM, EVENTS_SUBJECT_PREFIX,
    IDEMPOTENCY_BUCKET, KEYS_BUCKET, LEASES_BUCKET, LICENSE_KEYS_BUCKET, NOTIFY_PREFIX,
    NOTIFY_STREAM, RECORD_PREFIX, WORKERS_BUCKET, customer_token,
};

/// The subject nats-server sends its auth callout requests to.
pub const AUTH_CALLOUT_SUBJECT: &str = "$SYS.REQ.USER.AUTH";

/// What a client may publish and subscribe to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects it may publish to (NATS wildcards allowed).
    pub publish: Vec<String>,
    /// Subjects it may subscribe to.
    pub subscribe: Vec<String>,
    /// Whether it may answer requests it received (publish to their reply subjects).
    pub responses: bool,
}

impl Permissions {
    fn grant(&mut self, other: Permissions) {
        self.publish.extend(other.publish);
        self.subscribe.extend(other.subscribe);
        self.responses |= other.responses;
    }

    fn publish(mut self, subjects: impl IntoIterator<Item = String>) -> Self {
        self.publish.extend(subjects);
        self
    }

    fn subscribe(mut self, subjects: impl IntoIterator<Item = String>) -> Self {
        self.subscribe.extend(subjects);
        self
    }
}

/// A Tally process's identity on NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    /// An ingest worker: its consumers, the streams it writes, the definitions it reads,
    /// leases; it answers checks and reserve-and-record requests.
    Worker,
    /// The HTTP API: publishes events, asks the workers, writes definitions, keys,
    /// idempotency records; answers the server's auth callout.
    Api,
    /// The operator's command line (`tally plans apply`, `tally keys`, `tally compact`):
    /// the whole account, as the owner of the deployment.
    Admin,
}

impl Service {
    pub const ALL: [Service; 3] = [Service::Worker, Service::Api, Service::Admin];

    /// Its name: the credential file is `<name>.nk`.
    pub fn name(self) -> &'static str {
        match self {
            Service::Worker => "worker",
            Service::Api => "api",
            Service::Admin => "admin",
        }
    }

    /// What it may do.
    pub fn permissions(self) -> Permissions {
        match self {
            Service::Worker => worker(),
            Service::Api => api(),
            Service::Admin => Permissions {
                publish: vec![">".to_owned()],
                subscribe: vec![">".to_owned()],
                responses: true,
            },
        }
    }
}

/// The JetStream API of one stream: its info, reading its messages, its consumers and
/// their acknowledgements; with `manage`, creating and updating it (never deleting or
/// purging it).
fn stream(name: &str, manage: bool) -> Permissions {
    let mut publish = vec![
        format!("$JS.API.STREAM.INFO.{name}"),
        format!("$JS.API.STREAM.MSG.GET.{name}"),
        format!("$JS.API.DIRECT.GET.{name}"),
        format!("$JS.API.DIRECT.GET.{name}.>"),
        // CONSUMER.CREATE / INFO / DELETE / LIST / NAMES …
        format!("$JS.API.CONSUMER.*.{name}"),
        format!("$JS.API.CONSUMER.*.{name}.>"),
        // … and CONSUMER.DURABLE.CREATE, CONSUMER.MSG.NEXT.
        format!("$JS.API.CONSUMER.*.*.{name}.>"),
        format!("$JS.ACK.{name}.>"),
        format!("$JS.FC.{name}.>"),
    ];
    if manage {
        publish.push(format!("$JS.API.STREAM.CREATE.{name}"));
        publish.push(format!("$JS.API.STREAM.UPDATE.{name}"));
    }
    Permissions::default().publish(publish)
}

/// A key-value bucket: its stream, and with `write`, its keys.
fn bucket(name: &str, write: bool) -> Permissions {
    let mut grant = stream(&format!("KV_{name}"), true);
    if write {
        grant.publish.push(format!("$KV.{name}.>"));
    }
    grant
}

/// What every service needs: account info, and replies to its own requests (JetStream API
/// answers, acknowledgements, key-value watches all arrive on its inbox).
fn service_base() -> Permissions {
    Permissions::default()
        .publish(["$JS.API.INFO".to_owned()])
        .subscribe(["_INBOX.>".to_owned()])
}

fn worker() -> Permissions {
    let mut grant = service_base();
    grant.grant(stream(EVENTS_STREAM, true));
    grant.grant(stream(DEAD_LETTER_STREAM, true));
    grant.grant(stream(NOTIFY_STREAM, true));
    grant.grant(stream(AUDIT_STREAM, true));
    grant.grant(bucket(LEASES_BUCKET, true));
    grant.grant(bucket(WORKERS_BUCKET, true));
    grant.grant(bucket(CUSTOMERS_BUCKET, false));
    grant.grant(bucket(CATALOG_BUCKET, false));
    grant
        .publish([
            // A reserve-and-record request's event, for the customer its subject names.
            format!("{EVENTS_SUBJECT_PREFIX}.*"),
            format!("{DEAD_LETTER_PREFIX}.>"),
            format!("{NOTIFY_PREFIX}.>"),
            // A request sent on a customer's partition before the count grew, forwarded
            // to its partition now.
            format!("{CHECK_PREFIX}.*.*"),
            format!("{RECORD_PREFIX}.*.*"),
        ])
        .subscribe([
            format!("{CHECK_PREFIX}.*.*"),
            format!("{RECORD_PREFIX}.*.*"),
        ])
        .answering()
}

fn api() -> Permissions {
    let mut grant = service_base();
    grant.grant(stream(EVENTS_STREAM, true));
    grant.grant(stream(DEAD_LETTER_STREAM, true));
    grant.grant(stream(NOTIFY_STREAM, true));
    grant.grant(stream(AUDIT_STREAM, true));
    for name in [
        CUSTOMERS_BUCKET,
        CATALOG_BUCKET,
        KEYS_BUCKET,
        LICENSE_KEYS_BUCKET,
        IDEMPOTENCY_BUCKET,
        ACCESS_REQUESTS_BUCKET,
    ] {
        grant.grant(bucket(name, true));
    }
    grant.grant(bucket(LEASES_BUCKET, false));
    grant.grant(bucket(WORKERS_BUCKET, false));
    grant
        .publish([
            format!("{EVENTS_SUBJECT_PREFIX}.*"),
            format!("{CHECK_PREFIX}.*.*"),
            format!("{RECORD_PREFIX}.*.*"),
            format!("{AUDIT_PREFIX}.>"),
        ])
        .subscribe([AUTH_CALLOUT_SUBJECT.to_owned()])
        .answering()
}

impl Permissions {
    fn answering(mut self) -> Self {
        self.responses = true;
        self
    }
}

/// What a Tally API key may do on NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAccess {
    /// Publish events (an `ingest` key).
    Events,
    /// Publish events, ask for checks and reserve-and-record (an `sdk` key).
    Application,
    /// Receive notifications (a `notifications` key).
    Notifications,
    /// Ask for checks and receive notifications, read-only (a `portal` key).
    Portal,
}

/// The inbox prefix a key's connection must use for its replies: `_INBOX.<key id>`.
/// Replies to one application's requests cannot be read by another's.
pub fn inbox_prefix(key_id: &str) -> String {
    format!("_INBOX.{key_id}")
}

/// The permissions of a connection made with API key `key_id`, limited to `customers`
/// (all customers when empty).
pub fn for_key(access: KeyAccess, key_id: &str, customers: &[String]) -> Permissions {
    let tokens: Vec<String> = if customers.is_empty() {
        vec!["*".to_owned()]
    } else {
        customers.iter().map(|c| customer_token(c)).collect()
    };
    let per_customer = |pattern: &dyn Fn(&str) -> String| -> Vec<String> {
        tokens.iter().map(|t| pattern(t)).collect()
    };
    let events = per_customer(&|t| format!("{EVENTS_SUBJECT_PREFIX}.{t}"));
    let checks = per_customer(&|t| format!("{CHECK_PREFIX}.*.{t}"));
    let records = per_customer(&|t| format!("{RECORD_PREFIX}.*.{t}"));
    let notices = per_customer(&|t| format!("{NOTIFY_PREFIX}.*.{t}"));
    let inbox = vec![format!("{}.>", inbox_prefix(key_id))];
    match access {
        KeyAccess::Events => Permissions::default().publish(events).subscribe(inbox),
        KeyAccess::Application => Permissions::default()
            .publish(events.into_iter().chain(checks).chain(records))
            .subscribe(inbox),
        KeyAccess::Notifications => Permissions::default().subscribe(notices),
        KeyAccess::Portal => Permissions::default()
            .publish(checks)
            .subscribe(notices.into_iter().chain(inbox)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_application_key_reaches_only_its_customers_and_no_jetstream_api() {
        let p = for_key(
            KeyAccess::Application,
            "ab12",
            &["acme".to_owned(), "a b".to_owned()],
        );
        assert!(p.publish.contains(&"tally.events.acme".to_owned()));
        assert!(p.publish.contains(&"tally.events.~612062".to_owned()));
        assert!(p.publish.contains(&"tally.check.*.acme".to_owned()));
        assert!(p.publish.iter().all(|s| !s.starts_with('$')), "{p:?}");
        assert_eq!(p.subscribe, vec!["_INBOX.ab12.>".to_owned()]);
        assert!(!p.responses);
    }

    #[test]
    fn a_worker_cannot_touch_the_api_keys() {
        let p = Service::Worker.permissions();
        assert!(p.publish.iter().all(|s| !s.contains(KEYS_BUCKET)), "{p:?}");
        assert!(p.publish.iter().any(|s| s == "$KV.tally_leases.>"));
        assert!(!p.publish.iter().any(|s| s.contains("STREAM.DELETE")));
    }
}
