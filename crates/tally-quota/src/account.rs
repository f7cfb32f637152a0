//! One customer's compiled entitlement and its counters.

use std::collections::BTreeMap;
use std::sync::Arc;

use hashbrown::HashSet;
use tally_core::Decision;
use tally_core::entitlement::{
    AddOn, Customer, Effective, Enforcement, Entitlement, Grant, Plan, Status, UsagePeriod,
};
use tally_core::meter::Measure;
use tally_core::period::bounds;
use tally_core::snapshot;

use crate::{Check, Map, Notice, NoticeKind, Usage, user_key};

/// The bit of `Counter::notified` that records the period's first refusal.
const LIMIT_BIT: u32 = 1 << 31;

/// A feature's entitlement as a plan or an add-on defines it, shared by every customer
/// who has it (a customer's own limit, with add-ons, is in its slot).
#[derive(Debug, PartialEq)]
pub(crate) enum Def {
    Off,
    On,
    Static(serde_json::Value),
    Metered(Metered),
}

#[derive(Debug, PartialEq)]
pub(crate) struct Metered {
    period: UsagePeriod,
    hard: bool,
    /// Ascending, at most 31.
    thresholds: Box<[u32]>,
    next_plan: Option<Box<str>>,
    seats: Option<u32>,
    /// How the feature counts: quantities added, or a bound meter's distinct values,
    /// highest or latest value.
    measure: Measure,
}

/// The definitions many customers share, so that a counter stays one cache line.
pub(crate) struct Shared {
    defs: Map<String, Arc<Def>>,
    /// The definition of a feature a customer no longer has.
    off: Arc<Def>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            defs: Map::default(),
            off: Arc::new(Def::Off),
        }
    }
}

impl Shared {
    pub(crate) fn off(&self) -> Arc<Def> {
        self.off.clone()
    }

    /// The shared definition of an entitlement counted by `measure`.
    fn def(&mut self, entitlement: &Entitlement, measure: Measure) -> Arc<Def> {
        let key = format!(
            "{measure:?} {}",
            serde_json::to_string(entitlement).unwrap_or_default()
        );
        if let Some(d) = self.defs.get(&key) {
            return d.clone();
        }
        let def = Arc::new(match entitlement {
            Entitlement::Boolean { enabled: true } => Def::On,
            Entitlement::Boolean { enabled: false } => Def::Off,
            Entitlement::Static { value } => Def::Static(value.clone()),
            Entitlement::Metered(m) => {
                let mut thresholds = m.thresholds.clone();
                thresholds.sort_unstable();
                thresholds.dedup();
                thresholds.truncate(31);
                Def::Metered(Metered {
                    period: m.period,
                    hard: m.enforcement == Enforcement::Hard,
                    thresholds: thresholds.into(),
                    next_plan: m.next_plan.as_deref().map(Into::into),
                    seats: m.seats,
                    measure,
                })
            }
        });
        self.defs.insert(key, def.clone());
        def
    }
}

/// A customer's features and seats, from the plan and the add-ons.
pub(crate) struct Compiled {
    /// The customer's plan, when it exists.
    plan: Option<Arc<Plan>>,
    /// Each feature's definition and the customer's limit.
    features: BTreeMap<String, (Arc<Def>, f64)>,
    seats: Option<u32>,
    off: Arc<Def>,
}

impl Compiled {
    /// The customer's features by [`Effective`], the rule the reports share.
    pub(crate) fn new(
        customer: &Customer,
        plan: Option<Arc<Plan>>,
        addons: &[(Arc<AddOn>, u32)],
        shared: &mut Shared,
        measures: &Map<String, Measure>,
    ) -> Compiled {
        let off = shared.off.clone();
        let Some(plan) = plan else {
            return Compiled {
                plan: None,
                features: BTreeMap::new(),
                seats: None,
                off,
            };
        };
        let held: Vec<(&AddOn, u32)> = addons.iter().map(|(a, units)| (&**a, *units)).collect();
        let features = Effective::all(&plan, &held)
            .into_iter()
            .map(|(name, e)| {
                // Unlimited, or not metered: no limit.
                let limit = e.limit().unwrap_or(f64::INFINITY);
                let measure = measures.get(name).copied().unwrap_or(Measure::Sum);
                (name.to_owned(), (shared.def(e.entitlement, measure), limit))
            })
            .collect();
        let seats = Effective::seats(customer, &plan, &held);
        Compiled {
            plan: Some(plan),
            features,
            seats,
            off,
        }
    }
}

