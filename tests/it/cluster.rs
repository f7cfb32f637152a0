//! Tally on a three-node NATS cluster: every stream and bucket is made with the configured
//! replicas, one made earlier with fewer is raised to them, and a command run without the
//! setting takes no copies away.

use async_nats::jetstream;
use futures::TryStreamExt as _;
use tally_ingest::IngestConfig;
use tally_natsd::{NatsCluster, Service};

/// The replicas of every stream (buckets are streams too), by name, each asked of the
/// stream itself (a listing made while streams change their replicas can repeat one).
async fn replicas(js: &jetstream::Context) -> Vec<(String, usize)> {
    let mut names: Vec<String> = js.stream_names().try_collect().await.unwrap();
    names.sort();
    names.dedup();
    let mut all = Vec::new();
    for name in names {
        let mut stream = js.get_stream(&name).await.unwrap();
        let replicas = stream.info().await.unwrap().config.num_replicas;
        all.push((name, replicas));
    }
    all
}

/// Opens the streams and buckets as Tally's processes do, with `replicas` copies.
async fn open_all(js: &jetstream::Context, replicas: usize) {
    let config = IngestConfig {
        replicas,
        ..IngestConfig::default()
    };
    tally_ingest::topology::ensure_streams(js, &config)
        .await
        .unwrap();
    tally_ingest::definitions::Definitions::open(js, replicas)
        .await
        .unwrap();
    tally_api::ApiKeys::open(js, replicas).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_buckets_take_the_configured_replicas_and_never_lose_them() {
    let cluster = tokio::task::spawn_blocking(|| NatsCluster::start_temp(3))
        .await
        .unwrap()
        .expect("nats-server (scripts/install-nats.sh)");
    let js = jetstream::new(cluster.connect(Service::Admin).await.unwrap());
    // As a deployment that began on one server: everything with one copy.
    let one = IngestConfig::default();
    tally_ingest::topology::ensure_streams(&js, &one)
        .await
        .unwrap();
    tally_ingest::definitions::Definitions::open(&js, 1)
        .await
        .unwrap();
    tally_api::ApiKeys::open(&js, 1).await.unwrap();
    let made = replicas(&js).await;
    assert!(made.len() >= 6, "{made:?}");
    assert!(made.iter().all(|(_, r)| *r == 1), "{made:?}");

    // Grown to the cluster: opened with three, each is raised to three.
    open_all(&js, 3).await;
    let raised = replicas(&js).await;
    assert_eq!(raised.len(), made.len());
    assert!(raised.iter().all(|(_, r)| *r == 3), "{raised:?}");

    // A command run without the setting (one copy) takes none away.
    tally_ingest::topology::ensure_streams(&js, &one)
        .await
        .unwrap();
    tally_ingest::definitions::Definitions::open(&js, 1)
        .await
        .unwrap();
    tally_api::ApiKeys::open(&js, 1).await.unwrap();
    assert_eq!(replicas(&js).await, raised);

    // And the events stream still partitions as it did.
    let events = js
        .get_stream(tally_core::subject::EVENTS_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(events.num_replicas, 3);
    assert!(events.subject_transform.is_some());
}
