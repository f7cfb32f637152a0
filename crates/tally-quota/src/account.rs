//! One customer's compiled entitlement and its counters.

use std::collections::BTreeMap;
use std::sync::Arc;

use hashbrown::HashSet;
use tally_core::Decision;
use tally_core::entitlement::{
    AddOn, Customer, Enforcement, Entitlement, Grant, Plan, Status, UsagePeriod,
};
use tally_core::period::bounds;

use crate::{Check, Map, Notice, NoticeKind, Usage, user_key};

/// The bit of `Counter::notified` that records the period's first refusal.
const LIMIT_BIT: u64 = 1 << 63;

/// A feature's rule for one customer: the plan's entitlement with the add-ons applied.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Rule {
    Off,
    On,
    Static(Arc<serde_json::Value>),
    Metered(Metered),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Metered {
    /// `f64::INFINITY`: unlimited.
    limit: f64,
    period: UsagePeriod,
    hard: bool,
    /// Ascending; shared by every customer of the plan.
    thresholds: Arc<[u32]>,
    next_plan: Option<Arc<str>>,
    seats: Option<u32>,
}

/// Shares what many customers' rules hold alike, so that a counter stays small.
#[derive(Default)]
pub(crate) struct Shared {
    thresholds: Map<Vec<u32>, Arc<[u32]>>,
    names: Map<Box<str>, Arc<str>>,
}

impl Shared {
    fn thresholds(&mut self, list: &[u32]) -> Arc<[u32]> {
        let mut list = list.to_vec();
        list.sort_unstable();
        list.dedup();
        if let Some(t) = self.thresholds.get(&list) {
            return t.clone();
        }
        let shared: Arc<[u32]> = list.clone().into();
        self.thresholds.insert(list, shared.clone());
        shared
    }

    fn name(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        let shared: Arc<str> = name.into();
        self.names.insert(name.into(), shared.clone());
        shared
    }

    fn rule(&mut self, entitlement: &Entitlement) -> Rule {
        match entitlement {
            Entitlement::Boolean { enabled: true } => Rule::On,
            Entitlement::Boolean { enabled: false } => Rule::Off,
            Entitlement::Static { value } => Rule::Static(Arc::new(value.clone())),
            Entitlement::Metered(m) => Rule::Metered(Metered {
                limit: m.limit.unwrap_or(f64::INFINITY),
                period: m.period,
                hard: m.enforcement == Enforcement::Hard,
                thresholds: self.thresholds(&m.thresholds),
                next_plan: m.next_plan.as_deref().map(|p| self.name(p)),
                seats: m.seats,
            }),
        }
    }
}

/// A customer's features and seats, from the plan and the add-ons.
pub(crate) struct Compiled {
    features: BTreeMap<String, Rule>,
    seats: Option<u32>,
}

impl Compiled {
    /// Add-on features replace the plan's; add-on quantities raise metered limits, per
    /// unit bought. A plan that does not exist entitles to nothing.
    pub(crate) fn new(
        customer: &Customer,
        plan: Option<&Plan>,
        addons: &[(Arc<AddOn>, u32)],
        shared: &mut Shared,
    ) -> Compiled {
        let Some(plan) = plan else {
            return Compiled {
                features: BTreeMap::new(),
                seats: None,
            };
        };
        let mut features: BTreeMap<String, Rule> = plan
            .features
            .iter()
            .map(|(name, e)| (name.clone(), shared.rule(e)))
            .collect();
        for (addon, _) in addons {
            for (name, e) in &addon.features {
                features.insert(name.clone(), shared.rule(e));
            }
        }
        let mut seats = customer.seats.or(plan.seats);
        for (addon, units) in addons {
            for (name, extra) in &addon.extra {
                if let Some(Rule::Metered(m)) = features.get_mut(name) {
                    m.limit += extra * f64::from(*units);
                }
            }
            if let (Some(s), Some(more)) = (seats.as_mut(), addon.seats) {
                *s = s.saturating_add(more.saturating_mul(*units));
            }
        }
        Compiled { features, seats }
    }
}

