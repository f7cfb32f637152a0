//! The engine against a reference model of the same rules.
//!
//! The model keeps no counters: it logs every event it decided, with what each one took
//! from the limit and from each grant, and answers every question by scanning that log.
//! Random sequences of events, definition changes (plans, add-ons, customers: upgrades,
//! downgrades, grants, suspensions, geo-fences) and clock moves, forward and back, must
//! get the same decisions and the same notifications from both.
//!
//! Along the way the engine checkpoints and restarts as a worker does: a new engine with
//! the definitions of the moment restores the last checkpoint and replays the events
//! decided since with their recorded decisions; it must hold what the running one held,
//! send again the notices those events sent, and go on deciding as the model does. As in
//! the worker, a definition change is followed by a checkpoint.
//!
//! Quantities are whole numbers, so sums are exact in any order.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, RngSeed, TestRunner};
use tally_core::Decision;
use tally_core::entitlement::{
    AddOn, AddOnRef, Customer, Enforcement, Entitlement, Grant, Metered, Plan, Status, UsagePeriod,
};
use tally_core::period::bounds;
use tally_quota::{Engine, Notice, NoticeKind, Usage};

const HOUR: i64 = 3_600_000_000;
const START: i64 = 1_798_761_600_000_000; // 2027-01-01T00:00:00Z
const CUSTOMERS: [&str; 2] = ["acme", "globex"];
const FEATURES: [&str; 3] = ["calls", "storage", "export"];
/// Each feature keeps its period kind in every plan (a kind change restarts a counter,
/// which the model does not follow).
const KINDS: [UsagePeriod; 3] = [UsagePeriod::Month, UsagePeriod::Day, UsagePeriod::Billing];
const PLANS: [&str; 2] = ["basic", "plus"];
const USERS: [&str; 4] = ["u1", "u2", "u3", "u4"];
const REGIONS: [&str; 2] = ["eu", "us"];
const THRESHOLDS: [u32; 3] = [50, 80, 100];

fn time(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap()
}

// ---------------------------------------------------------------- the model

#[derive(Debug, Clone)]
struct Logged {
    customer: usize,
    feature: usize,
    time: i64,
    quantity: f64,
    user: Option<usize>,
    decision: Decision,
    /// Whether a metered rule decided it (boolean and static features count nothing).
    metered: bool,
    /// What the event took from the period's limit.
    from_base: f64,
    /// What it took from each grant: (grant key, window start, amount).
    from_grants: Vec<(String, i64, f64)>,
}

#[derive(Default)]
struct Model {
    plans: HashMap<String, Plan>,
    addons: HashMap<String, AddOn>,
    customers: HashMap<String, Customer>,
    log: Vec<Logged>,
    /// Notices sent: (customer, feature, what, period or window start).
    sent: HashSet<(usize, usize, String, i64)>,
    /// Since which log entry a seat set counts users: (customer, feature or `None` for
    /// the whole plan). A set starts when its limit appears and ends when it goes.
    seats_since: HashMap<(usize, Option<usize>), usize>,
    /// Since which log entry a grant's balance counts: (customer, grant key). A grant
    /// dropped from a customer's definition and given again starts whole.
    grants_since: HashMap<(usize, String), usize>,
}

/// A grant's identity for its balance: its id and terms.
fn grant_key(g: &Grant) -> String {
    format!(
        "{}|{}|{}|{}|{:?}",
        g.id,
        g.feature,
        g.amount,
        g.effective.timestamp_micros(),
        g.recurring
    )
}

impl Model {
    /// The feature's entitlement for the customer now: plan, add-on features, add-on
    /// quantities.
    fn rule(&self, c: &Customer, feature: &str) -> Option<Entitlement> {
        let plan = self.plans.get(&c.plan)?;
        let mut rule = plan.features.get(feature).cloned();
        for r in &c.addons {
            if let Some(a) = self.addons.get(&r.id)
                && let Some(e) = a.features.get(feature)
            {
                rule = Some(e.clone());
            }
        }
        if let Some(Entitlement::Metered(m)) = rule.as_mut()
            && let Some(limit) = m.limit.as_mut()
        {
            for r in &c.addons {
                if let Some(extra) = self.addons.get(&r.id).and_then(|a| a.extra.get(feature)) {
                    *limit += extra * f64::from(r.quantity);
                }
            }
        }
        rule
    }

