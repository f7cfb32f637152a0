//! Nobody gets into NATS where they don't belong: anonymous clients are refused by every
//! server Tally runs or configures, an application's key reaches only its customers'
//! subjects and no JetStream API at all, a revoked or expired key loses NATS within its
//! session, and the forged-key attack (writing a key record straight into the bucket)
//! fails. Every refusal asserted here is nats-server's, not Tally's.

use std::time::{Duration, Instant};

use crate::common::{Harness, TestApi, until};
use async_nats::connection::State;
use reqwest::{Method, StatusCode};
use tally::pipeline;
use tally_api::Role;
use tally_core::subject::{CUSTOMERS_BUCKET, KEYS_BUCKET, events_subject};
use tally_sdk::{Client, NatsTarget, Options};
use tokio::sync::mpsc;

const CATALOG: &str = r#"
    [[plans]]
    id = "pro"
    name = "Pro"
    [plans.features.calls]
    kind = "metered"
    limit = 1000
    enforcement = "hard"
"#;

const CUSTOMERS: &str = r#"
    [[customers]]
    id = "acme"
    plan = "pro"

    [[customers]]
    id = "globex"
    plan = "pro"
"#;

/// A connection made with an API key, and the errors the server sent it (permissions
/// violations arrive as asynchronous `-ERR`s).
struct Keyed {
    client: async_nats::Client,
    errors: mpsc::UnboundedReceiver<String>,
}

impl Keyed {
    async fn connect(h: &Harness, key: &str) -> Result<Keyed, async_nats::ConnectError> {
        let (tx, errors) = mpsc::unbounded_channel();
        let client = tally_sdk::connect_options(key)
            .unwrap()
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        let _ = tx.send(e.to_string());
                    }
                }
            })
            .connect(h.server.url())
            .await?;
        Ok(Keyed { client, errors })
    }

    /// Waits for the server's refusal naming `subject`.
    async fn refused(&mut self, subject: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.errors.recv()).await {
                Ok(Some(error)) if error.contains(subject) => {
                    assert!(
                        error.to_lowercase().contains("permissions violation"),
                        "{error}"
                    );
                    return;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => panic!("nats-server did not refuse {subject}"),
            }
        }
    }
}

/// The harness with definitions, a worker and the API (which answers the auth callout),
/// with NATS sessions of `session_secs`.
async fn deployment(session_secs: u64) -> (Harness, pipeline::Pipeline, TestApi) {
    deploy(Harness::start().await, session_secs).await
}