/// Usage of one metered feature in its open period.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Counter {
    start: i64,
    end: i64,
    /// Everything counted: within the limit, from grants, and overage.
    used: f64,
    /// The part counted against the period's limit.
    base: f64,
    /// Bit i: threshold i was notified; `LIMIT_BIT`: the first refusal was.
    notified: u64,
}

impl Counter {
    /// No period yet: the first event opens one.
    const EMPTY: Counter = Counter {
        start: i64::MIN,
        end: i64::MIN,
        used: 0.0,
        base: 0.0,
        notified: 0,
    };

    /// The counter as it stands at `t`: a new period starts empty.
    fn at(self, rule: &Metered, anchor: u8, t: i64) -> Counter {
        if t < self.end {
            return self;
        }
        let (start, end) = bounds(rule.period, anchor, t);
        Counter {
            start,
            end,
            ..Counter::EMPTY
        }
    }
}

/// A grant with what is left of it.
#[derive(Debug, Clone)]
struct GrantState {
    feature: u32,
    id: Arc<str>,
    amount: f64,
    effective: i64,
    expires: i64,
    priority: u32,
    recurring: Option<UsagePeriod>,
    remaining: f64,
    /// The recurrence window `remaining` belongs to (the whole life of a one-off grant).
    window: (i64, i64),
    exhausted_sent: bool,
}

impl GrantState {
    fn new(g: &Grant, feature: u32) -> GrantState {
        let effective = g.effective.timestamp_micros();
        let expires = g.expires.map_or(i64::MAX, |t| t.timestamp_micros());
        GrantState {
            feature,
            id: g.id.as_str().into(),
            amount: g.amount.max(0.0),
            effective,
            expires,
            priority: g.priority,
            recurring: g.recurring,
            remaining: g.amount.max(0.0),
            window: if g.recurring.is_some() {
                (i64::MIN, i64::MIN)
            } else {
                (effective, expires)
            },
            exhausted_sent: false,
        }
    }

    fn same_terms(&self, other: &GrantState) -> bool {
        self.id == other.id
            && self.feature == other.feature
            && self.amount == other.amount
            && self.effective == other.effective
            && self.recurring == other.recurring
    }

    /// What can be used at `t`, and the window it belongs to.
    fn available(&self, anchor: u8, t: i64) -> (f64, (i64, i64), bool) {
        if t < self.effective || t >= self.expires {
            return (0.0, self.window, self.exhausted_sent);
        }
        match self.recurring {
            Some(period) if t >= self.window.1 || t < self.window.0 => {
                (self.amount, bounds(period, anchor, t), false)
            }
            _ => (self.remaining, self.window, self.exhausted_sent),
        }
    }
}

/// Distinct users of a period.
#[derive(Debug, Clone)]
struct Seats {
    limit: u32,
    period: UsagePeriod,
    start: i64,
    end: i64,
    users: HashSet<u64, foldhash::fast::FixedState>,
}

impl Seats {
    fn new(limit: u32, period: UsagePeriod) -> Seats {
        Seats {
            limit,
            period,
            start: i64::MIN,
            end: i64::MIN,
            users: HashSet::default(),
        }
    }

    /// Whether `user` may use the feature at `t` (a new period has every seat free).
    fn admits(&self, user: u64, t: i64) -> bool {
        if t >= self.end {
            return self.limit > 0;
        }
        self.users.contains(&user) || self.users.len() < self.limit as usize
    }

    fn take(&mut self, user: u64, anchor: u8, t: i64) {
        if t >= self.end {
            (self.start, self.end) = bounds(self.period, anchor, t);
            self.users.clear();
        }
        self.users.insert(user);
    }
}

