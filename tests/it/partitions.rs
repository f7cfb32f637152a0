//! Growing the partition count on a running system (`tally partitions grow`): every event
//! stored once, the hard limits held across the move (each new partition starts from its
//! parent's counters), the bill exact, and checks sent on the old count answered.

use std::collections::BTreeMap;

use crate::common::Harness;
use tally::pipeline;
use tally_core::entitlement::{
    Catalog, Customer, Customers, Enforcement, Entitlement, Metered, Plan, Status,
};
use tally_core::partitions::Partitions;
use tally_core::subject::{self, partition_of};
use tally_ingest::checks::{CheckRequest, check};
use tally_ingest::definitions::Definitions;
use tally_query::{Lakehouse, Period, Scope};

const CUSTOMERS: usize = 48;
/// Rounds of events per customer: one before the growth, one during, one after.
const ROUNDS: usize = 3;
/// Events per customer per round, of 10 calls each: 1,200 calls sent, 1,000 allowed.
const PER_ROUND: usize = 40;
const LIMIT: f64 = 1000.0;

fn customer(i: usize) -> String {
    format!("grow-{i:03}")
}

async fn define(h: &Harness) {
    let defs = Definitions::open(&h.nats.jetstream, 1).await.unwrap();
    let mut calls = Metered::new(Some(LIMIT));
    calls.enforcement = Enforcement::Hard;
    let catalog = Catalog {
        plans: vec![Plan {
            id: "capped".to_owned(),
            name: "Capped".to_owned(),
            features: [("calls".to_owned(), Entitlement::Metered(calls))]
                .into_iter()
                .collect(),
            seats: None,
            prices: None,
        }],
        ..Catalog::default()
    };
    defs.apply_catalog(&catalog, "test").await.unwrap();
    let customers = (0..CUSTOMERS)
        .map(|i| Customer {
            status: Status::Active,
            ..Customer::new(customer(i), "capped")
        })
        .collect();
    defs.apply_customers(&Customers { customers }, "test")
        .await
        .unwrap();
}

