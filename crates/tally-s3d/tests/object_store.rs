//! The server as the lake will use it: through `object_store`'s S3 client, with the
//! conditional writes a Delta commit relies on (`PutMode::Create`, `If-None-Match: *`).

use std::time::Duration;

use futures::TryStreamExt as _;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path;
use object_store::{
    Error, ObjectStore, ObjectStoreExt as _, PutMode, PutOptions, PutPayload, RetryConfig,
    UpdateVersion,
};
use tally_s3d::S3Server;

fn client(server: &S3Server, secret: &str, retry: RetryConfig) -> AmazonS3 {
    AmazonS3Builder::new()
        .with_endpoint(server.endpoint())
        .with_bucket_name(server.bucket())
        .with_access_key_id(server.access_key())
        .with_secret_access_key(secret)
        .with_region(server.region())
        .with_allow_http(true)
        .with_conditional_put(S3ConditionalPut::ETagMatch)
        .with_retry(retry)
        .build()
        .unwrap()
}

fn store(server: &S3Server) -> AmazonS3 {
    let retry = RetryConfig {
        retry_timeout: Duration::from_secs(20),
        ..RetryConfig::default()
    };
    client(server, server.secret_key(), retry)
}

/// One attempt, so that a refused request fails at once.
fn no_retries() -> RetryConfig {
    RetryConfig {
        max_retries: 0,
        ..RetryConfig::default()
    }
}

async fn create(store: &AmazonS3, path: &Path, body: &'static str) -> object_store::Result<()> {
    let opts = PutOptions::from(PutMode::Create);
    store
        .put_opts(path, PutPayload::from_static(body.as_bytes()), opts)
        .await
        .map(drop)
}

async fn read(store: &AmazonS3, path: &Path) -> String {
    let bytes = store.get(path).await.unwrap().bytes().await.unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

async fn keys(store: &AmazonS3, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = store
        .list(Some(&Path::from(prefix)))
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .unwrap();
    keys.sort();
    keys
}

#[tokio::test]
async fn a_create_of_an_existing_key_fails_with_already_exists() {
    let server = S3Server::start_temp().expect("run scripts/install-s3.sh first");
    let store = store(&server);
    let commit = Path::from("events/_delta_log/00000000000000000000.json");
    create(&store, &commit, "first").await.unwrap();
    let second = create(&store, &commit, "second").await;
    assert!(
        matches!(second, Err(Error::AlreadyExists { .. })),
        "{second:?}"
    );
    assert_eq!(read(&store, &commit).await, "first", "the loser overwrote");
    // A create of another key still succeeds.
    let next = Path::from("events/_delta_log/00000000000000000001.json");
    create(&store, &next, "next").await.unwrap();
    assert_eq!(read(&store, &next).await, "next");
}

/// Racing creates of one key, as two workers committing the same Delta version at once:
/// exactly one wins, each other fails with `AlreadyExists`, and the object is the winner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_racing_creates_of_a_key_exactly_one_wins() {
    const KEYS: usize = 40;
    const RACERS: usize = 8;
    let server = S3Server::start_temp().unwrap();
    let store = std::sync::Arc::new(store(&server));
    let mut races = Vec::new();
    for key in 0..KEYS {
        let path = Path::from(format!("events/_delta_log/{key:020}.json"));
        for racer in 0..RACERS {
            let (store, path) = (store.clone(), path.clone());
            // Large enough that a body takes a while to arrive.
            let body = format!("{racer}:").repeat(20_000);
            races.push(tokio::spawn(async move {
                let opts = PutOptions::from(PutMode::Create);
                let put = store
                    .put_opts(&path, PutPayload::from(body.clone()), opts)
                    .await;
                (key, body, put)
            }));
        }
    }
    let mut winners: Vec<Vec<String>> = vec![Vec::new(); KEYS];
    for race in races {
        let (key, body, put) = race.await.unwrap();
        match put {
            Ok(_) => winners[key].push(body),
            Err(Error::AlreadyExists { .. }) => {}
            Err(e) => panic!("a create failed otherwise: {e}"),
        }
    }
    for (key, won) in winners.iter().enumerate() {
        assert_eq!(won.len(), 1, "key {key}: {} creates succeeded", won.len());
        let path = Path::from(format!("events/_delta_log/{key:020}.json"));
        assert!(
            read(&store, &path).await == won[0],
            "key {key} holds another body"
        );
    }
}