/// Usage of one metered feature in its open period.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Counter {
    start: i64,
    end: i64,
    /// Everything counted: within the limit, from grants, and overage.
    used: f64,
    /// The part counted against the period's limit. For a feature that holds a bound
    /// meter's highest or latest value: the time (µs) of the event `used` is from, 0 while
    /// the period has none.
    base: f64,
    /// Bit i: threshold i was notified; `LIMIT_BIT`: the first refusal was.
    notified: u32,
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

    /// Whether anything was drawn from it or noted about it (else a new one is the same).
    fn touched(&self) -> bool {
        self.remaining != self.amount
            || self.exhausted_sent
            || (self.recurring.is_some() && self.window.0 != i64::MIN)
    }

    fn same_terms(&self, other: &GrantState) -> bool {
        self.id == other.id
            && self.feature == other.feature
            && self.amount == other.amount
            && self.effective == other.effective
            && self.recurring == other.recurring
    }

    /// What can be used at `t`, and the window it belongs to. A recurring grant comes back
    /// whole in each new window; an event from a window before the one in use (a late
    /// arrival) finds nothing.
    fn available(&self, anchor: u8, t: i64) -> (f64, (i64, i64), bool) {
        if t < self.effective || t >= self.expires {
            return (0.0, self.window, self.exhausted_sent);
        }
        match self.recurring {
            // A window before the one in use is closed: its balance is gone.
            Some(_) if t < self.window.0 => (0.0, self.window, self.exhausted_sent),
            Some(period) if t >= self.window.1 => (self.amount, bounds(period, anchor, t), false),
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
    users: Users,
}

/// How many users a seat set holds beside its other fields.
const INLINE_USERS: usize = 32;

/// The user keys of a seat set: the first [`INLINE_USERS`] in the seat set's own
/// allocation, the rest in a hash set. A decision for a customer with seats then reads
/// the seat set's few cache lines, side by side, instead of following a hash table's
/// control bytes to its buckets (two misses in a row for a customer out of cache).
#[derive(Debug, Clone, Default)]
struct Users {
    len: usize,
    inline: [u64; INLINE_USERS],
    more: HashSet<u64, foldhash::fast::FixedState>,
}

impl Users {
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn contains(&self, user: u64) -> bool {
        self.inline[..self.len.min(INLINE_USERS)].contains(&user)
            || (self.len > INLINE_USERS && self.more.contains(&user))
    }

    fn insert(&mut self, user: u64) {
        if self.contains(user) {
            return;
        }
        match self.inline.get_mut(self.len) {
            Some(free) => *free = user,
            None => {
                self.more.insert(user);
            }
        }
        self.len += 1;
    }

    fn clear(&mut self) {
        self.len = 0;
        self.more.clear();
    }

    fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.inline[..self.len.min(INLINE_USERS)]
            .iter()
            .chain(&self.more)
            .copied()
    }
}

impl FromIterator<u64> for Users {
    fn from_iter<I: IntoIterator<Item = u64>>(users: I) -> Users {
        let mut set = Users::default();
        for user in users {
            set.insert(user);
        }
        set
    }
}

impl Seats {
    fn new(limit: u32, period: UsagePeriod) -> Seats {
        Seats {
            limit,
            period,
            start: i64::MIN,
            end: i64::MIN,
            users: Users::default(),
        }
    }

    /// Whether `user` may use the feature at `t` (a new period has every seat free).
    fn admits(&self, user: u64, t: i64) -> bool {
        if t >= self.end {
            return self.limit > 0;
        }
        self.users.len() < self.limit as usize || self.users.contains(user)
    }

    fn export(&self) -> snapshot::Seats {
        snapshot::Seats {
            period: self.period,
            start: self.start,
            end: self.end,
            users: self.users.iter().collect(),
        }
    }

    fn import(s: snapshot::Seats) -> Box<Seats> {
        Box::new(Seats {
            limit: 0,
            period: s.period,
            start: s.start,
            end: s.end,
            users: s.users.into_iter().collect(),
        })
    }