    /// Follows a definition change: seat sets and grant balances that appear start now,
    /// those that go are forgotten.
    fn refresh(&mut self) {
        let now = self.log.len();
        for (ci, id) in CUSTOMERS.iter().enumerate() {
            let c = self.customers.get(*id).cloned();
            let mut scopes: Vec<Option<usize>> = vec![];
            let mut keys: Vec<String> = vec![];
            if let Some(c) = &c {
                if self.plan_seats(c).is_some() {
                    scopes.push(None);
                }
                for (fi, f) in FEATURES.iter().enumerate() {
                    if let Some(Entitlement::Metered(m)) = self.rule(c, f)
                        && m.seats.is_some()
                    {
                        scopes.push(Some(fi));
                    }
                }
                keys.extend(c.grants.iter().map(grant_key));
            }
            self.seats_since
                .retain(|(k, s), _| *k != ci || scopes.contains(s));
            for s in scopes {
                self.seats_since.entry((ci, s)).or_insert(now);
            }
            self.grants_since
                .retain(|(k, g), _| *k != ci || keys.contains(g));
            for g in keys {
                self.grants_since.entry((ci, g)).or_insert(now);
            }
        }
    }

    fn plan_seats(&self, c: &Customer) -> Option<u32> {
        let plan = self.plans.get(&c.plan)?;
        let mut seats = c.seats.or(plan.seats)?;
        for r in &c.addons {
            if let Some(more) = self.addons.get(&r.id).and_then(|a| a.seats) {
                seats += more * r.quantity;
            }
        }
        Some(seats)
    }

    /// Whether a seat set (the events `in_scope` take seats in it) admits `user` at `t`.
    /// A set opens a new period when a counted event falls past the open one's end.
    #[allow(clippy::too_many_arguments)]
    fn seat_admits(
        &self,
        ci: usize,
        scope: Option<usize>,
        period: UsagePeriod,
        anchor: u8,
        limit: u32,
        user: usize,
        t: i64,
    ) -> bool {
        let since = self
            .seats_since
            .get(&(ci, scope))
            .copied()
            .unwrap_or(usize::MAX);
        let mut open = (i64::MIN, i64::MIN);
        let mut users = HashSet::new();
        for e in self.log.iter().skip(since).filter(|e| {
            e.customer == ci
                && e.decision.is_billable()
                && e.user.is_some()
                && scope.is_none_or(|f| e.feature == f)
        }) {
            if e.time >= open.1 {
                open = bounds(period, anchor, e.time);
                users.clear();
            }
            users.insert(e.user.unwrap());
        }
        if t >= open.1 {
            return limit > 0;
        }
        users.contains(&user) || users.len() < limit as usize
    }