async fn deploy(mut h: Harness, session_secs: u64) -> (Harness, pipeline::Pipeline, TestApi) {
    // The refusals this file provokes are logged as violations on purpose.
    h.expect_violations = true;
    h.config.api.nats_session_secs = session_secs;
    h.define(CATALOG, CUSTOMERS).await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    let api = h.api().await;
    (h, pipeline, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_server_refuses_anonymous_clients_and_unknown_keys() {
    let (h, pipeline, api) = deployment(50).await;
    let anonymous = async_nats::connect(h.server.url()).await;
    assert!(anonymous.is_err(), "an anonymous client got in");
    let made_up = Keyed::connect(&h, "tally_0123456789abcdef_00").await;
    assert!(made_up.is_err(), "a made-up key got in");
    // A key of a role with no NATS access is refused too, though valid over HTTP.
    let billing = api.key(&h, Role::Billing, &[]).await;
    assert!(Keyed::connect(&h, &billing).await.is_err());
    let sdk = api.key(&h, Role::Sdk, &["acme"]).await;
    let keyed = Keyed::connect(&h, &sdk).await.unwrap();
    keyed.client.flush().await.unwrap();
    let metrics = api
        .request(Method::GET, "/metrics", Some(&api.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tally_auth_failures_total")
                && l.contains("transport=\"nats\"")
                && l.contains("reason=\"unknown\"")),
        "{metrics}"
    );
    pipeline.shutdown().await.unwrap();
}

/// An `sdk` key for acme: its events land, its checks are answered; everything else the
/// server refuses: another customer's events and checks, a consumer, the keys and
/// customers buckets, the event stream, and writing a forged key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_key_reaches_its_customers_subjects_and_nothing_else() {
    let (h, pipeline, api) = deployment(50).await;
    let key = api.key(&h, Role::Sdk, &["acme"]).await;

    // Through the SDK, as an application would, given the servers of a cluster one of
    // which is down: it connects to one that answers.
    let options = Options {
        partitions: h.config.ingest.partitions,
        ..Options::default()
    };
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let servers = format!("nats://{down}, {}", h.server.url());
    let sdk = Client::nats(NatsTarget::with_key(servers, key.clone()), options)
        .await
        .unwrap();
    for _ in 0..5 {
        sdk.record("acme", "calls", 2.0).await.unwrap();
    }
    sdk.flush().await.unwrap();
    h.drain(&pipeline, 5).await;
    let answer = sdk.check("acme", "calls").await.unwrap();
    assert_eq!(answer.usage, 10.0, "{answer:?}");
    // Another customer's check never reaches a worker.
    assert!(sdk.check("globex", "calls").await.is_err());

    let mut keyed = Keyed::connect(&h, &key).await.unwrap();
    let mut js = async_nats::jetstream::new(keyed.client.clone());
    // A refused request is never answered: wait for the server's refusal, not long for an
    // answer.
    js.set_timeout(Duration::from_millis(500));
    // Another customer's events.
    let other = events_subject("globex");
    keyed
        .client
        .publish(other.clone(), "[]".into())
        .await
        .unwrap();
    keyed.refused(&other).await;
    // The JetStream API: a consumer, the buckets, the stream.
    assert!(js.get_stream("TALLY_EVENTS").await.is_err());
    keyed.refused("$JS.API.STREAM.INFO.TALLY_EVENTS").await;
    assert!(js.get_key_value(KEYS_BUCKET).await.is_err());
    keyed.refused("$JS.API.STREAM.INFO.KV_tally_api_keys").await;
    assert!(js.get_key_value(CUSTOMERS_BUCKET).await.is_err());
    keyed
        .refused("$JS.API.STREAM.INFO.KV_tally_customers")
        .await;
    let consumer = async_nats::jetstream::consumer::pull::Config {
        durable_name: Some("spy".to_owned()),
        ..Default::default()
    };
    assert!(
        js.create_consumer_on_stream(consumer, "TALLY_EVENTS")
            .await
            .is_err()
    );
    keyed.refused("$JS.API.CONSUMER.").await;
    // Reading the events as they are stored.
    let _spy = keyed.client.subscribe("tally.part.>").await.unwrap();
    keyed.refused("tally.part.>").await;

    // The forged-key attack: a record of an admin key written into the bucket directly.
    let forged_secret = "00".repeat(32);
    let record = serde_json::json!({
        "id": "f0f0f0f0f0f0f0f0",
        "role": "admin",
        "created_at": "2026-01-01T00:00:00Z",
        "secret_sha256": hex_sha256(&forged_secret),
    });
    let subject = format!("$KV.{KEYS_BUCKET}.f0f0f0f0f0f0f0f0");
    keyed
        .client
        .publish(subject.clone(), record.to_string().into())
        .await
        .unwrap();
    keyed.refused(&subject).await;
    let forged = format!("tally_f0f0f0f0f0f0f0f0_{forged_secret}");
    let audit = api
        .request(Method::GET, "/api/v1/audit", Some(&forged))
        .send()
        .await
        .unwrap();
    assert_eq!(audit.status(), StatusCode::UNAUTHORIZED);

    // Nothing of globex's arrived; acme's five events are all there is.
    let (_, rows, _) = crate::common::read_lake(&h);
    assert_eq!(rows, 5);
    sdk.shutdown().await.unwrap();
    pipeline.shutdown().await.unwrap();
}

/// A revoked key, and an expired portal key, lose NATS within the session: the server
/// closes the connection when its user expires and Tally refuses the key on reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_expired_keys_lose_nats_within_the_session() {
    let session = 3;
    let (h, pipeline, api) = deployment(session).await;
    let key = api.key(&h, Role::Sdk, &["acme"]).await;
    let keyed = Keyed::connect(&h, &key).await.unwrap();
    let keys = tally_api::ApiKeys::open(&h.nats.jetstream, 1)
        .await
        .unwrap();
    let expires = chrono::Utc::now() + chrono::Duration::seconds(2);
    let portal_key = keys
        .create_expiring(
            Role::Portal,
            vec!["acme".to_owned()],
            String::new(),
            Some(expires),
        )
        .await
        .unwrap()
        .token;
    let portal = Keyed::connect(&h, &portal_key).await.unwrap();
    let _notices = portal
        .client
        .subscribe("tally.notify.*.acme")
        .await
        .unwrap();
    portal.client.flush().await.unwrap();
    keyed.client.flush().await.unwrap();

    let id = key.split('_').nth(1).unwrap();
    let revoked_at = Instant::now();
    keys.revoke(id).await.unwrap();
    let bound = Duration::from_secs(session + 10);
    // Lost: disconnected, and not back.
    until("the revoked key's connection is closed", || async {
        keyed.client.connection_state() != State::Connected
    })
    .await;
    assert!(revoked_at.elapsed() < bound, "{:?}", revoked_at.elapsed());
    assert!(
        Keyed::connect(&h, &key).await.is_err(),
        "the revoked key got in again"
    );

    until("the expired portal key's connection is closed", || async {
        portal.client.connection_state() != State::Connected
    })
    .await;
    assert!(
        Keyed::connect(&h, &portal_key).await.is_err(),
        "the expired key got in again"
    );
    pipeline.shutdown().await.unwrap();
}

