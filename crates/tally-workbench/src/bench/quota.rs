//! `tally bench quota`: decisions per second of the quota engine on one core, and its
//! memory per customer × feature counter.
//!
//! The catalogue is the shape of a real one: three plans of `--features` features each
//! (metered with hard and soft limits, per month, day and billing period; booleans; static
//! values; seats), customers spread 70 / 25 / 5 over them, a tenth with a grant. Events go
//! to customers by a power law (a few large ones, a long tail, as `tally demo` sends) and to
//! features by another, over one month, so counters roll over at day ends and limits are
//! reached. The events are made before the clock starts; the clock covers `decide` alone.

use std::time::Instant;

use clap::Args;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tally_core::Decision;
use tally_core::entitlement::{
    Customer, Enforcement, Entitlement, Grant, Metered, Plan, UsagePeriod,
};
use tally_quota::{Engine, Usage};

use super::BenchFormat;
use crate::workload::PowerLaw;

#[derive(Args)]
pub struct QuotaBench {
    #[arg(long, default_value_t = 100_000)]
    customers: u32,
    #[arg(long, default_value_t = 20)]
    features: u32,
    #[arg(long, default_value_t = 20_000_000)]
    decisions: u64,
    /// Counters held while measuring memory per counter.
    #[arg(long, default_value_t = 1_000_000)]
    memory_counters: u64,
    /// Send events to customers uniformly instead of by a power law (every decision a
    /// cache miss: the worst case).
    #[arg(long)]
    uniform: bool,
    /// Events per message: a message carries one customer's events, decided one after
    /// the other (so after the first, that customer's account is in cache). 1: every event
    /// from a new draw.
    #[arg(long, default_value_t = 1)]
    per_message: usize,
    #[arg(long, value_enum, default_value_t = BenchFormat::Table)]
    format: BenchFormat,
}

#[derive(Debug, Serialize)]
pub struct QuotaReport {
    pub per_message: usize,
    pub customers: u32,
    pub features: u32,
    pub counters: usize,
    pub decisions: u64,
    pub seconds: f64,
    pub decisions_per_sec: f64,
    pub ns_per_decision: f64,
    pub by_decision: Vec<(&'static str, u64)>,
    pub memory_counters: usize,
    pub bytes_per_counter: Option<f64>,
}

const MONTH_US: i64 = 30 * 24 * 3_600_000_000;
const START: i64 = 1_793_491_200_000_000; // 2026-11-01T00:00:00Z

fn feature_names(n: u32) -> Vec<String> {
    (0..n.max(1)).map(|i| format!("feature-{i:02}")).collect()
}

/// Three plans over the same features; `scale` multiplies the metered limits.
fn catalogue(features: &[String]) -> Vec<Plan> {
    [
        ("free", 1.0, None),
        ("pro", 20.0, Some(25)),
        ("enterprise", 1_000.0, None),
    ]
    .into_iter()
    .map(|(id, scale, seats)| Plan {
        id: id.to_owned(),
        name: id.to_owned(),
        features: features
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let e = match i % 10 {
                    8 => Entitlement::Boolean {
                        enabled: id != "free",
                    },
                    9 => Entitlement::Static {
                        value: serde_json::json!(10.0 * scale),
                    },
                    k => {
                        let mut m = Metered::new(Some(500.0 * scale * (1 + k) as f64));
                        m.period =
                            [UsagePeriod::Month, UsagePeriod::Day, UsagePeriod::Billing][k % 3];
                        m.enforcement = if k % 2 == 0 {
                            Enforcement::Hard
                        } else {
                            Enforcement::Soft
                        };
                        m.next_plan = Some("pro".to_owned());
                        Entitlement::Metered(m)
                    }
                };
                (f.clone(), e)
            })
            .collect(),
        seats,
        prices: None,
    })
    .collect()
}

fn customers(n: u32, features: &[String], rng: &mut SmallRng) -> Vec<Customer> {
    (0..n)
        .map(|i| {
            let plan = match rng.random_range(0..100) {
                0..70 => "free",
                70..95 => "pro",
                _ => "enterprise",
            };
            let mut c = Customer::new(format!("cust-{i:06}"), plan);
            c.anchor_day = rng.random_range(1..=28);
            if rng.random_range(0..10) == 0 {
                c.grants.push(Grant {
                    id: "welcome".to_owned(),
                    feature: features[0].clone(),
                    amount: 1_000.0,
                    effective: chrono::DateTime::from_timestamp_micros(START).unwrap_or_default(),
                    expires: None,
                    priority: 0,
                    recurring: None,
                });
            }
            c
        })
        .collect()
}

fn engine(customers: &[Customer], plans: &[Plan]) -> Engine {
    let mut engine = Engine::new();
    for p in plans {
        engine.upsert_plan(p.clone());
    }
    for c in customers {
        engine.upsert_customer(c.clone());
    }
    engine
}