    fn decide(
        &mut self,
        ci: usize,
        fi: usize,
        q: f64,
        t: i64,
        region: Option<usize>,
        user: Option<usize>,
    ) -> (Decision, Vec<String>) {
        let Some(c) = self.customers.get(CUSTOMERS[ci]).cloned() else {
            return (Decision::UnknownCustomer, vec![]);
        };
        let mut logged = Logged {
            customer: ci,
            feature: fi,
            time: t,
            quantity: q,
            user,
            decision: Decision::Accepted,
            metered: false,
            from_base: 0.0,
            from_grants: vec![],
        };
        let mut notices = vec![];
        let decision = 'decide: {
            let from = c.valid_from.map_or(i64::MIN, |v| v.timestamp_micros());
            let until = c.valid_until.map_or(i64::MAX, |v| v.timestamp_micros());
            if c.status == Status::Suspended || t < from || t >= until {
                break 'decide Decision::Expired;
            }
            if !c.regions.is_empty()
                && !region.is_some_and(|r| c.regions.iter().any(|a| a == REGIONS[r]))
            {
                break 'decide Decision::RegionBlocked;
            }
            let rule = match self.rule(&c, FEATURES[fi]) {
                None | Some(Entitlement::Boolean { enabled: false }) => {
                    break 'decide Decision::NotEntitled;
                }
                Some(r) => r,
            };
            let anchor = c.anchor_day.clamp(1, 31);
            if let Some(u) = user {
                if let Entitlement::Metered(m) = &rule
                    && let Some(n) = m.seats
                    && !self.seat_admits(ci, Some(fi), m.period, anchor, n, u, t)
                {
                    break 'decide Decision::SeatLimit;
                }
                if let Some(n) = self.plan_seats(&c)
                    && !self.seat_admits(ci, None, UsagePeriod::Billing, anchor, n, u, t)
                {
                    break 'decide Decision::SeatLimit;
                }
            }
            let Entitlement::Metered(m) = rule else {
                break 'decide Decision::Accepted;
            };
            let period = bounds(m.period, anchor, t);
            // The open period: the latest one an earlier event of this feature reached.
            let reached = |e: &&Logged| {
                e.customer == ci
                    && e.feature == fi
                    && e.metered
                    && matches!(
                        e.decision,
                        Decision::Accepted | Decision::Overage | Decision::LimitReached
                    )
            };
            let open = self
                .log
                .iter()
                .filter(reached)
                .map(|e| bounds(m.period, anchor, e.time).0)
                .max();
            if open.is_some_and(|o| t < o) {
                break 'decide Decision::Late;
            }
            logged.metered = true;
            let in_period: Vec<&Logged> = self
                .log
                .iter()
                .filter(|e| reached(e) && bounds(m.period, anchor, e.time).0 == period.0)
                .collect();
            let Some(limit) = m.limit else {
                logged.from_base = q;
                break 'decide Decision::Accepted;
            };
            let base_used: f64 = in_period.iter().map(|e| e.from_base).sum();
            let left = (limit - base_used).max(0.0);
            // Usable grants and what is left of each in its window.
            let mut grants: Vec<(u32, i64, usize, String, i64, f64)> = vec![];
            for (gi, g) in c
                .grants
                .iter()
                .enumerate()
                .filter(|(_, g)| g.feature == FEATURES[fi])
            {
                let eff = g.effective.timestamp_micros();
                let exp = g.expires.map_or(i64::MAX, |e| e.timestamp_micros());
                if t < eff || t >= exp {
                    continue;
                }
                let window = match g.recurring {
                    Some(p) => bounds(p, anchor, t).0,
                    None => eff,
                };
                let key = grant_key(g);
                let since = self
                    .grants_since
                    .get(&(ci, key.clone()))
                    .copied()
                    .unwrap_or(usize::MAX);
                let takes = || {
                    self.log
                        .iter()
                        .skip(since)
                        .flat_map(|e| &e.from_grants)
                        .filter(|(k, _, _)| *k == key)
                };
                // A recurring grant's windows before the latest one used are closed.
                if takes().any(|(_, w, _)| *w > window) {
                    continue;
                }
                let taken: f64 = takes()
                    .filter(|(k, w, _)| *k == key && *w == window)
                    .map(|(_, _, a)| a)
                    .sum();
                let avail = g.amount.max(0.0) - taken;
                if avail > 0.0 {
                    grants.push((g.priority, exp, gi, key, window, avail));
                }
            }
            grants.sort_by_key(|g| (g.0, g.1, g.2));
            let from_grants: f64 = grants.iter().map(|g| g.5).sum();
            let used_before: f64 = in_period
                .iter()
                .filter(|e| e.decision.is_billable())
                .map(|e| e.quantity)
                .sum();
            if q > left + from_grants && m.enforcement == Enforcement::Hard {
                let what = "limit".to_owned();
                if self.sent.insert((ci, fi, what, period.0)) {
                    notices.push("limit_reached".to_owned());
                }
                break 'decide Decision::LimitReached;
            }
            let decision = if q <= left + from_grants {
                Decision::Accepted
            } else {
                Decision::Overage
            };
            logged.from_base = q.min(left);
            let mut rest = q - logged.from_base;
            for (_, _, gi, key, window, avail) in grants {
                if rest <= 0.0 {
                    break;
                }
                let take = rest.min(avail);
                rest -= take;
                logged.from_grants.push((key.clone(), window, take));
                let since = self
                    .grants_since
                    .get(&(ci, key.clone()))
                    .copied()
                    .unwrap_or(usize::MAX);
                if avail - take <= 0.0
                    && self
                        .sent
                        .insert((ci, fi, format!("grant {key} {since}"), window))
                {
                    notices.push(format!("grant_exhausted {}", c.grants[gi].id));
                }
            }
            let used = used_before + q;
            if limit > 0.0 {
                for th in THRESHOLDS {
                    if used * 100.0 >= f64::from(th) * limit
                        && self
                            .sent
                            .insert((ci, fi, format!("threshold {th}"), period.0))
                    {
                        notices.push(format!("threshold {th}"));
                    }
                }
            }
            decision
        };
        logged.decision = decision;
        if decision != Decision::UnknownCustomer {
            self.log.push(logged);
        }
        (decision, notices)
    }
}

