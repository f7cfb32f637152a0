//! Partition ownership between worker processes: two workers never write the same
//! partition, a killed worker's partitions are taken over by the others, and workers that
//! share the partitions hand some over when another joins.

use crate::common;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::common::{Harness, Serve};
use chrono::NaiveDate;
use parquet::file::reader::{FileReader, SerializedFileReader};
use tally::workload::{self, OutMessage, Spec, Totals};
use tally_ingest::ownership::{LEASES_BUCKET, lease_key, worker_pid};

const LEASE_MS: &str = "1500";

fn phase(seed: u64) -> (Vec<OutMessage>, Totals) {
    let mut spec = Spec::new(4_000, NaiveDate::from_ymd_opt(2026, 10, 1).unwrap());
    spec.customers = 50;
    spec.batch = 20;
    spec.seed = seed;
    spec.duplicate_rate = 0.01;
    workload::generate(&spec)
}

fn worker(h: &Harness, partitions: Option<&str>) -> Serve {
    let mut args = vec!["worker"];
    if let Some(p) = partitions {
        args.extend(["--partitions", p]);
    }
    common::run_tally(
        h,
        &args,
        &[
            ("TALLY_INGEST__LEASE_MS", LEASE_MS),
            ("TALLY_INGEST__FLUSH_AGE_MS", "50"),
        ],
    )
}

/// Each partition's owner as the leases bucket says.
async fn owners(h: &Harness) -> BTreeMap<u16, String> {
    let kv = h.nats.jetstream.get_key_value(LEASES_BUCKET).await.unwrap();
    let mut owners = BTreeMap::new();
    for p in 0..h.config.ingest.partitions {
        if let Some(v) = kv.get(lease_key(p)).await.unwrap() {
            owners.insert(p, String::from_utf8(v.to_vec()).unwrap());
        }
    }
    owners
}

/// Every visible lake file's stream-sequence range, from its metadata, by partition and
/// date directory. A compaction merges one date's files of a partition: a batch that was
/// split across dates may then be one range in one date and part of a wider one in
/// another, so ranges are compared within a directory.
fn ranges(h: &Harness) -> HashMap<(u16, PathBuf), Vec<(u64, u64)>> {
    let mut ranges: HashMap<(u16, PathBuf), Vec<(u64, u64)>> = HashMap::new();
    for path in common::parquet_files(&h.lake_events()) {
        let reader = SerializedFileReader::new(File::open(&path).unwrap()).unwrap();
        let meta = reader.metadata().file_metadata();
        let get = |key: &str| -> u64 {
            meta.key_value_metadata()
                .unwrap()
                .iter()
                .find(|kv| kv.key == key)
                .and_then(|kv| kv.value.as_deref())
                .unwrap()
                .parse()
                .unwrap()
        };
        let range = (get("tally.first_seq"), get("tally.last_seq"));
        let partition = u16::try_from(get("tally.partition")).unwrap();
        let dir = path.parent().unwrap().to_owned();
        let held = ranges.entry((partition, dir)).or_default();
        // A batch split across dates is one range in several files.
        if !held.contains(&range) {
            held.push(range);
        }
    }
    ranges
}

/// One writer per partition leaves sequence ranges that never overlap: two workers
/// pulling from one consumer would each seal ranges spanning the other's messages.
fn assert_one_writer_per_partition(h: &Harness) {
    for ((partition, dir), mut list) in ranges(h) {
        list.sort_unstable();
        for pair in list.windows(2) {
            assert!(
                pair[0].1 < pair[1].0,
                "partition {partition} in {}: files cover overlapping sequences {pair:?}",
                dir.display()
            );
        }
    }
}

async fn until_lake_holds(h: &Harness, rows: u64) {
    common::until(
        &format!("the lake holds {rows} rows, all acknowledged"),
        || async { common::lake_rows(h) >= rows && common::consumer_backlog(h).await == (0, 0) },
    )
    .await;
}