/// One round: `PER_ROUND` events of every customer, one message each, all dated `time`.
async fn publish_round(js: &async_nats::jetstream::Context, round: usize, time: &str) {
    let mut acks = Vec::new();
    for i in 0..CUSTOMERS {
        let who = customer(i);
        for e in 0..PER_ROUND {
            let body = format!(
                r#"{{"specversion":"1.0","id":"{who}-{round}-{e}","source":"test","type":"usage","subject":"{who}","time":"{time}","data":{{"feature":"calls","quantity":10}}}}"#
            );
            acks.push(
                js.publish(subject::events_subject(&who), body.into())
                    .await
                    .unwrap(),
            );
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

fn tally(h: &Harness, args: &[&str]) -> serde_json::Value {
    serde_json::from_slice(&h.cli(args)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_count_grows_mid_run_with_every_event_once_and_the_limits_kept() {
    grow_and_check(false).await;
}

/// The first round is waiting in the stream, unhandled, when the count grows: each new
/// partition must wait for its parent to decide it before taking the parent's counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_partitions_wait_for_their_parents_backlog_before_taking_their_state() {
    grow_and_check(true).await;
}

/// Three rounds of events, the count growing from 16 to 64 after the first; with
/// `backlog`, no worker runs until after the growth.
async fn grow_and_check(backlog: bool) {
    let h = Harness::start().await;
    assert_eq!(h.config.ingest.partitions, 16);
    define(&h).await;
    // One time for every event: the whole run decides within one period, any day.
    let now = chrono::Utc::now();
    let time = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let shown = tally(&h, &["partitions", "show", "--format", "json"]);
    assert_eq!(shown["partitions"], 16);
    let transform = || async {
        let mut stream = h
            .nats
            .jetstream
            .get_stream(subject::EVENTS_STREAM)
            .await
            .unwrap();
        let info = stream.info().await.unwrap();
        info.config.subject_transform.clone().unwrap().destination
    };
    let made_with = transform().await;
    let mut pipeline = None;
    if !backlog {
        pipeline = Some(pipeline::start(&h.config, &h.nats, None).await.unwrap());
    }
    publish_round(&h.nats.jetstream, 0, &time).await;
    // The second round is published while the count grows, the third after.
    let publisher = {
        let (js, time) = (h.nats.jetstream.clone(), time.clone());
        tokio::spawn(async move { publish_round(&js, 1, &time).await })
    };
    let grown = tally(
        &h,
        &["partitions", "grow", "--to", "64", "--format", "json"],
    );
    assert_eq!(grown["partitions"], 64);
    let history = Partitions::parse(grown["history"].as_str().unwrap()).unwrap();
    assert_eq!(history.current(), 64);
    assert!(history.last_switch() > 0, "{history}");
    // A replica applies the transform as it stores each message: changed while messages
    // are published, it would store some under different partitions on different
    // replicas. A growth leaves it as the stream was made.
    assert_eq!(transform().await, made_with);
    let pipeline = match pipeline {
        Some(running) => running,
        None => pipeline::start(&h.config, &h.nats, None).await.unwrap(),
    };
    publisher.await.unwrap();
    publish_round(&h.nats.jetstream, 2, &time).await;

    let total = (CUSTOMERS * ROUNDS * PER_ROUND) as u64;
    crate::common::drain_partitions(&h, &pipeline, 64, total).await;

    // Every event once, each in a partition that held its customer when it was stored.
    let lake = Lakehouse::open(&h.config.lake()).await.unwrap();
    let rows = lake
        .context()
        .sql("SELECT event_id, customer, decision, partition_id FROM events")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut seen = BTreeMap::new();
    let mut decided: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut moved = 0;
    for batch in &rows {
        use arrow::array::AsArray;
        let id = batch.column(0).as_string::<i32>();
        let who = batch.column(1).as_string::<i32>();
        let decision = batch.column(2).as_string::<i32>();
        let partition = batch
            .column(3)
            .as_primitive::<arrow::datatypes::UInt16Type>();
        for i in 0..batch.num_rows() {
            assert!(
                seen.insert(id.value(i).to_owned(), ()).is_none(),
                "{} twice",
                id.value(i)
            );
            let (c, p) = (who.value(i), partition.value(i));
            assert!(
                p == partition_of(c, 16) || p == partition_of(c, 64),
                "{c} in partition {p}"
            );
            if p >= 16 {
                moved += 1;
            }
            *decided
                .entry((c.to_owned(), decision.value(i).to_owned()))
                .or_default() += 1;
        }
    }
    assert_eq!(seen.len() as u64, total);
    assert!(moved > 0, "no event reached a new partition");
    // The hard limit held across the move: 100 events of 10 allowed, the rest refused.
    for i in 0..CUSTOMERS {
        let c = customer(i);
        let get = |d: &str| {
            decided
                .get(&(c.clone(), d.to_owned()))
                .copied()
                .unwrap_or(0)
        };
        assert_eq!(get("accepted"), 100, "{c}: {decided:?}");
        assert_eq!(
            get("limit_reached"),
            (ROUNDS * PER_ROUND - 100) as u64,
            "{c}"
        );
    }
    // The bill: 1,000 calls for each customer.
    let period: Period = now.format("%Y-%m").to_string().parse().unwrap();
    let billed =
        tally_query::BillingTotals::of(&lake.billing(&Scope::Month(period), None).await.unwrap());
    assert_eq!(billed.lines, CUSTOMERS as u64, "{billed:?}");
    assert_eq!(billed.events, 100 * CUSTOMERS as u64, "{billed:?}");
    assert_eq!(billed.quantity, LIMIT * CUSTOMERS as f64, "{billed:?}");

    // A check sent on the count before the growth is forwarded to the partition now.
    let moved_customer = (0..CUSTOMERS)
        .map(customer)
        .find(|c| partition_of(c, 64) != partition_of(c, 16))
        .unwrap();
    for partitions in [16, 64] {
        let request = CheckRequest {
            customer: moved_customer.clone(),
            feature: "calls".to_owned(),
            quantity: 10.0,
            // At the events' time: the same period whenever the check runs.
            time: Some(now),
            region: None,
            user: None,
        };
        let reply = check(
            &h.nats.client,
            partitions,
            &request,
            std::time::Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(reply.usage, LIMIT, "asked on {partitions}: {reply:?}");
        assert!(!reply.has_access);
    }
    let shown = tally(&h, &["partitions", "show", "--format", "json"]);
    assert_eq!(shown["history"], grown["history"]);
    pipeline.shutdown().await.unwrap();
}
