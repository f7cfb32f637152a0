//! The quota engine: decides every usage event against the customer's entitlement, held
//! in memory, and says when a notification is due.
//!
//! Synchronous and free of I/O: the ingest worker owns one [`Engine`] for the customers of
//! its partitions, feeds it the definitions it reads from the key-value buckets, and asks
//! it for a [`Decision`] per event. The rules, in the order they apply:
//!
//! 1. No entitlement for the customer: `unknown_customer`.
//! 2. Suspended, or the event's time outside `[valid_from, valid_until)`: `expired`.
//! 3. A geo-fence that does not list the event's region (or an event without one):
//!    `region_blocked`.
//! 4. A feature that neither the plan nor an add-on turns on: `not_entitled`.
//! 5. A new distinct user beyond the seats (of the feature, or of the whole plan):
//!    `seat_limit`. A user holds a seat once one of their events is counted.
//! 6. Boolean and static features: `accepted`, never counted.
//! 7. Metered features count per usage period (the event's time decides the period). An
//!    event older than the counter's open period is `late`: stored, not counted. The
//!    period's limit is used first, then grants in priority order (lowest first), then
//!    earliest expiry. An event that fits is `accepted`; one that does not is refused
//!    whole under a hard limit (`limit_reached`) and counted as `overage` under a soft one.
//!
//! Crossing a threshold percentage of the limit, the first refusal of a period, and a grant
//! running dry each yield one [`Notice`] per period. Which were sent is kept with the
//! counter, so a check or a repeated definition never sends one twice.

mod account;

use std::collections::BTreeMap;
use std::sync::Arc;

use hashbrown::HashMap;
use tally_core::Decision;
use tally_core::entitlement::{AddOn, Customer, Plan};
use tally_core::event::{Event, Invalid};
use tally_core::meter::{self, Binding, Feature, Measure, Meter};
use tally_core::snapshot;

use account::{Account, Compiled, Shared};

type Map<K, V> = HashMap<K, V, foldhash::fast::FixedState>;

/// One usage event as the engine sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage<'a> {
    pub customer: &'a str,
    pub feature: &'a str,
    pub quantity: f64,
    /// When the usage happened, in microseconds since the Unix epoch.
    pub time: i64,
    pub region: Option<&'a str>,
    pub user: Option<&'a str>,
}

/// A notification the worker publishes (subject `tally.notify.<kind>.<customer>`).
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub kind: NoticeKind,
    pub customer: String,
    pub feature: String,
    pub plan: String,
    /// Quantity counted in the period so far, overage and grants included.
    pub usage: f64,
    /// The period's limit (before grants).
    pub limit: f64,
    /// `usage` as a percentage of `limit`.
    pub percent: f64,
    pub period_start: i64,
    pub period_end: i64,
    /// The plan that would lift the limit.
    pub next_plan: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoticeKind {
    /// Usage reached this percentage of the limit.
    Threshold(u32),
    /// The first event of the period refused by a hard limit.
    LimitReached,
    /// A grant (by id) has nothing left.
    GrantExhausted(String),
}

impl NoticeKind {
    /// The subject token: `threshold`, `limit_reached`, `grant_exhausted`.
    pub fn as_str(&self) -> &'static str {
        match self {
            NoticeKind::Threshold(_) => "threshold",
            NoticeKind::LimitReached => "limit_reached",
            NoticeKind::GrantExhausted(_) => "grant_exhausted",
        }
    }
}

/// What a check reports about one feature, without recording anything.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// The decision an event of the asked quantity would get now.
    pub decision: Decision,
    /// Quantity counted in the open period.
    pub usage: f64,
    /// The period's limit; `None`: unlimited or not metered.
    pub limit: Option<f64>,
    /// What is left of the limit and the usable grants; `None`: unlimited or not metered.
    pub remaining: Option<f64>,
    /// When the open period ends (microseconds since the epoch).
    pub resets_at: Option<i64>,
    /// A static feature's value.
    pub value: Option<serde_json::Value>,
}

/// The definitions and counters of the customers one worker owns.
#[derive(Default)]
pub struct Engine {
    plans: Map<String, Arc<Plan>>,
    addons: Map<String, Arc<AddOn>>,
    /// By the 128-bit XXH3 hash of the customer id: the lookup compares 16 bytes in the
    /// table instead of following a pointer to a string (a collision between two ids is as
    /// unlikely as between two random UUIDs).
    accounts: Map<u128, Account>,
    /// Feature names as small integers, so that an account finds its feature by number.
    features: Map<Box<str>, u32>,
    feature_names: Vec<Box<str>>,
    shared: Shared,
    /// Live meters by slug, and the features bound to them by key.
    meters: BTreeMap<String, Meter>,
    bound: BTreeMap<String, Feature>,
    /// The bindings of live meters, by the event type they read.
    bindings: Map<Box<str>, Arc<[Binding]>>,
    /// How each bound feature counts (a feature not here adds quantities).
    measures: Map<String, Measure>,
}

/// What a feature bound to a meter read of one event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading<'a> {
    pub feature: &'a str,
    /// The value to add, or to hold (1 for a distinct value).
    pub quantity: f64,
    /// A `UNIQUE_COUNT` value's key ([`value_key`]): counted once per period.
    pub distinct: Option<u64>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("plans", &self.plans.len())
            .field("addons", &self.addons.len())
            .field("customers", &self.accounts.len())
            .field("counters", &self.counters())
            .finish()
    }
}