/// One customer × feature: the rule, the counter, the grants and the feature's seats.
pub(crate) struct Slot {
    pub(crate) feature: u32,
    /// False once the plan no longer has the feature: the slot stays, with what it
    /// counted, so that a downgrade and an upgrade back within a period reset nothing.
    entitled: bool,
    rule: Rule,
    counter: Counter,
    seats: Option<Box<Seats>>,
}

pub(crate) struct Account {
    pub(crate) customer: Arc<Customer>,
    valid_from: i64,
    valid_until: i64,
    suspended: bool,
    regions: Box<[Box<str>]>,
    anchor: u8,
    /// The feature number of each slot, sorted: the search reads one or two cache lines
    /// instead of a line per probed slot.
    keys: Box<[u32]>,
    /// In the order of `keys`.
    pub(crate) slots: Vec<Slot>,
    seats: Option<Box<Seats>>,
    /// Every grant of the customer's definition, with its balance (a grant keeps it while
    /// its feature is not in the plan, and loses it when the definition drops the grant).
    grants: Box<[GrantState]>,
}

impl Account {
    /// Builds a customer's account; what the old one counted carries over where the
    /// feature and its period kind are unchanged.
    pub(crate) fn build(
        customer: Arc<Customer>,
        compiled: Compiled,
        intern: &mut dyn FnMut(&str) -> u32,
        old: Option<Account>,
    ) -> Account {
        let anchor = customer.anchor_day.clamp(1, 31);
        let mut slots: Vec<Slot> = compiled
            .features
            .into_iter()
            .map(|(name, rule)| {
                let seats = match &rule {
                    Rule::Metered(m) => m.seats.map(|n| Box::new(Seats::new(n, m.period))),
                    _ => None,
                };
                Slot {
                    feature: intern(&name),
                    entitled: true,
                    rule,
                    counter: Counter::EMPTY,
                    seats,
                }
            })
            .collect();
        slots.sort_unstable_by_key(|s| s.feature);
        let mut seats = compiled
            .seats
            .map(|n| Box::new(Seats::new(n, UsagePeriod::Billing)));
        let mut grants: Box<[GrantState]> = customer
            .grants
            .iter()
            .map(|g| GrantState::new(g, intern(&g.feature)))
            .collect();
        if let Some(old) = old {
            for g in grants.iter_mut() {
                if let Some(o) = old.grants.iter().find(|o| o.same_terms(g)) {
                    g.remaining = o.remaining;
                    g.window = o.window;
                    g.exhausted_sent = o.exhausted_sent;
                }
            }
            let mut before: Map<u32, Slot> =
                old.slots.into_iter().map(|s| (s.feature, s)).collect();
            for slot in &mut slots {
                if let Some(o) = before.remove(&slot.feature) {
                    slot.carry(o, anchor);
                }
            }
            slots.extend(before.into_values().map(|o| Slot {
                entitled: false,
                seats: None,
                ..o
            }));
            slots.sort_unstable_by_key(|s| s.feature);
            if let (Some(new), Some(old)) = (seats.as_mut(), old.seats) {
                new.start = old.start;
                new.end = old.end;
                new.users = old.users;
            }
        }
        Account {
            valid_from: customer
                .valid_from
                .map_or(i64::MIN, |t| t.timestamp_micros()),
            valid_until: customer
                .valid_until
                .map_or(i64::MAX, |t| t.timestamp_micros()),
            suspended: customer.status == Status::Suspended,
            regions: customer.regions.iter().map(|r| r.as_str().into()).collect(),
            anchor,
            keys: slots.iter().map(|s| s.feature).collect(),
            slots,
            seats,
            grants,
            customer,
        }
    }

    fn slot(&self, feature: Option<u32>) -> Option<usize> {
        self.keys.binary_search(&feature?).ok()
    }