fn notice_names(notices: &[Notice]) -> Vec<String> {
    notices
        .iter()
        .map(|n| match &n.kind {
            NoticeKind::Threshold(t) => format!("threshold {t}"),
            NoticeKind::LimitReached => "limit_reached".to_owned(),
            NoticeKind::GrantExhausted(id) => format!("grant_exhausted {id}"),
        })
        .collect()
}

// ---------------------------------------------------------------- restarts

thread_local! {
    /// Counts of what the restarts went through, for the coverage check.
    static SEEN: RefCell<HashMap<String, u64>> = RefCell::default();
}

/// An event as the log of a partition keeps it: customer, feature, quantity, time,
/// region, user, the decision recorded and the notices it sent.
type Recorded = (
    usize,
    usize,
    u32,
    i64,
    Option<usize>,
    Option<usize>,
    Decision,
    Vec<Notice>,
);

/// The last checkpoint and what was decided since, as the lake would hold them.
#[derive(Default)]
struct Restarts {
    checkpoint: Vec<tally_core::snapshot::Account>,
    log: Vec<Recorded>,
    /// The last op changed a definition.
    defined: bool,
}

impl Restarts {
    fn checkpoint(&mut self, engine: &Engine) {
        self.checkpoint = engine.snapshot();
        self.log.clear();
    }

    /// A new engine with the model's definitions, the checkpoint, and the log replayed.
    fn restart(
        &mut self,
        running: &mut Engine,
        model: &Model,
        step: usize,
    ) -> Result<Engine, TestCaseError> {
        let mut engine = Engine::new();
        for p in model.plans.values() {
            engine.upsert_plan(p.clone());
        }
        for a in model.addons.values() {
            engine.upsert_addon(a.clone());
        }
        for c in model.customers.values() {
            engine.upsert_customer(c.clone());
        }
        engine.restore(self.checkpoint.clone());
        for recorded in &self.log {
            let (usage, decision, sent) = replayed(recorded);
            let mut again = Vec::new();
            engine.replay(&usage, decision, &mut again);
            prop_assert_eq!(
                &again,
                sent,
                "step {}: replayed notices of {:?}",
                step,
                usage
            );
            if !again.is_empty() {
                SEEN.with(|s| {
                    *s.borrow_mut()
                        .entry("notice replayed".to_owned())
                        .or_default() += 1
                });
            }
        }
        let expected = normalized(running.snapshot());
        prop_assert_eq!(
            normalized(engine.snapshot()),
            expected.clone(),
            "step {}: the restarted engine holds other counts",
            step
        );
        // Restoring replaces whatever an engine counted (as when a worker takes a partition
        // over again after a failure): the running engine, restored and replayed, is back
        // where it was.
        running.restore(self.checkpoint.clone());
        for recorded in &self.log {
            let (usage, decision, _) = replayed(recorded);
            running.replay(&usage, decision, &mut Vec::new());
        }
        prop_assert_eq!(
            normalized(running.snapshot()),
            expected,
            "step {}: restored in place",
            step
        );
        Ok(engine)
    }
}

/// A recorded event as the engine replays it.
fn replayed(r: &Recorded) -> (Usage<'static>, Decision, &Vec<Notice>) {
    let (ci, fi, q, t, region, user, decision, sent) = r;
    let usage = Usage {
        customer: CUSTOMERS[*ci],
        feature: FEATURES[*fi],
        quantity: f64::from(*q),
        time: *t,
        region: region.map(|r| REGIONS[r]),
        user: user.map(|u| USERS[u]),
    };
    (usage, *decision, sent)
}