impl Engine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a plan; its customers are decided against it from the next event.
    pub fn upsert_plan(&mut self, plan: Plan) {
        let id = plan.id.clone();
        self.plans.insert(id.clone(), Arc::new(plan));
        self.recompile(|c| c.plan == id);
    }

    /// Removes a plan: its customers are entitled to nothing until it returns.
    pub fn remove_plan(&mut self, id: &str) {
        self.plans.remove(id);
        self.recompile(|c| c.plan == id);
    }

    pub fn upsert_addon(&mut self, addon: AddOn) {
        let id = addon.id.clone();
        self.addons.insert(id.clone(), Arc::new(addon));
        self.recompile(|c| c.addons.iter().any(|a| a.id == id));
    }

    pub fn remove_addon(&mut self, id: &str) {
        self.addons.remove(id);
        self.recompile(|c| c.addons.iter().any(|a| a.id == id));
    }

    /// Adds or replaces a customer. Counters, seats and grant balances carry over, so an
    /// upgrade or a downgrade decides the next event against the new limits and undoes
    /// nothing already counted.
    pub fn upsert_customer(&mut self, customer: Customer) {
        let old = self.accounts.remove(&customer_key(&customer.id));
        let account = self.compile(Arc::new(customer), old);
        self.accounts
            .insert(customer_key(&account.customer.id), account);
    }

    pub fn remove_customer(&mut self, id: &str) {
        self.accounts.remove(&customer_key(id));
    }

    /// The definition a customer is decided against.
    pub fn customer(&self, id: &str) -> Option<&Customer> {
        self.accounts.get(&customer_key(id)).map(|a| &*a.customer)
    }

    /// The features a customer's plan and add-ons name, sorted; empty for an unknown
    /// customer.
    pub fn features_of(&self, id: &str) -> Vec<String> {
        let Some(customer) = self.customer(id) else {
            return Vec::new();
        };
        let mut features: Vec<String> = self
            .plans
            .get(&customer.plan)
            .into_iter()
            .flat_map(|p| p.features.keys())
            .chain(
                customer
                    .addons
                    .iter()
                    .filter_map(|a| self.addons.get(&a.id))
                    .flat_map(|a| a.features.keys().chain(a.extra.keys())),
            )
            .cloned()
            .collect();
        features.sort_unstable();
        features.dedup();
        features
    }

    pub fn plan(&self, id: &str) -> Option<&Plan> {
        self.plans.get(id).map(|p| &**p)
    }

    /// Customers known.
    pub fn customers(&self) -> usize {
        self.accounts.len()
    }

    /// Customer × feature counters held (those of features a customer no longer has
    /// included: they keep what the period counted).
    pub fn counters(&self) -> usize {
        self.accounts.values().map(|a| a.slots.len()).sum()
    }

    /// Adds or replaces a meter (a deleted one binds nothing).
    pub fn upsert_meter(&mut self, meter: Meter) {
        if meter.is_deleted() {
            self.meters.remove(&meter.slug);
        } else {
            self.meters.insert(meter.slug.clone(), meter);
        }
        self.rebind();
    }

    pub fn remove_meter(&mut self, slug: &str) {
        self.meters.remove(slug);
        self.rebind();
    }

    /// Adds or replaces a feature bound to a meter: its entitlements count what the meter
    /// reads from the next event on.
    pub fn upsert_feature(&mut self, feature: Feature) {
        self.bound.insert(feature.key.clone(), feature);
        self.rebind();
    }

    pub fn remove_feature(&mut self, key: &str) {
        self.bound.remove(key);
        self.rebind();
    }

    /// The features bound to live meters of events of `event_type`; `None` when there are
    /// none (the event counts for its own feature and quantity).
    pub fn bindings(&self, event_type: &str) -> Option<Arc<[Binding]>> {
        if self.bindings.is_empty() {
            return None;
        }
        self.bindings.get(event_type).cloned()
    }

    /// Rebuilds the bindings from the meters and features; accounts are rebuilt when a
    /// feature's measure changes.
    fn rebind(&mut self) {
        let mut by_type: BTreeMap<&str, Vec<Binding>> = BTreeMap::new();
        let mut measures = Map::default();
        for feature in self.bound.values() {
            let Some(b) = self
                .meters
                .get(&feature.meter_slug)
                .and_then(|m| Binding::new(feature, m))
            else {
                continue;
            };
            measures.insert(b.feature.clone(), b.measure);
            by_type
                .entry(self.meters[&feature.meter_slug].event_type.as_str())
                .or_default()
                .push(b);
        }
        self.bindings = by_type
            .into_iter()
            .map(|(t, b)| (Box::from(t), Arc::from(b)))
            .collect();
        if measures != self.measures {
            self.measures = measures;
            self.recompile(|_| true);
        }
    }

    /// Decides an event that features bound to meters read (`readings`, at least one)
    /// and records it. The event is one decision: refused whole when any feature refuses
    /// it (the first refusal is the decision, recorded on that feature alone), else
    /// counted by each, `overage` when any counts it as overage, `accepted` when any
    /// accepts it, and `late` when every feature's period has moved past it.
    pub fn decide_readings<'u>(
        &mut self,
        usage: &Usage<'u>,
        readings: &[Reading<'u>],
        notices: &mut Vec<Notice>,
    ) -> (Decision, Option<&str>) {
        let Some(account) = self.accounts.get_mut(&customer_key(usage.customer)) else {
            return (Decision::UnknownCustomer, None);
        };
        let names = self.feature_names.as_slice();
        fn one<'u>(usage: &Usage<'u>, r: &Reading<'u>) -> Usage<'u> {
            Usage {
                feature: r.feature,
                quantity: r.quantity,
                ..*usage
            }
        }
        for r in readings {
            let slot = self.features.get(r.feature).copied();
            let d = account.decide(&one(usage, r), slot, names, None, r.distinct);
            if !d.is_billable() && d != Decision::Late {
                let d = account.decide(&one(usage, r), slot, names, Some(notices), r.distinct);
                return (d, Some(account.plan_id()));
            }
        }
        let mut decision = Decision::Late;
        for r in readings {
            let slot = self.features.get(r.feature).copied();
            let d = account.decide(&one(usage, r), slot, names, Some(notices), r.distinct);
            decision = match (decision, d) {
                (Decision::Overage, _) | (_, Decision::Overage) => Decision::Overage,
                (Decision::Accepted, _) | (_, Decision::Accepted) => Decision::Accepted,
                (d, _) => d,
            };
        }
        (decision, Some(account.plan_id()))
    }

    /// [`replay`](Self::replay) for an event that bound features read: each counts it as
    /// it did when `decision` was taken (a refusal moves only the features that refuse it
    /// now, as the one that did then).
    pub fn replay_readings(
        &mut self,
        usage: &Usage<'_>,
        readings: &[Reading<'_>],
        decision: Decision,
        notices: &mut Vec<Notice>,
    ) {
        let Some(account) = self.accounts.get_mut(&customer_key(usage.customer)) else {
            return;
        };
        let names = self.feature_names.as_slice();
        for r in readings {
            let one = Usage {
                feature: r.feature,
                quantity: r.quantity,
                ..*usage
            };
            let slot = self.features.get(r.feature).copied();
            if decision == Decision::LimitReached
                && account.decide(&one, slot, names, None, r.distinct) != decision
            {
                continue;
            }
            account.replay(&one, slot, names, notices, decision, r.distinct);
        }
    }

    /// Decides one event and records it: counters, seats and grants move, and any
    /// notification that falls due is appended to `notices`.
    pub fn decide(&mut self, usage: &Usage<'_>, notices: &mut Vec<Notice>) -> Decision {
        self.decide_under_plan(usage, notices).0
    }

    /// [`decide`](Self::decide), and the plan the customer is on (the lake records it
    /// with the decision), from the one lookup of the customer.
    pub fn decide_under_plan(
        &mut self,
        usage: &Usage<'_>,
        notices: &mut Vec<Notice>,
    ) -> (Decision, Option<&str>) {
        let Some(account) = self.accounts.get_mut(&customer_key(usage.customer)) else {
            return (Decision::UnknownCustomer, None);
        };
        let slot = self.features.get(usage.feature).copied();
        let decision = account.decide(
            usage,
            slot,
            self.feature_names.as_slice(),
            Some(notices),
            None,
        );
        (decision, Some(account.plan_id()))
    }

    /// Records an event decided before (as the lake stored it with `decision`), as it was
    /// recorded then: how a worker that takes a partition over catches up on the events
    /// stored after the partition's last checkpoint. Notices fall due as they did then.
    pub fn replay(&mut self, usage: &Usage<'_>, decision: Decision, notices: &mut Vec<Notice>) {
        if let Some(account) = self.accounts.get_mut(&customer_key(usage.customer)) {
            let slot = self.features.get(usage.feature).copied();
            account.replay(
                usage,
                slot,
                self.feature_names.as_slice(),
                notices,
                decision,
                None,
            );
        }
    }

    /// What every customer has counted: the engine's part of a checkpoint.
    pub fn snapshot(&self) -> Vec<snapshot::Account> {
        self.accounts
            .values()
            .filter_map(|a| a.export(&self.feature_names))
            .collect()
    }

    /// Replaces every count with what a checkpoint counted, for the customers defined here
    /// (load the definitions first): a customer the checkpoint does not name starts from
    /// nothing. A count carries over as it does across a definition change.
    pub fn restore(&mut self, accounts: Vec<snapshot::Account>) {
        let mut restored: Map<u128, Account> = Map::default();
        for state in accounts {
            let key = customer_key(&state.customer);
            let Some(account) = self.accounts.remove(&key) else {
                continue;
            };
            let customer = account.customer.clone();
            let off = self.shared.off();
            let names = &mut self.feature_names;
            let features = &mut self.features;
            let old = Account::from_state(state, customer.clone(), &off, &mut |name| {
                intern(features, names, name)
            });
            restored.insert(key, self.compile(customer, Some(old)));
        }
        // Customers the checkpoint does not name start from nothing.
        self.recompile_fresh();
        self.accounts.extend(restored);
    }

    /// What an event of `usage.quantity` would get now, and the feature's balance,
    /// recording nothing.
    pub fn check(&mut self, usage: &Usage<'_>) -> Check {
        let Some(account) = self.accounts.get_mut(&customer_key(usage.customer)) else {
            return Check::refused(Decision::UnknownCustomer);
        };
        let slot = self.features.get(usage.feature).copied();
        let decision = account.decide(usage, slot, self.feature_names.as_slice(), None, None);
        account.balance(usage, slot, decision)
    }

    /// Rebuilds every account with nothing counted.
    fn recompile_fresh(&mut self) {
        let keys: Vec<u128> = self.accounts.keys().copied().collect();
        for key in keys {
            if let Some(old) = self.accounts.remove(&key) {
                let account = self.compile(old.customer.clone(), None);
                self.accounts.insert(key, account);
            }
        }
    }

    fn recompile(&mut self, affected: impl Fn(&Customer) -> bool) {
        let ids: Vec<u128> = self
            .accounts
            .iter()
            .filter(|(_, a)| affected(&a.customer))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(old) = self.accounts.remove(&id) {
                let customer = old.customer.clone();
                let account = self.compile(customer, Some(old));
                self.accounts.insert(id, account);
            }
        }
    }

    fn compile(&mut self, customer: Arc<Customer>, old: Option<Account>) -> Account {
        let plan = self.plans.get(&customer.plan).cloned();
        let addons: Vec<(Arc<AddOn>, u32)> = customer
            .addons
            .iter()
            .filter_map(|r| self.addons.get(&r.id).map(|a| (a.clone(), r.quantity)))
            .collect();
        let compiled = Compiled::new(&customer, plan, &addons, &mut self.shared, &self.measures);
        let features = &mut self.features;
        let names = &mut self.feature_names;
        Account::build(
            customer,
            compiled,
            &mut |name| intern(features, names, name),
            old,
        )
    }
}