/// `PutMode::Update`: the write succeeds with the object's current ETag only.
#[tokio::test]
async fn an_update_needs_the_current_etag() {
    let server = S3Server::start_temp().unwrap();
    let store = store(&server);
    let path = Path::from("checkpoints/0.json");
    let first = store
        .put(&path, PutPayload::from_static(b"v1"))
        .await
        .unwrap();
    let update = |result: &object_store::PutResult| {
        PutOptions::from(PutMode::Update(UpdateVersion {
            e_tag: result.e_tag.clone(),
            version: None,
        }))
    };
    let second = store
        .put_opts(&path, PutPayload::from_static(b"v2"), update(&first))
        .await
        .unwrap();
    assert_ne!(first.e_tag, second.e_tag);
    let stale = store
        .put_opts(&path, PutPayload::from_static(b"v3"), update(&first))
        .await;
    assert!(
        matches!(stale, Err(Error::Precondition { .. })),
        "{stale:?}"
    );
    assert_eq!(read(&store, &path).await, "v2");
}

#[tokio::test]
async fn lists_by_prefix_and_offset() {
    let server = S3Server::start_temp().unwrap();
    let store = store(&server);
    for key in [
        "events/_delta_log/00000000000000000000.json",
        "events/_delta_log/00000000000000000001.json",
        "events/_delta_log/00000000000000000002.json",
        "events/date=2026-11-01/part-0.parquet",
        "rollups/_delta_log/00000000000000000000.json",
    ] {
        create(&store, &Path::from(key), "x").await.unwrap();
    }
    assert_eq!(
        keys(&store, "events/_delta_log").await,
        [
            "events/_delta_log/00000000000000000000.json",
            "events/_delta_log/00000000000000000001.json",
            "events/_delta_log/00000000000000000002.json",
        ]
    );
    assert_eq!(keys(&store, "events").await.len(), 4);
    // How delta-rs reads a log past the version it has: keys after an offset.
    let after: Vec<String> = store
        .list_with_offset(
            Some(&Path::from("events/_delta_log")),
            &Path::from("events/_delta_log/00000000000000000000.json"),
        )
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        after,
        [
            "events/_delta_log/00000000000000000001.json",
            "events/_delta_log/00000000000000000002.json",
        ]
    );
    let listed = store
        .list_with_delimiter(Some(&Path::from("events")))
        .await
        .unwrap();
    let dirs: Vec<String> = listed.common_prefixes.iter().map(Path::to_string).collect();
    assert_eq!(dirs, ["events/_delta_log", "events/date=2026-11-01"]);
}

/// Objects survive a restart (same port, same keys); while the server is down a request
/// fails, and after the restart the same client works again.
#[tokio::test]
async fn objects_survive_a_restart_and_a_stopped_server_fails_requests() {
    let mut server = S3Server::start_temp().unwrap();
    let store = store(&server);
    let path = Path::from("events/_delta_log/00000000000000000000.json");
    create(&store, &path, "commit 0").await.unwrap();

    server.restart().unwrap();
    assert_eq!(read(&store, &path).await, "commit 0");
    let again = create(&store, &path, "commit 0 again").await;
    assert!(
        matches!(again, Err(Error::AlreadyExists { .. })),
        "{again:?}"
    );

    server.stop();
    let impatient = client(&server, server.secret_key(), no_retries());
    let down = tokio::time::timeout(Duration::from_secs(30), impatient.get(&path))
        .await
        .expect("a request to a stopped server hung");
    assert!(down.is_err(), "a stopped server answered");
    let put = tokio::time::timeout(
        Duration::from_secs(30),
        create(&impatient, &Path::from("while-down"), "x"),
    )
    .await
    .expect("a put to a stopped server hung");
    assert!(put.is_err(), "a stopped server took a write");

    server.restart().unwrap();
    assert_eq!(read(&store, &path).await, "commit 0");
    assert_eq!(
        keys(&store, "").await,
        ["events/_delta_log/00000000000000000000.json"]
    );
}

/// The server checks signatures: a client with the wrong secret is refused.
#[tokio::test]
async fn a_wrong_secret_is_refused() {
    let server = S3Server::start_temp().unwrap();
    let store = store(&server);
    let path = Path::from("a");
    create(&store, &path, "x").await.unwrap();
    let stranger = client(&server, "not-the-secret", no_retries());
    let got = stranger.get(&path).await;
    assert!(got.is_err(), "a wrong secret read an object");
    let put = create(&stranger, &Path::from("b"), "y").await;
    assert!(put.is_err(), "a wrong secret wrote an object");
    assert_eq!(keys(&store, "").await, ["a"]);
}