async fn publish(h: &Harness, messages: &[OutMessage]) {
    workload::publish(&h.nats.jetstream, messages, 256, |_| {})
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_on_the_same_partitions_never_both_write_and_a_killed_ones_are_taken_over() {
    let h = Harness::start().await;
    h.entitle_everyone(50).await;
    let partitions = h.config.ingest.partitions;
    let all = format!("0-{}", partitions - 1);
    // Both started at once, both asking for every partition.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| worker(&h, Some(&all)));
        let b = s.spawn(|| worker(&h, Some(&all)));
        (a.join().unwrap(), b.join().unwrap())
    });
    common::until("every partition has an owner", || async {
        owners(&h).await.len() == usize::from(partitions)
    })
    .await;
    let first = owners(&h).await;
    let ids: std::collections::BTreeSet<&String> = first.values().collect();
    assert!(ids.len() <= 2, "{first:?}");
    let pids = [a.0.id(), b.0.id()];
    assert!(
        ids.iter()
            .all(|id| worker_pid(id).is_some_and(|p| pids.contains(&p)))
    );

    let (m1, t1) = phase(1);
    publish(&h, &m1).await;
    until_lake_holds(&h, t1.events_valid).await;
    assert_eq!(owners(&h).await, first, "no partition changed hands");
    assert_one_writer_per_partition(&h);

    // The owner of partition 0 dies: the other worker takes every partition within the
    // lease and a third (and a poll), and nothing is lost or stored twice.
    let victim = worker_pid(&first[&0]).unwrap();
    let (mut dead, alive) = if a.0.id() == victim { (a, b) } else { (b, a) };
    assert_eq!(dead.0.id(), victim);
    dead.0.kill().unwrap();
    dead.0.wait().unwrap();
    let killed_at = Instant::now();
    let survivor = loop {
        let now = owners(&h).await;
        let ids: std::collections::BTreeSet<&String> = now.values().collect();
        if now.len() == usize::from(partitions) && ids.len() == 1 {
            break now.values().next().unwrap().clone();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(20),
            "the partitions were not taken over: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(first.values().any(|o| *o == survivor));

    let (m2, t2) = phase(2);
    publish(&h, &m2).await;
    until_lake_holds(&h, t1.events_valid + t2.events_valid).await;
    let (ids, rows, _) = common::read_lake(&h);
    assert_eq!(
        rows,
        t1.events_valid + t2.events_valid,
        "no row stored twice"
    );
    assert_eq!(ids.len() as u64, rows);
    assert_one_writer_per_partition(&h);
    common::terminate(alive);
    assert!(
        owners(&h).await.is_empty(),
        "a clean stop releases its leases"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_sharing_the_partitions_hand_half_over_to_a_newcomer() {
    let h = Harness::start().await;
    h.entitle_everyone(50).await;
    let partitions = usize::from(h.config.ingest.partitions);
    let a = worker(&h, None);
    common::until("the only worker owns every partition", || async {
        owners(&h).await.len() == partitions
    })
    .await;
    let (m1, t1) = phase(3);
    publish(&h, &m1).await;

    let b = worker(&h, None);
    common::until("the two workers own half each", || async {
        let now = owners(&h).await;
        let mut per: HashMap<&String, usize> = HashMap::new();
        for o in now.values() {
            *per.entry(o).or_default() += 1;
        }
        now.len() == partitions && per.len() == 2 && per.values().all(|n| *n == partitions / 2)
    })
    .await;
    let (m2, t2) = phase(4);
    publish(&h, &m2).await;
    until_lake_holds(&h, t1.events_valid + t2.events_valid).await;
    let (ids, rows, _) = common::read_lake(&h);
    assert_eq!(rows, t1.events_valid + t2.events_valid);
    assert_eq!(
        ids.len() as u64,
        rows,
        "no row stored twice across the handover"
    );
    assert_one_writer_per_partition(&h);

    // One leaves cleanly: the other takes its half back.
    common::terminate(a);
    common::until("the remaining worker owns every partition", || async {
        let now = owners(&h).await;
        now.len() == partitions
            && now
                .values()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                == 1
    })
    .await;
    common::terminate(b);
}