/// A snapshot in an order that does not depend on hash tables or feature numbering.
fn normalized(
    mut accounts: Vec<tally_core::snapshot::Account>,
) -> Vec<tally_core::snapshot::Account> {
    accounts.sort_by(|a, b| a.customer.cmp(&b.customer));
    for a in &mut accounts {
        a.counters.sort_by(|x, y| x.feature.cmp(&y.feature));
        a.grants
            .sort_by(|x, y| (&x.feature, &x.id).cmp(&(&y.feature, &y.id)));
        let seats = a.counters.iter_mut().filter_map(|c| c.seats.as_mut());
        for s in seats.chain(a.seats.as_mut()) {
            s.users.sort_unstable();
        }
    }
    accounts
}

// ---------------------------------------------------------------- generators

fn entitlement(fi: usize) -> impl Strategy<Value = Option<Entitlement>> {
    prop_oneof![
        1 => Just(None),
        1 => any::<bool>().prop_map(|enabled| Some(Entitlement::Boolean { enabled })),
        1 => (0u32..5).prop_map(|v| Some(Entitlement::Static { value: serde_json::json!(v) })),
        5 => (
            prop::option::weighted(0.85, 0u32..40),
            any::<bool>(),
            prop::option::weighted(0.3, 1u32..3),
        )
            .prop_map(move |(limit, hard, seats)| {
                let mut m = Metered::new(limit.map(f64::from));
                m.period = KINDS[fi];
                m.enforcement = if hard { Enforcement::Hard } else { Enforcement::Soft };
                m.thresholds = THRESHOLDS.to_vec();
                m.seats = seats;
                m.next_plan = Some("plus".to_owned());
                Some(Entitlement::Metered(m))
            }),
    ]
}

fn plan(id: &'static str) -> impl Strategy<Value = Plan> {
    (
        entitlement(0),
        entitlement(1),
        entitlement(2),
        prop::option::weighted(0.3, 1u32..4),
    )
        .prop_map(move |(a, b, c, seats)| Plan {
            id: id.to_owned(),
            name: id.to_owned(),
            features: [a, b, c]
                .into_iter()
                .enumerate()
                .filter_map(|(i, e)| e.map(|e| (FEATURES[i].to_owned(), e)))
                .collect(),
            seats,
            prices: None,
        })
}

fn addon() -> impl Strategy<Value = AddOn> {
    (
        0u32..20,
        any::<bool>(),
        prop::option::weighted(0.3, 1u32..3),
    )
        .prop_map(|(extra, export, seats)| AddOn {
            id: "boost".to_owned(),
            name: "Boost".to_owned(),
            features: if export {
                BTreeMap::from([("export".to_owned(), Entitlement::Boolean { enabled: true })])
            } else {
                BTreeMap::new()
            },
            extra: BTreeMap::from([("calls".to_owned(), f64::from(extra))]),
            seats,
            price: None,
        })
}

fn grant() -> impl Strategy<Value = Grant> {
    (
        0usize..3,
        1u32..30,
        -48i64..400,
        prop::option::weighted(0.5, 1i64..600),
        0u32..3,
        prop::option::weighted(
            0.3,
            prop_oneof![Just(UsagePeriod::Day), Just(UsagePeriod::Month)],
        ),
        0usize..3,
    )
        .prop_map(|(fi, amount, eff, life, priority, recurring, id)| {
            let effective = START + eff * HOUR;
            Grant {
                id: format!("g{id}"),
                feature: FEATURES[fi].to_owned(),
                amount: f64::from(amount),
                effective: time(effective),
                expires: life.map(|l| time(effective + l * HOUR)),
                priority,
                recurring,
            }
        })
}