    /// Decides `usage`; with `notices`, records it too.
    pub(crate) fn decide(
        &mut self,
        usage: &Usage<'_>,
        feature: Option<u32>,
        names: &[Box<str>],
        notices: Option<&mut Vec<Notice>>,
    ) -> Decision {
        let t = usage.time;
        if self.suspended || t < self.valid_from || t >= self.valid_until {
            return Decision::Expired;
        }
        if !self.regions.is_empty()
            && !usage
                .region
                .is_some_and(|r| self.regions.iter().any(|a| **a == *r))
        {
            return Decision::RegionBlocked;
        }
        let Some(i) = self.slot(feature) else {
            return Decision::NotEntitled;
        };
        let anchor = self.anchor;
        let slot = &mut self.slots[i];
        if !slot.entitled || slot.rule == Rule::Off {
            return Decision::NotEntitled;
        }
        let user = usage.user.map(user_key);
        if let Some(u) = user {
            let seat_sets = [slot.seats.as_deref(), self.seats.as_deref()];
            if seat_sets.into_iter().flatten().any(|s| !s.admits(u, t)) {
                return Decision::SeatLimit;
            }
        }
        let commit = notices.is_some();
        let decision = match &slot.rule {
            Rule::Off => Decision::NotEntitled,
            Rule::On | Rule::Static(_) => Decision::Accepted,
            Rule::Metered(rule) => {
                let feature_name = names.get(slot.feature as usize).map_or("", |n| n);
                let mut ctx = Notify {
                    customer: &self.customer,
                    feature: feature_name,
                    rule,
                    out: notices,
                };
                let feature = slot.feature;
                metered(
                    rule,
                    &mut slot.counter,
                    &mut self.grants,
                    feature,
                    anchor,
                    usage,
                    &mut ctx,
                )
            }
        };
        if commit
            && decision.is_billable()
            && let Some(u) = user
        {
            if let Some(s) = slot.seats.as_deref_mut() {
                s.take(u, anchor, t);
            }
            if let Some(s) = self.seats.as_deref_mut() {
                s.take(u, anchor, t);
            }
        }
        decision
    }

    /// The balance a check reports, after `decide` without recording.
    pub(crate) fn balance(
        &self,
        usage: &Usage<'_>,
        feature: Option<u32>,
        decision: Decision,
    ) -> Check {
        let mut check = Check::refused(decision);
        let Some(slot) = self.slot(feature).map(|i| &self.slots[i]) else {
            return check;
        };
        if !slot.entitled {
            return check;
        }
        match &slot.rule {
            Rule::Static(v) => check.value = Some((**v).clone()),
            Rule::Metered(rule) => {
                let c = slot.counter.at(rule, self.anchor, usage.time);
                check.usage = c.used;
                check.resets_at = Some(c.end);
                if rule.limit.is_finite() {
                    let grants: f64 = self
                        .grants
                        .iter()
                        .filter(|g| g.feature == slot.feature)
                        .map(|g| g.available(self.anchor, usage.time).0)
                        .sum();
                    check.limit = Some(rule.limit);
                    check.remaining = Some((rule.limit - c.base).max(0.0) + grants);
                }
            }
            Rule::On | Rule::Off => {}
        }
        check
    }
}

impl Slot {
    /// Takes over what `old` counted, where it still means the same thing: the counter
    /// when its window is a period of the new rule's kind (a feature that is not metered
    /// for a while keeps it, unused), the grant balances by id and terms, the seats when
    /// their period kind stays.
    fn carry(&mut self, old: Slot, anchor: u8) {
        let c = old.counter;
        let keep = match &self.rule {
            Rule::Metered(m) => {
                c == Counter::EMPTY || bounds(m.period, anchor, c.start) == (c.start, c.end)
            }
            _ => true,
        };
        if keep {
            self.counter = c;
        }
        if let (Some(new), Some(old)) = (self.seats.as_mut(), old.seats)
            && new.period == old.period
        {
            new.start = old.start;
            new.end = old.end;
            new.users = old.users;
        }
    }
}