fn hex_sha256(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Over TLS: the worker, the API and an application's SDK reach a nats-server that serves
/// TLS only; events land and checks are answered; a client that does not trust the CA,
/// and a plain connection, are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_and_checks_over_tls() {
    let (h, pipeline, api) = deploy(Harness::start_tls().await, 50).await;
    let ca = h.server.ca().expect("the harness made a CA");
    assert!(h.server.url().starts_with("tls://"), "{}", h.server.url());
    let key = api.key(&h, Role::Sdk, &["acme"]).await;
    let options = Options {
        partitions: h.config.ingest.partitions,
        ..Options::default()
    };
    let target = NatsTarget::with_key(h.server.url(), key.clone()).trusting(&ca);
    let sdk = Client::nats(target, options).await.unwrap();
    for _ in 0..3 {
        sdk.record("acme", "calls", 1.0).await.unwrap();
    }
    sdk.flush().await.unwrap();
    h.drain(&pipeline, 3).await;
    assert_eq!(sdk.check("acme", "calls").await.unwrap().usage, 3.0);

    let untrusting = tally_sdk::connect_options(&key)
        .unwrap()
        .require_tls(true)
        .connect(h.server.url())
        .await;
    assert!(
        untrusting.is_err(),
        "a client that does not trust the CA got in"
    );
    let plain = tally_sdk::connect_options(&key)
        .unwrap()
        .connect(h.server.url().replace("tls://", "nats://"))
        .await;
    assert!(plain.is_err(), "a plain connection got in");
    sdk.shutdown().await.unwrap();
    pipeline.shutdown().await.unwrap();
}