fn customer(ci: usize, anchor: u8) -> impl Strategy<Value = Customer> {
    (
        0usize..2,
        prop::option::weighted(0.4, 1u32..3),
        prop::option::weighted(0.2, 1u32..4),
        prop::collection::vec(grant(), 0..3),
        prop::option::weighted(0.2, -100i64..200),
        prop::option::weighted(0.2, 100i64..900),
        any::<(bool, bool)>(),
        prop::bool::weighted(0.1),
    )
        .prop_map(
            move |(plan, addon, seats, grants, from, until, (fence, eu), suspended)| Customer {
                id: CUSTOMERS[ci].to_owned(),
                plan: PLANS[plan].to_owned(),
                addons: addon
                    .map(|quantity| AddOnRef {
                        id: "boost".to_owned(),
                        quantity,
                    })
                    .into_iter()
                    .collect(),
                seats,
                grants,
                valid_from: from.map(|h| time(START + h * HOUR)),
                valid_until: until.map(|h| time(START + h * HOUR)),
                regions: if fence {
                    vec![REGIONS[usize::from(!eu)].to_owned()]
                } else {
                    vec![]
                },
                status: if suspended {
                    Status::Suspended
                } else {
                    Status::Active
                },
                anchor_day: anchor,
            },
        )
}

#[derive(Debug, Clone)]
enum Op {
    Event {
        customer: usize,
        feature: usize,
        quantity: u32,
        region: Option<usize>,
        user: Option<usize>,
    },
    /// Hours forward (events happen at the clock).
    Advance(i64),
    /// An event this many hours in the past.
    Past {
        hours: i64,
        customer: usize,
        feature: usize,
        quantity: u32,
    },
    Plan(Plan),
    RemovePlan(usize),
    Addon(AddOn),
    Customer(Customer),
    Checkpoint,
    Restart,
}

fn ops(anchors: [u8; 2]) -> impl Strategy<Value = Vec<Op>> {
    let event = (
        0usize..2,
        0usize..3,
        0u32..12,
        prop::option::weighted(0.9, 0usize..2),
        prop::option::weighted(0.7, 0usize..4),
    )
        .prop_map(|(customer, feature, quantity, region, user)| Op::Event {
            customer,
            feature,
            quantity,
            region,
            user,
        });
    let op = prop_oneof![
        30 => event,
        4 => prop_oneof![0i64..3, 20i64..200, 600i64..800].prop_map(Op::Advance),
        2 => (1i64..100, 0usize..2, 0usize..3, 0u32..12).prop_map(|(hours, customer, feature, quantity)| Op::Past { hours, customer, feature, quantity }),
        2 => prop_oneof![plan("basic"), plan("plus")].prop_map(Op::Plan),
        1 => (0usize..2).prop_map(Op::RemovePlan),
        1 => addon().prop_map(Op::Addon),
        3 => prop_oneof![customer(0, anchors[0]), customer(1, anchors[1])].prop_map(Op::Customer),
        2 => Just(Op::Checkpoint),
        2 => Just(Op::Restart),
    ];
    prop::collection::vec(op, 1..160)
}

fn scenario() -> impl Strategy<Value = (Vec<Plan>, AddOn, Vec<Customer>, Vec<Op>)> {
    (1u8..=31, 1u8..=31).prop_flat_map(|(a0, a1)| {
        (
            (plan("basic"), plan("plus")).prop_map(|(a, b)| vec![a, b]),
            addon(),
            (customer(0, a0), customer(1, a1)).prop_map(|(a, b)| vec![a, b]),
            ops([a0, a1]),
        )
    })
}