/// Where notices go, with what they name.
struct Notify<'a> {
    customer: &'a Customer,
    feature: &'a str,
    rule: &'a Metered,
    /// `None`: a check, which records and notifies nothing.
    out: Option<&'a mut Vec<Notice>>,
}

impl Notify<'_> {
    fn send(&mut self, kind: NoticeKind, c: &Counter) {
        let Some(out) = self.out.as_deref_mut() else {
            return;
        };
        let limit = self.rule.limit;
        out.push(Notice {
            kind,
            customer: self.customer.id.clone(),
            feature: self.feature.to_owned(),
            plan: self.customer.plan.clone(),
            usage: c.used,
            limit,
            percent: if limit > 0.0 {
                c.used * 100.0 / limit
            } else {
                100.0
            },
            period_start: c.start,
            period_end: c.end,
            next_plan: self.rule.next_plan.as_deref().map(str::to_owned),
        });
    }
}

/// The metered rule (7 in the crate's list). Records only when `ctx.out` is set.
fn metered(
    rule: &Metered,
    counter: &mut Counter,
    grants: &mut [GrantState],
    feature: u32,
    anchor: u8,
    usage: &Usage<'_>,
    ctx: &mut Notify<'_>,
) -> Decision {
    let t = usage.time;
    let commit = ctx.out.is_some();
    let mut c = counter.at(rule, anchor, t);
    if t < c.start {
        return Decision::Late;
    }
    let q = usage.quantity;
    if !rule.limit.is_finite() {
        if commit {
            c.used += q;
            c.base += q;
            *counter = c;
        }
        return Decision::Accepted;
    }
    let left = (rule.limit - c.base).max(0.0);
    // Usable grants in burn order: priority, then earliest expiry.
    let mut order: Vec<(u32, i64, usize, f64)> = grants
        .iter()
        .enumerate()
        .filter(|(_, g)| g.feature == feature)
        .filter_map(|(i, g)| {
            let (avail, _, _) = g.available(anchor, t);
            (avail > 0.0).then_some((g.priority, g.expires, i, avail))
        })
        .collect();
    order.sort_unstable_by_key(|&(p, e, i, _)| (p, e, i));
    let from_grants: f64 = order.iter().map(|o| o.3).sum();
    let decision = if q <= left + from_grants {
        Decision::Accepted
    } else if rule.hard {
        Decision::LimitReached
    } else {
        Decision::Overage
    };
    if !commit {
        return decision;
    }
    if decision == Decision::LimitReached {
        if c.notified & LIMIT_BIT == 0 {
            c.notified |= LIMIT_BIT;
            ctx.send(NoticeKind::LimitReached, &c);
        }
        *counter = c;
        return decision;
    }
    let from_base = q.min(left);
    c.base += from_base;
    c.used += q;
    let mut rest = q - from_base;
    for &(_, _, i, _) in &order {
        if rest <= 0.0 {
            break;
        }
        let g = &mut grants[i];
        let (avail, window, sent) = g.available(anchor, t);
        g.remaining = avail;
        g.window = window;
        g.exhausted_sent = sent;
        let take = rest.min(g.remaining);
        g.remaining -= take;
        rest -= take;
        if g.remaining <= 0.0 && !g.exhausted_sent {
            g.exhausted_sent = true;
            let id = g.id.to_string();
            ctx.send(NoticeKind::GrantExhausted(id), &c);
        }
    }
    if rule.limit > 0.0 {
        for (bit, &threshold) in rule.thresholds.iter().enumerate().take(63) {
            let mask = 1u64 << bit;
            if c.notified & mask == 0 && c.used * 100.0 >= f64::from(threshold) * rule.limit {
                c.notified |= mask;
                ctx.send(NoticeKind::Threshold(threshold), &c);
            }
        }
    }
    *counter = c;
    decision
}