/// A feature's number, given on first sight.
fn intern(features: &mut Map<Box<str>, u32>, names: &mut Vec<Box<str>>, name: &str) -> u32 {
    if let Some(&id) = features.get(name) {
        return id;
    }
    let id = u32::try_from(names.len()).unwrap_or(u32::MAX);
    features.insert(name.into(), id);
    names.push(name.into());
    id
}

impl Check {
    fn refused(decision: Decision) -> Check {
        Check {
            decision,
            usage: 0.0,
            limit: None,
            remaining: None,
            resets_at: None,
            value: None,
        }
    }
}

fn customer_key(id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(id.as_bytes())
}

/// What `bindings` (of the event's type: [`Engine::bindings`]) read of `event` at `time`
/// (µs): the ingest worker and the replay after a take-over read events with it alike. A
/// value a bound meter cannot read refuses the event, naming the field.
pub fn readings<'b>(
    bindings: &'b [Binding],
    event: &Event<'_>,
    time: i64,
) -> Result<Vec<Reading<'b>>, Invalid> {
    let mut data = None;
    let mut out = Vec::with_capacity(bindings.len());
    for b in bindings {
        let (quantity, distinct) = match b.read(event, time, &mut data)? {
            meter::Reading::Skip => continue,
            meter::Reading::Quantity(q) => (q, None),
            meter::Reading::Distinct(text) => (1.0, Some(value_key(&text))),
        };
        out.push(Reading {
            feature: &b.feature,
            quantity,
            distinct,
        });
    }
    Ok(out)
}