/// Runs the property and checks that the random scenarios reached every decision and
/// every kind of notice: agreement on cases that never happen would prove nothing.
#[test]
fn the_engine_decides_and_notifies_as_the_model_does() {
    // A fixed seed keeps the suite repeatable; `PROPTEST_CASES=20000 TALLY_PROPTEST_SEED=…`
    // explores further (failures are saved to `model.proptest-regressions` and replayed).
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let config = ProptestConfig {
        cases: env("PROPTEST_CASES").map_or(400, |c| c as u32),
        rng_seed: RngSeed::Fixed(env("TALLY_PROPTEST_SEED").unwrap_or(20_261_128)),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/model.proptest-regressions"
        )))),
        ..ProptestConfig::default()
    };
    let seen: RefCell<HashMap<String, u64>> = RefCell::default();
    SEEN.with(|s| s.borrow_mut().clear());
    let mut runner = TestRunner::new(config);
    let result = runner.run(&scenario(), |(plans, addon, customers, ops)| {
        let mut engine = Engine::new();
        let mut model = Model::default();
        for p in plans {
            model.plans.insert(p.id.clone(), p.clone());
            engine.upsert_plan(p);
        }
        model.addons.insert(addon.id.clone(), addon.clone());
        engine.upsert_addon(addon);
        // The first customer starts unknown until an op defines it.
        for c in customers.into_iter().skip(1) {
            model.customers.insert(c.id.clone(), c.clone());
            engine.upsert_customer(c);
        }
        model.refresh();
        let mut now = START;
        let mut notices = Vec::new();
        let mut restarts = Restarts::default();
        for (step, op) in ops.into_iter().enumerate() {
            // As in the worker, a definition change is followed by a checkpoint.
            if std::mem::take(&mut restarts.defined) {
                restarts.checkpoint(&engine);
            }
            restarts.defined = matches!(
                op,
                Op::Plan(_) | Op::RemovePlan(_) | Op::Addon(_) | Op::Customer(_)
            );
            let (ci, fi, q, t, region, user) = match op {
                Op::Event {
                    customer,
                    feature,
                    quantity,
                    region,
                    user,
                } => (customer, feature, quantity, now, region, user),
                Op::Past {
                    hours,
                    customer,
                    feature,
                    quantity,
                } => (
                    customer,
                    feature,
                    quantity,
                    now - hours * HOUR,
                    Some(0),
                    None,
                ),
                Op::Advance(h) => {
                    now += h * HOUR;
                    continue;
                }
                Op::Plan(p) => {
                    model.plans.insert(p.id.clone(), p.clone());
                    model.refresh();
                    engine.upsert_plan(p);
                    continue;
                }
                Op::RemovePlan(i) => {
                    model.plans.remove(PLANS[i]);
                    model.refresh();
                    engine.remove_plan(PLANS[i]);
                    continue;
                }
                Op::Addon(a) => {
                    model.addons.insert(a.id.clone(), a.clone());
                    model.refresh();
                    engine.upsert_addon(a);
                    continue;
                }
                Op::Customer(c) => {
                    model.customers.insert(c.id.clone(), c.clone());
                    model.refresh();
                    engine.upsert_customer(c);
                    continue;
                }
                Op::Checkpoint => {
                    restarts.checkpoint(&engine);
                    continue;
                }
                Op::Restart => {
                    engine = restarts.restart(&mut engine, &model, step)?;
                    *seen.borrow_mut().entry("restart".to_owned()).or_default() += 1;
                    continue;
                }
            };
            let usage = Usage {
                customer: CUSTOMERS[ci],
                feature: FEATURES[fi],
                quantity: f64::from(q),
                time: t,
                region: region.map(|r| REGIONS[r]),
                user: user.map(|u| USERS[u]),
            };
            // A check first: it must predict the decision and change nothing.
            let predicted = engine.check(&usage).decision;
            notices.clear();
            let got = engine.decide(&usage, &mut notices);
            let mut seen = seen.borrow_mut();
            *seen.entry(format!("decision {got}")).or_default() += 1;
            for n in &notices {
                *seen
                    .entry(format!("notice {}", n.kind.as_str()))
                    .or_default() += 1;
            }
            restarts
                .log
                .push((ci, fi, q, t, region, user, got, notices.clone()));
            let (want, want_notices) = model.decide(ci, fi, f64::from(q), t, region, user);
            prop_assert_eq!(got, want, "step {}: {:?}", step, usage);
            prop_assert_eq!(predicted, got, "step {}: the check disagrees", step);
            prop_assert_eq!(
                notice_names(&notices),
                want_notices,
                "step {}: notices",
                step
            );
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let mut seen = seen.into_inner();
    seen.extend(SEEN.with(|s| s.borrow().clone()));
    // `metered` is the worker's word for `unknown_customer` when unknown customers are
    // metered (`ingest.meter_unknown_customers`): the engine never decides it.
    let decisions = Decision::ALL
        .iter()
        .filter(|d| **d != Decision::Metered)
        .map(|d| format!("decision {d}"));
    let notices = ["threshold", "limit_reached", "grant_exhausted"].map(|n| format!("notice {n}"));
    let restarts = ["restart".to_owned(), "notice replayed".to_owned()];
    for kind in decisions.chain(notices).chain(restarts) {
        assert!(
            seen.get(&kind).copied().unwrap_or(0) > 0,
            "no {kind} in {seen:?}"
        );
    }
}