    fn take(&mut self, user: u64, anchor: u8, t: i64) {
        if t >= self.end {
            (self.start, self.end) = bounds(self.period, anchor, t);
            self.users.clear();
        }
        self.users.insert(user);
    }
}

/// One customer × feature: the counter, the customer's limit, the shared definition and
/// the feature's seats, in one cache line (64 bytes).
///
/// A feature the plan no longer has keeps its slot, with what it counted and the `Off`
/// definition, so that a downgrade and an upgrade back within a period reset nothing.
#[repr(align(64))]
pub(crate) struct Slot {
    counter: Counter,
    /// The period's limit with add-ons; `f64::INFINITY`: unlimited.
    limit: f64,
    def: Arc<Def>,
    seats: Option<Box<Seats>>,
}

/// The fields every decision reads come first, so that they share the cache line of the
/// key in the account table.
#[repr(C)]
pub(crate) struct Account {
    /// Bit f: the slot of feature number f < 64 is here; the slot's index is the number
    /// of bits below it. Most catalogues have fewer than 64 features, and then finding a
    /// slot reads nothing but the account itself.
    present: u64,
    valid_from: i64,
    valid_until: i64,
    /// In the order of `keys`.
    pub(crate) slots: Box<[Slot]>,
    suspended: bool,
    anchor: u8,
    regions: Box<[Box<str>]>,
    seats: Option<Box<Seats>>,
    /// Every grant of the customer's definition, with its balance (a grant keeps it while
    /// its feature is not in the plan, and loses it when the definition drops the grant),
    /// by feature in burn order.
    grants: Box<[GrantState]>,
    /// The values a `UNIQUE_COUNT` feature counted in its open period, by feature number
    /// (a seat set without a limit).
    distinct: Vec<(u32, Seats)>,
    /// The feature number of each slot, sorted (searched for feature numbers past 63).
    keys: Box<[u32]>,
    /// The customer's plan, shared with its other customers: naming the plan of a decision
    /// then reads nothing of the customer's own definition, which is out of cache for most
    /// customers. `None`: the plan does not exist.
    plan: Option<Arc<Plan>>,
    pub(crate) customer: Arc<Customer>,
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
        let mut slots: Vec<(u32, Slot)> = compiled
            .features
            .into_iter()
            .map(|(name, (def, limit))| {
                let seats = match &*def {
                    Def::Metered(m) => m.seats.map(|n| Box::new(Seats::new(n, m.period))),
                    _ => None,
                };
                let slot = Slot {
                    counter: Counter::EMPTY,
                    limit,
                    def,
                    seats,
                };
                (intern(&name), slot)
            })
            .collect();
        let mut seats = compiled
            .seats
            .map(|n| Box::new(Seats::new(n, UsagePeriod::Billing)));
        let mut grants: Vec<GrantState> = customer
            .grants
            .iter()
            .map(|g| GrantState::new(g, intern(&g.feature)))
            .collect();
        // Burn order: priority, then earliest expiry, then as defined.
        grants.sort_by_key(|g| (g.feature, g.priority, g.expires));
        let mut carried: Vec<(u32, Seats)> = Vec::new();
        if let Some(mut old) = old {
            carried = std::mem::take(&mut old.distinct);
            for g in grants.iter_mut() {
                if let Some(o) = old.grants.iter().find(|o| o.same_terms(g)) {
                    g.remaining = o.remaining;
                    g.window = o.window;
                    g.exhausted_sent = o.exhausted_sent;
                }
            }
            let mut before: Map<u32, Slot> =
                old.keys.iter().copied().zip(old.slots.into_vec()).collect();
            for (feature, slot) in &mut slots {
                if let Some(o) = before.remove(feature) {
                    slot.carry(o, anchor);
                }
            }
            slots.extend(before.into_iter().map(|(feature, o)| {
                let dormant = Slot {
                    def: compiled.off.clone(),
                    seats: None,
                    ..o
                };
                (feature, dormant)
            }));
            if let (Some(new), Some(old)) = (seats.as_mut(), old.seats) {
                new.start = old.start;
                new.end = old.end;
                new.users = old.users;
            }
        }
        let mut distinct: Vec<(u32, Seats)> = slots
            .iter()
            .filter_map(|(feature, slot)| match &*slot.def {
                Def::Metered(m) if m.measure == Measure::Distinct => {
                    Some((*feature, Seats::new(u32::MAX, m.period)))
                }
                _ => None,
            })
            .collect();
        for (feature, set) in &mut distinct {
            if let Some((_, old)) = carried.iter_mut().find(|(f, _)| f == feature)
                && old.period == set.period
            {
                std::mem::swap(set, old);
                set.limit = u32::MAX;
            }
        }
        slots.sort_unstable_by_key(|(feature, _)| *feature);
        let (keys, slots): (Vec<u32>, Vec<Slot>) = slots.into_iter().unzip();
        Account {
            distinct,
            valid_from: customer
                .valid_from
                .map_or(i64::MIN, |t| t.timestamp_micros()),
            valid_until: customer
                .valid_until
                .map_or(i64::MAX, |t| t.timestamp_micros()),
            suspended: customer.status == Status::Suspended,
            regions: customer.regions.iter().map(|r| r.as_str().into()).collect(),
            anchor,
            present: keys
                .iter()
                .filter(|f| **f < 64)
                .fold(0, |bits, f| bits | 1 << f),
            keys: keys.into(),
            slots: slots.into(),
            seats,
            grants: grants.into(),
            plan: compiled.plan,
            customer,
        }
    }

    /// What this account has counted, for a checkpoint; `None` when it counted nothing.
    pub(crate) fn export(&self, names: &[Box<str>]) -> Option<snapshot::Account> {
        let name = |f: u32| {
            names
                .get(f as usize)
                .map_or_else(String::new, |n| n.to_string())
        };
        let counters: Vec<snapshot::Counter> = self
            .keys
            .iter()
            .zip(self.slots.iter())
            .filter(|(_, s)| {
                s.counter != Counter::EMPTY || s.seats.as_ref().is_some_and(|s| !s.users.is_empty())
            })
            .map(|(&f, s)| snapshot::Counter {
                values: self
                    .distinct
                    .iter()
                    .find(|(d, set)| *d == f && !set.users.is_empty())
                    .map(|(_, set)| set.export()),
                feature: name(f),
                start: s.counter.start,
                end: s.counter.end,
                used: s.counter.used,
                base: s.counter.base,
                notified: s.counter.notified,
                seats: s.seats.as_deref().map(Seats::export),
            })
            .collect();
        let grants: Vec<snapshot::Grant> = self
            .grants
            .iter()
            .filter(|g| g.touched())
            .map(|g| snapshot::Grant {
                id: g.id.to_string(),
                feature: name(g.feature),
                amount: g.amount,
                effective: g.effective,
                recurring: g.recurring,
                remaining: g.remaining,
                window: g.window,
                exhausted_sent: g.exhausted_sent,
            })
            .collect();
        let seats = self
            .seats
            .as_deref()
            .filter(|s| !s.users.is_empty())
            .map(Seats::export);
        if counters.is_empty() && grants.is_empty() && seats.is_none() {
            return None;
        }
        Some(snapshot::Account {
            customer: self.customer.id.clone(),
            counters,
            grants,
            seats,
        })
    }

    /// An account holding nothing but what `state` counted: built on as the `old` account,
    /// it hands its counts over by the same rules as a definition change does.
    pub(crate) fn from_state(
        state: snapshot::Account,
        customer: Arc<Customer>,
        off: &Arc<Def>,
        intern: &mut dyn FnMut(&str) -> u32,
    ) -> Account {
        let mut distinct = Vec::new();
        let mut slots: Vec<(u32, Slot)> = state
            .counters
            .into_iter()
            .map(|c| {
                let feature = intern(&c.feature);
                if let Some(values) = c.values {
                    distinct.push((feature, *Seats::import(values)));
                }
                let slot = Slot {
                    counter: Counter {
                        start: c.start,
                        end: c.end,
                        used: c.used,
                        base: c.base,
                        notified: c.notified,
                    },
                    limit: f64::INFINITY,
                    def: off.clone(),
                    seats: c.seats.map(Seats::import),
                };
                (feature, slot)
            })
            .collect();
        slots.sort_unstable_by_key(|(f, _)| *f);
        let (keys, slots): (Vec<u32>, Vec<Slot>) = slots.into_iter().unzip();
        let grants: Vec<GrantState> = state
            .grants
            .into_iter()
            .map(|g| GrantState {
                feature: intern(&g.feature),
                id: g.id.as_str().into(),
                amount: g.amount,
                effective: g.effective,
                expires: i64::MAX,
                priority: 0,
                recurring: g.recurring,
                remaining: g.remaining,
                window: g.window,
                exhausted_sent: g.exhausted_sent,
            })
            .collect();
        Account {
            distinct,
            present: 0,
            valid_from: i64::MIN,
            valid_until: i64::MAX,
            slots: slots.into(),
            suspended: false,
            anchor: customer.anchor_day.clamp(1, 31),
            regions: Box::default(),
            seats: state.seats.map(Seats::import),
            grants: grants.into(),
            keys: keys.into(),
            plan: None,
            customer,
        }
    }

    /// The id of the customer's plan.
    pub(crate) fn plan_id(&self) -> &str {
        self.plan.as_ref().map_or(&self.customer.plan, |p| &p.id)
    }

    /// The index of a feature's slot, and the feature's number.
    fn slot(&self, feature: Option<u32>) -> Option<(usize, u32)> {
        let feature = feature?;
        let i = if feature < 64 {
            let bit = 1u64 << feature;
            // Slots are sorted by feature number: those below 64 come first.
            (self.present & bit != 0).then(|| (self.present & (bit - 1)).count_ones() as usize)
        } else {
            self.keys.binary_search(&feature).ok()
        };
        i.map(|i| (i, feature))
    }

    /// Decides `usage`; with `notices`, records it too. `distinct`: the key of the value
    /// a `UNIQUE_COUNT` feature counts (once per period).
    pub(crate) fn decide(
        &mut self,
        usage: &Usage<'_>,
        feature: Option<u32>,
        names: &[Box<str>],
        notices: Option<&mut Vec<Notice>>,
        distinct: Option<u64>,
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
        let Some(at) = self.target(feature, usage) else {
            return Decision::NotEntitled;
        };
        if *self.slots[at.slot].def == Def::Off {
            return Decision::NotEntitled;
        }
        if let Some(u) = at.user {
            let seat_sets = [self.slots[at.slot].seats.as_deref(), self.seats.as_deref()];
            if seat_sets.into_iter().flatten().any(|s| !s.admits(u, t)) {
                return Decision::SeatLimit;
            }
        }
        self.count(at, usage, names, notices, None, distinct)
    }

    /// Where an event for `feature` lands in this account, if it has the feature.
    fn target(&self, feature: Option<u32>, usage: &Usage<'_>) -> Option<Target> {
        let (slot, feature) = self.slot(feature)?;
        let seated = self.seats.is_some() || self.slots[slot].seats.is_some();
        Some(Target {
            slot,
            feature,
            user: usage.user.filter(|_| seated).map(user_key),
        })
    }

    /// Records an event already decided (`decision`, as the lake stored it): counters,
    /// grants, seats and notices move as they did when it was decided, whatever the
    /// definitions say now.
    pub(crate) fn replay(
        &mut self,
        usage: &Usage<'_>,
        feature: Option<u32>,
        names: &[Box<str>],
        notices: &mut Vec<Notice>,
        decision: Decision,
        distinct: Option<u64>,
    ) {
        let moves = decision.is_billable() || decision == Decision::LimitReached;
        if let Some(at) = self.target(feature, usage).filter(|_| moves) {
            self.count(at, usage, names, Some(notices), Some(decision), distinct);
        }
    }

    /// The rules past the gates: counts a metered feature, takes seats. `forced`: the
    /// decision to record instead of the one the counter gives.
    fn count(
        &mut self,
        at: Target,
        usage: &Usage<'_>,
        names: &[Box<str>],
        notices: Option<&mut Vec<Notice>>,
        forced: Option<Decision>,
        distinct: Option<u64>,
    ) -> Decision {
        let (anchor, feature) = (self.anchor, at.feature);
        let slot = &mut self.slots[at.slot];
        let commit = notices.is_some();
        // A distinct value counts 1 the first time in its period, then nothing.
        let values = match (&*slot.def, distinct) {
            (Def::Metered(m), Some(key)) if m.measure == Measure::Distinct => self
                .distinct
                .iter_mut()
                .find(|(f, _)| *f == feature)
                .map(|(_, set)| (set, key)),
            _ => None,
        };
        let mut one = *usage;
        if let Some((set, key)) = &values {
            let t = usage.time;
            let seen = t >= set.start && t < set.end && set.users.contains(*key);
            one.quantity = if seen { 0.0 } else { 1.0 };
        }
        let usage = &one;
        let decision = match &*slot.def {
            Def::Off | Def::On | Def::Static(_) => forced.unwrap_or(Decision::Accepted),
            Def::Metered(rule) => {
                let mut ctx = Notify {
                    customer: &self.customer,
                    feature: names.get(feature as usize).map_or("", |n| n),
                    rule,
                    limit: slot.limit,
                    out: notices,
                };
                metered(
                    &mut slot.counter,
                    &mut self.grants,
                    feature,
                    anchor,
                    usage,
                    &mut ctx,
                    forced,
                )
            }
        };
        if commit
            && decision.is_billable()
            && let Some((set, key)) = values
        {
            set.take(key, anchor, usage.time);
        }
        if commit
            && decision.is_billable()
            && let Some(u) = at.user
        {
            let t = usage.time;
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
        let Some((i, feature)) = self.slot(feature) else {
            return check;
        };
        let slot = &self.slots[i];
        match &*slot.def {
            Def::Static(v) => check.value = Some(v.clone()),
            Def::Metered(rule) => {
                let c = slot.counter.at(rule, self.anchor, usage.time);
                check.usage = c.used;
                check.resets_at = Some(c.end);
                if slot.limit.is_finite() && matches!(rule.measure, Measure::Max | Measure::Latest)
                {
                    check.limit = Some(slot.limit);
                    check.remaining = Some((slot.limit - c.used).max(0.0));
                } else if slot.limit.is_finite() {
                    let grants: f64 = self
                        .grants
                        .iter()
                        .filter(|g| g.feature == feature)
                        .map(|g| g.available(self.anchor, usage.time).0)
                        .sum();
                    check.limit = Some(slot.limit);
                    check.remaining = Some((slot.limit - c.base).max(0.0) + grants);
                }
            }
            Def::On | Def::Off => {}
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
        let same_measure = match (&*self.def, &*old.def) {
            (Def::Metered(new), Def::Metered(old)) => new.measure == old.measure,
            _ => true,
        };
        let keep = match &*self.def {
            Def::Metered(m) => {
                c == Counter::EMPTY
                    || (same_measure && bounds(m.period, anchor, c.start) == (c.start, c.end))
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

/// Where an event lands in an account.
#[derive(Clone, Copy)]
struct Target {
    slot: usize,
    /// The feature's number (carried, so that a decision does not read `Account::keys`:
    /// one cache line fewer for a customer out of cache).
    feature: u32,
    /// The key of the event's user when a seat set counts the feature's users: hashed
    /// once per event, and only then.
    user: Option<u64>,
}

/// Where notices go, with what they name.
struct Notify<'a> {
    customer: &'a Customer,
    feature: &'a str,
    rule: &'a Metered,
    limit: f64,
    /// `None`: a check, which records and notifies nothing.
    out: Option<&'a mut Vec<Notice>>,
}

impl Notify<'_> {
    fn send(&mut self, kind: NoticeKind, c: &Counter) {
        let Some(out) = self.out.as_deref_mut() else {
            return;
        };
        let limit = self.limit;
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

/// The metered rule (7 in the crate's list). Records only when `ctx.out` is set; `forced`
/// replays a decision taken before instead of taking one.
fn metered(
    counter: &mut Counter,
    grants: &mut [GrantState],
    feature: u32,
    anchor: u8,
    usage: &Usage<'_>,
    ctx: &mut Notify<'_>,
    forced: Option<Decision>,
) -> Decision {
    let (rule, limit) = (ctx.rule, ctx.limit);
    let t = usage.time;
    let commit = ctx.out.is_some();
    let mut c = counter.at(rule, anchor, t);
    if t < c.start {
        return forced.unwrap_or(Decision::Late);
    }
    let q = usage.quantity;
    if matches!(rule.measure, Measure::Max | Measure::Latest) {
        return gauge(counter, c, usage, ctx, forced);
    }
    if !limit.is_finite() && forced.is_none_or(Decision::is_billable) {
        if commit {
            c.used += q;
            c.base += q;
            *counter = c;
        }
        return Decision::Accepted;
    }
    let left = (limit - c.base).max(0.0);
    // The account keeps its grants in burn order.
    let from_grants: f64 = grants
        .iter()
        .filter(|g| g.feature == feature)
        .map(|g| g.available(anchor, t).0)
        .sum();
    let decision = if let Some(d) = forced {
        d
    } else if q <= left + from_grants {
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
        refused(&mut c, ctx);
        *counter = c;
        return decision;
    }
    let from_base = q.min(left);
    c.base += from_base;
    c.used += q;
    let mut rest = q - from_base;
    for g in grants.iter_mut().filter(|g| g.feature == feature) {
        if rest <= 0.0 {
            break;
        }
        let (avail, window, sent) = g.available(anchor, t);
        if avail <= 0.0 {
            continue;
        }
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
    thresholds(&mut c, ctx);
    *counter = c;
    decision
}

/// Notes a refusal by the limit: the period's first one sends a notice.
fn refused(c: &mut Counter, ctx: &mut Notify<'_>) {
    if c.notified & LIMIT_BIT == 0 {
        c.notified |= LIMIT_BIT;
        ctx.send(NoticeKind::LimitReached, c);
    }
}

/// Notices the thresholds of the limit that `c.used` has reached, each once per period.
fn thresholds(c: &mut Counter, ctx: &mut Notify<'_>) {
    let (rule, limit) = (ctx.rule, ctx.limit);
    if !limit.is_finite() || limit <= 0.0 {
        return;
    }
    for (bit, &threshold) in rule.thresholds.iter().enumerate() {
        let mask = 1u32 << bit;
        if c.notified & mask == 0 && c.used * 100.0 >= f64::from(threshold) * limit {
            c.notified |= mask;
            ctx.send(NoticeKind::Threshold(threshold), c);
        }
    }
}

/// The metered rule for a feature that holds a bound meter's highest or latest value
/// (`MAX`, `LATEST`): an event whose value is above the limit is refused under a hard limit
/// and counted as overage under a soft one; grants do not apply. `c` is the counter at the
/// event's time.
fn gauge(
    counter: &mut Counter,
    mut c: Counter,
    usage: &Usage<'_>,
    ctx: &mut Notify<'_>,
    forced: Option<Decision>,
) -> Decision {
    let (rule, limit, q) = (ctx.rule, ctx.limit, usage.quantity);
    let decision = match forced {
        Some(d) => d,
        None if q <= limit => Decision::Accepted,
        None if rule.hard => Decision::LimitReached,
        None => Decision::Overage,
    };
    if ctx.out.is_none() {
        return decision;
    }
    if decision == Decision::LimitReached {
        refused(&mut c, ctx);
        *counter = c;
        return decision;
    }
    // `base` holds the time of the event `used` is from (0: none yet this period).
    let t = usage.time as f64;
    let takes = match rule.measure {
        Measure::Max => c.base == 0.0 || q > c.used,
        _ => c.base == 0.0 || t >= c.base,
    };
    if takes {
        c.used = q;
        c.base = t;
    }
    thresholds(&mut c, ctx);
    *counter = c;
    decision
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_is_one_cache_line() {
        assert_eq!(size_of::<Slot>(), 64);
        assert_eq!(align_of::<Slot>(), 64);
    }

    #[test]
    fn a_seat_set_holds_each_user_once_inline_and_beyond() {
        let mut users = Users::default();
        for round in 0..2 {
            for u in 0..(INLINE_USERS as u64 + 8) {
                users.insert(u * 7919);
                assert!(users.contains(u * 7919), "round {round}, user {u}");
            }
        }
        assert_eq!(users.len(), INLINE_USERS + 8);
        assert!(!users.contains(1));
        let mut all: Vec<u64> = users.iter().collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..(INLINE_USERS as u64 + 8))
                .map(|u| u * 7919)
                .collect::<Vec<_>>()
        );
        let copy: Users = users.iter().collect();
        assert_eq!(copy.len(), users.len());
        users.clear();
        assert!(users.is_empty() && !users.contains(7919) && users.iter().next().is_none());
    }
}