/// The key of a `UNIQUE_COUNT` value (its text) in a [`Reading`].
pub fn value_key(text: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

/// A 64-bit key for a user id in a seat set.
fn user_key(user: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(user.as_bytes())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::{DateTime, Utc};
    use tally_core::entitlement::{Enforcement, Entitlement, Grant, Metered, UsagePeriod};

    use super::*;

    fn at(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_micros()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn metered(limit: f64, enforcement: Enforcement) -> Entitlement {
        let mut m = Metered::new(Some(limit));
        m.enforcement = enforcement;
        m.next_plan = Some("pro".to_owned());
        Entitlement::Metered(m)
    }

    fn plan(id: &str, features: &[(&str, Entitlement)]) -> Plan {
        Plan {
            id: id.to_owned(),
            name: id.to_owned(),
            features: features
                .iter()
                .map(|(f, e)| ((*f).to_owned(), e.clone()))
                .collect::<BTreeMap<_, _>>(),
            seats: None,
            prices: None,
        }
    }

    fn engine(features: &[(&str, Entitlement)]) -> Engine {
        let mut e = Engine::new();
        e.upsert_plan(plan("free", features));
        e.upsert_customer(Customer::new("acme", "free"));
        e
    }

    fn usage<'a>(feature: &'a str, quantity: f64, time: &str) -> Usage<'a> {
        Usage {
            customer: "acme",
            feature,
            quantity,
            time: at(time),
            region: None,
            user: None,
        }
    }

    fn use_(e: &mut Engine, feature: &str, quantity: f64, time: &str) -> (Decision, Vec<Notice>) {
        let mut notices = Vec::new();
        (
            e.decide(&usage(feature, quantity, time), &mut notices),
            notices,
        )
    }

    #[test]
    fn a_hard_limit_refuses_the_event_that_would_cross_it_whole() {
        let mut e = engine(&[("calls", metered(10.0, Enforcement::Hard))]);
        assert_eq!(
            use_(&mut e, "calls", 7.0, "2026-11-02T00:00:00Z").0,
            Decision::Accepted
        );
        let (d, notices) = use_(&mut e, "calls", 4.0, "2026-11-02T01:00:00Z");
        assert_eq!(d, Decision::LimitReached);
        assert_eq!(notices[0].kind, NoticeKind::LimitReached);
        assert_eq!((notices[0].usage, notices[0].limit), (7.0, 10.0));
        assert_eq!(notices[0].next_plan.as_deref(), Some("pro"));
        // Nothing of the refused event was counted: 3 still fit, once.
        assert_eq!(
            use_(&mut e, "calls", 3.0, "2026-11-02T02:00:00Z").0,
            Decision::Accepted
        );
        let (d, notices) = use_(&mut e, "calls", 1.0, "2026-11-02T03:00:00Z");
        assert_eq!((d, notices.len()), (Decision::LimitReached, 0));
        // The next month starts empty.
        assert_eq!(
            use_(&mut e, "calls", 10.0, "2026-12-01T00:00:00Z").0,
            Decision::Accepted
        );
    }

    #[test]
    fn a_soft_limit_counts_overage_and_thresholds_notify_once_per_period() {
        let mut e = engine(&[("calls", metered(10.0, Enforcement::Soft))]);
        let (d, n) = use_(&mut e, "calls", 8.0, "2026-11-02T00:00:00Z");
        assert_eq!(d, Decision::Accepted);
        assert_eq!(
            n.iter().map(|n| n.kind.clone()).collect::<Vec<_>>(),
            [NoticeKind::Threshold(80)]
        );
        assert_eq!(n[0].period_start, at("2026-11-01T00:00:00Z"));
        assert_eq!(n[0].period_end, at("2026-12-01T00:00:00Z"));
        let (d, n) = use_(&mut e, "calls", 5.0, "2026-11-03T00:00:00Z");
        assert_eq!(d, Decision::Overage);
        assert_eq!(n[0].kind, NoticeKind::Threshold(100));
        assert_eq!(n[0].percent, 130.0);
        let (d, n) = use_(&mut e, "calls", 5.0, "2026-11-04T00:00:00Z");
        assert_eq!((d, n.len()), (Decision::Overage, 0));
    }

    #[test]
    fn grants_burn_after_the_limit_by_priority_then_expiry_and_expire_whole() {
        let mut e = engine(&[("calls", metered(10.0, Enforcement::Hard))]);
        let grant = |id: &str, amount, priority, expires: Option<&str>| Grant {
            id: id.to_owned(),
            feature: "calls".to_owned(),
            amount,
            effective: utc("2026-11-01T00:00:00Z"),
            expires: expires.map(utc),
            priority,
            recurring: None,
        };
        let mut acme = Customer::new("acme", "free");
        acme.grants = vec![
            grant("late-expiry", 5.0, 1, Some("2026-11-20T00:00:00Z")),
            grant("low-priority", 5.0, 2, None),
            grant("early-expiry", 5.0, 1, Some("2026-11-10T00:00:00Z")),
        ];
        e.upsert_customer(acme);
        // 10 from the limit, then 3 from the priority-1 grant that expires first.
        assert_eq!(
            use_(&mut e, "calls", 13.0, "2026-11-05T00:00:00Z").0,
            Decision::Accepted
        );
        let check = |e: &mut Engine, time| e.check(&usage("calls", 1.0, time));
        assert_eq!(check(&mut e, "2026-11-05T00:00:00Z").remaining, Some(12.0));
        // After the early grant expires its last 2 are gone: 5 + 5 are left.
        assert_eq!(check(&mut e, "2026-11-12T00:00:00Z").remaining, Some(10.0));
        let (d, n) = use_(&mut e, "calls", 6.0, "2026-11-12T00:00:00Z");
        assert_eq!(d, Decision::Accepted);
        assert_eq!(
            n[0].kind,
            NoticeKind::GrantExhausted("late-expiry".to_owned())
        );
        assert_eq!(check(&mut e, "2026-11-12T00:00:00Z").remaining, Some(4.0));
    }

    #[test]
    fn an_upgrade_applies_to_the_next_event_and_a_downgrade_undoes_nothing() {
        let mut e = engine(&[("calls", metered(10.0, Enforcement::Hard))]);
        e.upsert_plan(plan("pro", &[("calls", metered(100.0, Enforcement::Hard))]));
        assert_eq!(
            use_(&mut e, "calls", 10.0, "2026-11-02T00:00:00Z").0,
            Decision::Accepted
        );
        assert_eq!(
            use_(&mut e, "calls", 1.0, "2026-11-02T00:01:00Z").0,
            Decision::LimitReached
        );
        e.upsert_customer(Customer::new("acme", "pro"));
        assert_eq!(
            use_(&mut e, "calls", 80.0, "2026-11-02T00:02:00Z").0,
            Decision::Accepted
        );
        // Back on free with 90 counted: refused, and the usage stays.
        e.upsert_customer(Customer::new("acme", "free"));
        assert_eq!(
            use_(&mut e, "calls", 1.0, "2026-11-02T00:03:00Z").0,
            Decision::LimitReached
        );
        let balance = e.check(&usage("calls", 1.0, "2026-11-02T00:04:00Z"));
        assert_eq!((balance.usage, balance.remaining), (90.0, Some(0.0)));
        assert_eq!(balance.resets_at, Some(at("2026-12-01T00:00:00Z")));
    }

    #[test]
    fn seats_validity_regions_and_unknown_customers() {
        let mut e = engine(&[("export", Entitlement::Boolean { enabled: true })]);
        let mut acme = Customer::new("acme", "free");
        acme.seats = Some(2);
        acme.regions = vec!["eu".to_owned()];
        acme.valid_until = Some(utc("2026-12-01T00:00:00Z"));
        e.upsert_customer(acme);
        let mut decide = |customer, user, region, time| {
            e.decide(
                &Usage {
                    customer,
                    feature: "export",
                    quantity: 1.0,
                    time: at(time),
                    region,
                    user,
                },
                &mut Vec::new(),
            )
        };
        let t = "2026-11-02T00:00:00Z";
        assert_eq!(
            decide("acme", Some("u1"), Some("eu"), t),
            Decision::Accepted
        );
        assert_eq!(
            decide("acme", Some("u2"), Some("eu"), t),
            Decision::Accepted
        );
        assert_eq!(
            decide("acme", Some("u3"), Some("eu"), t),
            Decision::SeatLimit
        );
        assert_eq!(
            decide("acme", Some("u1"), Some("eu"), t),
            Decision::Accepted
        );
        assert_eq!(decide("acme", None, Some("us"), t), Decision::RegionBlocked);
        assert_eq!(decide("acme", None, None, t), Decision::RegionBlocked);
        assert_eq!(
            decide("acme", None, Some("eu"), "2026-12-01T00:00:00Z"),
            Decision::Expired
        );
        assert_eq!(decide("globex", None, None, t), Decision::UnknownCustomer);
    }

    #[test]
    fn catalogues_of_more_than_64_features_find_every_one() {
        let many: Vec<(String, Entitlement)> = (0..70)
            .map(|i| (format!("f{i}"), metered(f64::from(i), Enforcement::Hard)))
            .collect();
        let refs: Vec<(&str, Entitlement)> =
            many.iter().map(|(f, e)| (f.as_str(), e.clone())).collect();
        // The customer's plan skips some: numbers past 63 are searched, not looked up.
        let mut e = engine(&refs[..40]);
        e.upsert_plan(plan("big", &refs));
        e.upsert_customer(Customer::new("acme", "big"));
        let t = "2026-11-02T00:00:00Z";
        for i in [0, 39, 63, 64, 69] {
            let f = format!("f{i}");
            assert_eq!(
                use_(&mut e, &f, f64::from(i), t).0,
                Decision::Accepted,
                "{f}"
            );
            assert_eq!(use_(&mut e, &f, 1.0, t).0, Decision::LimitReached, "{f}");
        }
        assert_eq!(use_(&mut e, "f70", 1.0, t).0, Decision::NotEntitled);
    }

    #[test]
    fn billing_anchored_periods_and_late_events() {
        let mut m = Metered::new(Some(5.0));
        m.period = UsagePeriod::Billing;
        let mut e = engine(&[("calls", Entitlement::Metered(m))]);
        let mut acme = Customer::new("acme", "free");
        acme.anchor_day = 15;
        e.upsert_customer(acme);
        assert_eq!(
            use_(&mut e, "calls", 5.0, "2026-11-14T23:00:00Z").0,
            Decision::Accepted
        );
        assert_eq!(
            use_(&mut e, "calls", 5.0, "2026-11-15T00:00:00Z").0,
            Decision::Accepted
        );
        // The previous period is closed for this counter.
        assert_eq!(
            use_(&mut e, "calls", 1.0, "2026-11-14T23:30:00Z").0,
            Decision::Late
        );
        assert_eq!(
            use_(&mut e, "storage", 1.0, "2026-11-15T00:00:00Z").0,
            Decision::NotEntitled
        );
    }

    /// A meter of `aggregation` on events of type `build`, grouped by `repo`.
    fn meter(slug: &str, aggregation: meter::Aggregation, value: Option<&str>) -> Meter {
        serde_json::from_value(serde_json::json!({
            "slug": slug,
            "eventType": "build",
            "aggregation": aggregation,
            "valueProperty": value,
            "groupBy": {"repo": "$.repo"},
        }))
        .unwrap()
    }

    fn bind(e: &mut Engine, key: &str, m: Meter, filters: &[(&str, &str)]) {
        e.upsert_feature(Feature {
            key: key.to_owned(),
            id: String::new(),
            name: None,
            meter_slug: m.slug.clone(),
            meter_group_by_filters: filters
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            metadata: BTreeMap::new(),
            created_at: None,
            updated_at: None,
            archived_at: None,
        });
        e.upsert_meter(m);
    }

    /// A `build` event of acme's with `data`, as the decoder makes it.
    fn build_event(data: &serde_json::Value) -> Event<'static> {
        Event {
            id: "e".into(),
            source: "s".into(),
            event_type: "build".into(),
            subject: "acme".into(),
            time: None,
            feature: "build".into(),
            quantity: 1.0,
            region: None,
            user: None,
            extra: Some(data.to_string()),
        }
    }

    /// Decides a `build` event with `data` at `time` as the worker does: the bindings
    /// read it, then the engine decides what they read.
    fn build(
        e: &mut Engine,
        data: serde_json::Value,
        time: &str,
    ) -> Result<(Decision, Vec<Notice>), Invalid> {
        let event = build_event(&data);
        let bindings = e.bindings("build").expect("bound");
        let readings = readings(&bindings, &event, at(time))?;
        let mut notices = Vec::new();
        let u = usage("build", 1.0, time);
        let d = if readings.is_empty() {
            e.decide(&u, &mut notices)
        } else {
            e.decide_readings(&u, &readings, &mut notices).0
        };
        Ok((d, notices))
    }

    fn used(e: &mut Engine, feature: &str, time: &str) -> f64 {
        e.check(&usage(feature, 0.0, time)).usage
    }

    #[test]
    fn a_max_meter_bounds_the_highest_value_of_the_period() {
        use tally_core::meter::Aggregation;
        let mut e = engine(&[("concurrent_builds", metered(10.0, Enforcement::Hard))]);
        bind(
            &mut e,
            "concurrent_builds",
            meter("running", Aggregation::Max, Some("$.running")),
            &[],
        );
        let d = |e: &mut Engine, running: f64, t: &str| {
            build(e, serde_json::json!({"running": running}), t)
                .unwrap()
                .0
        };
        assert_eq!(d(&mut e, 3.0, "2026-11-02T00:00:00Z"), Decision::Accepted);
        assert_eq!(d(&mut e, 9.0, "2026-11-02T00:01:00Z"), Decision::Accepted);
        assert_eq!(d(&mut e, 2.0, "2026-11-02T00:02:00Z"), Decision::Accepted);
        assert_eq!(
            used(&mut e, "concurrent_builds", "2026-11-02T00:03:00Z"),
            9.0
        );
        let (refused, notices) = build(
            &mut e,
            serde_json::json!({"running": "11"}),
            "2026-11-02T00:03:00Z",
        )
        .unwrap();
        assert_eq!(refused, Decision::LimitReached);
        assert!(
            notices.iter().any(|n| n.kind == NoticeKind::LimitReached),
            "{notices:?}"
        );
        assert_eq!(d(&mut e, 10.0, "2026-11-02T00:04:00Z"), Decision::Accepted);
        let check = e.check(&usage("concurrent_builds", 0.0, "2026-11-02T00:05:00Z"));
        assert_eq!(
            (check.usage, check.limit, check.remaining),
            (10.0, Some(10.0), Some(0.0))
        );
        // A new month starts from nothing.
        assert_eq!(
            used(&mut e, "concurrent_builds", "2026-12-01T00:00:00Z"),
            0.0
        );
    }

    #[test]
    fn a_latest_meter_holds_the_value_of_the_latest_event_by_time() {
        use tally_core::meter::Aggregation;
        let mut e = engine(&[("storage_gb", metered(100.0, Enforcement::Soft))]);
        bind(
            &mut e,
            "storage_gb",
            meter("stored", Aggregation::Latest, Some("$.gb")),
            &[],
        );
        let d = |e: &mut Engine, gb: f64, t: &str| {
            build(e, serde_json::json!({"gb": gb}), t).unwrap().0
        };
        assert_eq!(d(&mut e, 40.0, "2026-11-02T10:00:00Z"), Decision::Accepted);
        assert_eq!(d(&mut e, 120.0, "2026-11-02T11:00:00Z"), Decision::Overage);
        assert_eq!(used(&mut e, "storage_gb", "2026-11-02T12:00:00Z"), 120.0);
        assert_eq!(d(&mut e, 30.0, "2026-11-02T12:00:00Z"), Decision::Accepted);
        // An event from before the latest one is decided, and leaves the value alone.
        assert_eq!(d(&mut e, 90.0, "2026-11-02T09:00:00Z"), Decision::Accepted);
        assert_eq!(used(&mut e, "storage_gb", "2026-11-02T13:00:00Z"), 30.0);
    }

    #[test]
    fn a_unique_count_meter_counts_each_value_once_per_period() {
        use tally_core::meter::Aggregation;
        let mut e = engine(&[("repos", metered(2.0, Enforcement::Hard))]);
        bind(
            &mut e,
            "repos",
            meter("repos", Aggregation::UniqueCount, Some("$.repo")),
            &[],
        );
        let d = |e: &mut Engine, repo: &str, t: &str| {
            build(e, serde_json::json!({"repo": repo}), t).unwrap().0
        };
        assert_eq!(d(&mut e, "a", "2026-11-02T00:00:00Z"), Decision::Accepted);
        assert_eq!(d(&mut e, "b", "2026-11-02T00:01:00Z"), Decision::Accepted);
        assert_eq!(d(&mut e, "a", "2026-11-02T00:02:00Z"), Decision::Accepted);
        assert_eq!(
            d(&mut e, "c", "2026-11-02T00:03:00Z"),
            Decision::LimitReached
        );
        assert_eq!(used(&mut e, "repos", "2026-11-02T00:04:00Z"), 2.0);
        // What a checkpoint keeps: the values as well as the count.
        let saved = e.snapshot();
        let mut restored = engine(&[("repos", metered(2.0, Enforcement::Hard))]);
        bind(
            &mut restored,
            "repos",
            meter("repos", Aggregation::UniqueCount, Some("$.repo")),
            &[],
        );
        restored.restore(saved);
        assert_eq!(
            d(&mut restored, "b", "2026-11-03T00:00:00Z"),
            Decision::Accepted
        );
        assert_eq!(
            d(&mut restored, "c", "2026-11-03T00:00:00Z"),
            Decision::LimitReached
        );
        // Next month every value is new again.
        assert_eq!(
            d(&mut restored, "c", "2026-12-01T00:00:00Z"),
            Decision::Accepted
        );
        assert_eq!(used(&mut restored, "repos", "2026-12-01T00:01:00Z"), 1.0);
    }

    #[test]
    fn one_event_feeds_every_bound_feature_or_none_of_them() {
        use tally_core::meter::Aggregation;
        let mut e = engine(&[
            ("build_minutes", metered(100.0, Enforcement::Hard)),
            ("builds", metered(3.0, Enforcement::Hard)),
            ("main_builds", metered(1000.0, Enforcement::Soft)),
        ]);
        bind(
            &mut e,
            "build_minutes",
            meter("minutes", Aggregation::Sum, Some("$.minutes")),
            &[],
        );
        bind(
            &mut e,
            "builds",
            meter("builds", Aggregation::Count, None),
            &[],
        );
        bind(
            &mut e,
            "main_builds",
            meter("main", Aggregation::Count, None),
            &[("repo", "main")],
        );
        let d = |e: &mut Engine, minutes: f64, repo: &str, t: &str| {
            build(e, serde_json::json!({"minutes": minutes, "repo": repo}), t)
                .unwrap()
                .0
        };
        let t = "2026-11-02T00:00:00Z";
        assert_eq!(d(&mut e, 30.0, "main", t), Decision::Accepted);
        assert_eq!(d(&mut e, 30.0, "docs", t), Decision::Accepted);
        // Too many minutes: refused whole, so the count does not move either.
        assert_eq!(d(&mut e, 50.0, "main", t), Decision::LimitReached);
        assert_eq!(
            (
                used(&mut e, "build_minutes", t),
                used(&mut e, "builds", t),
                used(&mut e, "main_builds", t)
            ),
            (60.0, 2.0, 1.0)
        );
        assert_eq!(d(&mut e, 40.0, "main", t), Decision::Accepted);
        assert_eq!(
            (
                used(&mut e, "build_minutes", t),
                used(&mut e, "builds", t),
                used(&mut e, "main_builds", t)
            ),
            (100.0, 3.0, 2.0)
        );
        assert_eq!(
            d(&mut e, 0.0, "docs", t),
            Decision::LimitReached,
            "a fourth build"
        );
    }

    #[test]
    fn a_replayed_event_counts_as_it_was_decided() {
        use tally_core::meter::Aggregation;
        let features = [
            ("build_minutes", metered(100.0, Enforcement::Hard)),
            ("builds", metered(2.0, Enforcement::Soft)),
            ("repos", metered(5.0, Enforcement::Hard)),
        ];
        let setup = || {
            let mut e = engine(&features);
            bind(
                &mut e,
                "build_minutes",
                meter("minutes", Aggregation::Sum, Some("$.minutes")),
                &[],
            );
            bind(
                &mut e,
                "builds",
                meter("builds", Aggregation::Count, None),
                &[],
            );
            bind(
                &mut e,
                "repos",
                meter("repos", Aggregation::UniqueCount, Some("$.repo")),
                &[],
            );
            e
        };
        let mut live = setup();
        let mut again = setup();
        let events = [
            (30.0, "a"),
            (80.0, "b"),
            (20.0, "a"),
            (50.0, "c"),
            (10.0, "b"),
        ];
        for (i, (minutes, repo)) in events.into_iter().enumerate() {
            let t = format!("2026-11-02T00:0{i}:00Z");
            let data = serde_json::json!({"minutes": minutes, "repo": repo});
            let (decision, notices) = build(&mut live, data.clone(), &t).unwrap();
            let event = build_event(&data);
            let bindings = again.bindings("build").unwrap();
            let read = readings(&bindings, &event, at(&t)).unwrap();
            let mut replayed = Vec::new();
            again.replay_readings(&usage("build", 1.0, &t), &read, decision, &mut replayed);
            assert_eq!(replayed, notices, "event {i}");
        }
        assert_eq!(live.snapshot(), again.snapshot());
        let t = "2026-11-02T00:09:00Z";
        assert_eq!(
            (
                used(&mut live, "build_minutes", t),
                used(&mut live, "builds", t),
                used(&mut live, "repos", t)
            ),
            (100.0, 3.0, 2.0)
        );
    }

    #[test]
    fn a_value_a_bound_meter_cannot_read_names_its_field() {
        use tally_core::event::Reason;
        use tally_core::meter::Aggregation;
        let mut e = engine(&[("build_minutes", metered(100.0, Enforcement::Hard))]);
        bind(
            &mut e,
            "build_minutes",
            meter("minutes", Aggregation::Sum, Some("$.stats.minutes")),
            &[],
        );
        let t = "2026-11-02T00:00:00Z";
        for (data, wanted) in [
            (serde_json::json!({}), "is missing"),
            (
                serde_json::json!({"stats": {"minutes": null}}),
                "is missing",
            ),
            (
                serde_json::json!({"stats": {"minutes": "soon"}}),
                "not a number",
            ),
            (serde_json::json!({"stats": {"minutes": -4}}), "must be ≥ 0"),
        ] {
            let invalid = build(&mut e, data.clone(), t).unwrap_err();
            assert_eq!(invalid.reason, Reason::UnreadableValue, "{data}");
            assert_eq!(
                invalid.field.as_deref(),
                Some("data.stats.minutes"),
                "{data}"
            );
            assert!(
                invalid.message.contains(wanted),
                "{data}: {}",
                invalid.message
            );
            assert!(
                invalid.message.contains("build_minutes"),
                "{}",
                invalid.message
            );
        }
        assert_eq!(used(&mut e, "build_minutes", t), 0.0);
        assert_eq!(
            build(&mut e, serde_json::json!({"stats": {"minutes": "12.5"}}), t)
                .unwrap()
                .0,
            Decision::Accepted
        );
        assert_eq!(used(&mut e, "build_minutes", t), 12.5);
    }
}