/// Resident memory of this process in bytes, from `/proc/self/status`.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Bytes of resident memory per counter, with `counters` counters held and each used once.
fn bytes_per_counter(counters: u64, features: &[String]) -> (usize, Option<f64>) {
    let mut rng = SmallRng::seed_from_u64(7);
    let n = u32::try_from(counters.div_ceil(features.len() as u64)).unwrap_or(u32::MAX);
    let plans = catalogue(features);
    let definitions = customers(n, features, &mut rng);
    let before = resident_bytes();
    let mut engine = engine(&definitions, &plans);
    drop(definitions);
    let mut notices = Vec::new();
    for i in 0..n {
        let customer = format!("cust-{i:06}");
        for f in features {
            let usage = Usage {
                customer: &customer,
                feature: f,
                quantity: 1.0,
                time: START,
                region: None,
                user: None,
            };
            engine.decide(&usage, &mut notices);
            notices.clear();
        }
    }
    let after = resident_bytes();
    let held = engine.counters();
    let per = before
        .zip(after)
        .map(|(b, a)| a.saturating_sub(b) as f64 / held.max(1) as f64);
    drop(engine);
    (held, per)
}

pub fn run(args: QuotaBench) -> anyhow::Result<std::process::ExitCode> {
    let features = feature_names(args.features);
    let (memory_counters, bytes) = bytes_per_counter(args.memory_counters, &features);

    let mut rng = SmallRng::seed_from_u64(42);
    let plans = catalogue(&features);
    let definitions = customers(args.customers.max(1), &features, &mut rng);
    let mut engine = engine(&definitions, &plans);
    let names: Vec<&str> = definitions.iter().map(|c| c.id.as_str()).collect();
    let users: Vec<String> = (0..40).map(|u| format!("user-{u}")).collect();

    // A ring of pre-drawn events, replayed with the clock moving through the month.
    let customer_w = PowerLaw::new(names.len(), 0.9);
    let feature_w = PowerLaw::new(features.len(), 1.1);
    // The customer ids of the ring lie in one buffer, in ring order, as they do in the
    // messages a worker decodes; a pointer to each definition's own string would add a
    // cache miss per decision that a worker does not have.
    let ring: Vec<(u32, u16, u8, f64)> = (0..1_000_000)
        .map(|_| {
            let c = if args.uniform {
                rng.random_range(0..names.len())
            } else {
                customer_w.pick(&mut rng)
            };
            (
                c as u32,
                feature_w.pick(&mut rng) as u16,
                rng.random_range(0..users.len()) as u8,
                f64::from(rng.random_range(1..=10u32)),
            )
        })
        .collect();

    let mut arena = String::new();
    let spans: Vec<(usize, usize)> = ring
        .iter()
        .map(|r| {
            let start = arena.len();
            arena.push_str(names[r.0 as usize]);
            (start, arena.len())
        })
        .collect();
    let events: Vec<Usage<'_>> = ring
        .iter()
        .zip(&spans)
        .map(|(&(_, f, u, q), &(from, to))| Usage {
            customer: &arena[from..to],
            feature: &features[f as usize],
            quantity: q,
            time: START,
            region: None,
            user: Some(&users[u as usize]),
        })
        .collect();

    let mut counts = [0u64; Decision::ALL.len()];
    let mut notices = Vec::new();
    let step = (MONTH_US / args.decisions.max(1) as i64).max(1);
    let per_message = args.per_message.max(1);
    let start = Instant::now();
    let (mut i, mut k) = (0u64, 0usize);
    while i < args.decisions {
        // A message: the customer of event `k`, with the features and users of the
        // events drawn from there on; each message starts one event further on.
        let customer = events[k].customer;
        let n = per_message.min((args.decisions - i) as usize);
        let mut e = k;
        for j in 0..n as u64 {
            let usage = Usage {
                customer,
                time: START + (i + j) as i64 * step,
                ..events[e]
            };
            // As the worker does: one `decide` per event, under one lock per message.
            let d = engine.decide(&usage, &mut notices);
            counts[d as usize] += 1;
            e = if e + 1 == events.len() { 0 } else { e + 1 };
        }
        notices.clear();
        i += n as u64;
        k = if k + 1 == events.len() { 0 } else { k + 1 };
    }
    let seconds = start.elapsed().as_secs_f64();

    let report = QuotaReport {
        per_message,
        customers: args.customers,
        features: args.features,
        counters: engine.counters(),
        decisions: args.decisions,
        seconds,
        decisions_per_sec: args.decisions as f64 / seconds,
        ns_per_decision: seconds * 1e9 / args.decisions.max(1) as f64,
        by_decision: Decision::ALL
            .iter()
            .map(|d| (d.as_str(), counts[*d as usize]))
            .filter(|(_, n)| *n > 0)
            .collect(),
        memory_counters,
        bytes_per_counter: bytes,
    };
    match args.format {
        BenchFormat::Json => println!("{}", serde_json::to_string(&report)?),
        BenchFormat::Table => {
            println!(
                "quota engine: {} decisions ({} per message) over {} customers × {} features in {:.2} s: {:.0} decisions/s ({:.0} ns each), one core",
                report.decisions,
                report.per_message,
                report.customers,
                report.features,
                report.seconds,
                report.decisions_per_sec,
                report.ns_per_decision
            );
            for (d, n) in &report.by_decision {
                println!("  {d:>16}  {n}");
            }
            match report.bytes_per_counter {
                Some(b) => println!(
                    "memory: {b:.0} bytes per counter with {} counters held",
                    report.memory_counters
                ),
                None => println!("memory: /proc/self/status not readable here"),
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