/// The embedded default, as the README's first command runs it: its nats-server refuses
/// anonymous clients, its credentials and first admin key are readable by their owner
/// only, and no secret it made or was sent (API keys, wrong secrets, nkey seeds) appears
/// in its logs (at debug), nats-server's log, the metrics or an error body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_is_closed_and_keeps_its_secrets() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let tally = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tally"));
        c.arg("--data-dir").arg(&data).env("TALLY_LOG", "debug");
        c
    };
    let mut serve = tally()
        .arg("serve")
        .env("TALLY_API__LISTEN", "127.0.0.1:0")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(serve.stderr.take().unwrap()).lines();
    let mut output = String::new();
    let mut base = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(url) = line.strip_prefix("tally api on ") {
            base = Some(url.trim().to_owned());
        }
        output.push_str(&line);
        output.push('\n');
        if line.contains("tally is running") {
            break;
        }
    }
    let base = base.expect("tally serve started its API");
    let logged = std::thread::spawn(move || {
        lines
            .map_while(Result::ok)
            .fold(String::new(), |out, l| out + &l + "\n")
    });

    // Owner-only files.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let admin_file = data.join("api-admin.key");
    assert_eq!(mode(&admin_file), 0o600);
    let admin = std::fs::read_to_string(&admin_file)
        .unwrap()
        .trim()
        .to_owned();
    let credentials = data.join("nats/credentials");
    assert_eq!(mode(&credentials), 0o700);
    let mut secrets = vec![admin.clone()];
    for entry in std::fs::read_dir(&credentials).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "nk") {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
            secrets.push(std::fs::read_to_string(&path).unwrap().trim().to_owned());
        }
    }
    assert!(secrets.len() >= 5, "the admin key and four seeds");

    // The embedded server refuses anonymous clients.
    let url = tally_natsd::running(&data.join("nats")).expect("the embedded server runs");
    assert!(
        async_nats::connect(url.as_str()).await.is_err(),
        "the embedded server let an anonymous client in"
    );

    // A key made by the CLI; its secret goes to stdout only, for the caller to keep.
    let made = tally()
        .args(["keys", "create", "--role", "sdk", "--customer", "acme"])
        .output()
        .unwrap();
    assert!(made.status.success());
    output.push_str(&String::from_utf8_lossy(&made.stderr));
    let key = String::from_utf8(made.stdout).unwrap().trim().to_owned();
    let (id, secret) = key
        .strip_prefix("tally_")
        .and_then(|k| k.split_once('_'))
        .unwrap();
    let wrong = format!("tally_{id}_{}", "ab".repeat(32));
    secrets.extend([key.clone(), secret.to_owned(), "ab".repeat(32)]);

    // Over HTTP: a wrong secret, a forbidden route, the metrics.
    let http = crate::common::http();
    for (token, path) in [
        (wrong.as_str(), "/api/v1/customers/acme/entitlements"),
        (key.as_str(), "/api/v1/audit"),
        (admin.as_str(), "/metrics"),
    ] {
        let answer = http
            .get(format!("{base}{path}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        output.push_str(&answer.text().await.unwrap());
    }
    // Over NATS: the key gets in, the wrong secret does not.
    let options = Options {
        partitions: 16,
        ..Options::default()
    };
    let sdk = Client::nats(NatsTarget::with_key(url.clone(), key.clone()), options)
        .await
        .unwrap();
    sdk.record("acme", "calls", 1.0).await.unwrap();
    sdk.flush().await.unwrap();
    sdk.shutdown().await.unwrap();
    let refused = tally_sdk::connect_options(&wrong)
        .unwrap()
        .connect(url.as_str())
        .await;
    assert!(refused.is_err(), "a wrong secret got into NATS");
    let revoked = tally().args(["keys", "revoke", id]).output().unwrap();
    assert!(revoked.status.success());
    output.push_str(&String::from_utf8_lossy(&revoked.stdout));
    output.push_str(&String::from_utf8_lossy(&revoked.stderr));

    let term = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert!(serve.wait().unwrap().success());
    output.push_str(&logged.join().unwrap());
    output.push_str(&std::fs::read_to_string(data.join("nats/nats-server.log")).unwrap());
    assert!(
        output.contains("NATS connection refused"),
        "the scenario's refusals were not logged: is the log complete?"
    );
    for secret in &secrets {
        assert!(
            !output.contains(secret.as_str()),
            "a secret appeared in the output: {}…",
            &secret[..8]
        );
    }
}

/// A `notifications` key for acme receives acme's notices, and nats-server refuses it
/// everyone else's and any publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notifications_key_reads_its_customers_notices_only() {
    use futures::StreamExt;
    let (h, pipeline, api) = deployment(50).await;
    let key = api.key(&h, Role::Notifications, &["acme"]).await;
    let mut keyed = Keyed::connect(&h, &key).await.unwrap();
    let mut mine = keyed.client.subscribe("tally.notify.*.acme").await.unwrap();
    keyed.client.flush().await.unwrap();
    // A notice as the worker publishes it, sent here by the operator, again until the
    // subscription (on another connection) is in place.
    let notice = r#"{"kind":"threshold_crossed","customer":"acme"}"#;
    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        h.nats
            .client
            .publish("tally.notify.threshold_crossed.acme", notice.into())
            .await
            .unwrap();
        if let Ok(got) = tokio::time::timeout(Duration::from_millis(200), mine.next()).await {
            break got.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "acme's notice did not arrive; the server said {:?}",
            keyed.errors.try_recv()
        );
    };
    assert_eq!(got.payload.as_ref(), notice.as_bytes());
    let _others = keyed
        .client
        .subscribe("tally.notify.*.globex")
        .await
        .unwrap();
    keyed.refused("tally.notify.*.globex").await;
    let _all = keyed.client.subscribe("tally.notify.>").await.unwrap();
    keyed.refused("tally.notify.>").await;
    keyed
        .client
        .publish("tally.notify.threshold_crossed.acme", "forged".into())
        .await
        .unwrap();
    keyed.refused("tally.notify.threshold_crossed.acme").await;
    pipeline.shutdown().await.unwrap();
}
