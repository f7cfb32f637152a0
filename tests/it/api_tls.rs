//! The HTTP API over TLS (`api.tls_cert`, `api.tls_key`) with a certificate a private CA
//! signed (made here with rcgen): the SDK trusting that CA records and checks; a client
//! that does not trust it, plain HTTP and a client that never finishes its handshake get
//! nothing and hold up no one; the server still stops when told; bad settings are named.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use tally::pipeline;
use tally_api::{ApiConfig, Role};
use tally_sdk::{CaCertificate, Client, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::tls::TestCerts;
use crate::common::{self, Harness};

const CATALOG: &str = r#"
    [[plans]]
    id = "small"
    name = "Small"
    [plans.features.calls]
    kind = "metered"
    limit = 10
    enforcement = "hard"
"#;

const CUSTOMERS: &str = r#"
    [[customers]]
    id = "acme"
    plan = "small"
"#;

/// An error and its causes, as one line: a refused certificate is a cause, deep down.
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Reads what the server sends until it closes, for at most 30 seconds.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection")
        .ok();
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_client_trusting_the_ca_records_and_checks_over_https() {
    let h = Harness::start().await;
    h.define(CATALOG, CUSTOMERS).await;
    let certs = TestCerts::new();
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    let api = h.api_tls(&certs).await;
    assert!(api.base.starts_with("https://127.0.0.1:"), "{}", api.base);
    let ingest = api.key(&h, Role::Ingest, &["acme"]).await;
    let portal = api.key(&h, Role::Portal, &["acme"]).await;

    // The CA as a file: three events, acknowledged by the API over HTTPS.
    let options = Options {
        http_ca: Some(CaCertificate::file(&certs.ca)),
        ..Options::default()
    };
    let recorder = Client::http(&api.base, &ingest, options).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(recorder.record("acme", "calls", 1.0).await.unwrap());
    }
    recorder.flush().await.unwrap();
    assert_eq!((recorder.stats().sent, recorder.stats().failed), (3, 0));
    recorder.shutdown().await.unwrap();
    // … and stored: the lake holds those three.
    h.drain(&pipeline, 3).await;
    let (stored, rows, quantity) = common::read_lake(&h);
    assert_eq!((rows, quantity), (3, 3.0));
    for id in &ids {
        assert!(stored.contains(id), "event {id} is not in the lake");
    }

    // The CA as PEM text: checks answered by the worker, through the API.
    let options = Options {
        http_ca: Some(CaCertificate::pem(certs.ca_pem())),
        check_cache_ttl: Duration::ZERO,
        ..Options::default()
    };
    let checker = Client::http(&api.base, &portal, options).await.unwrap();
    let one = checker.check("acme", "calls").await.unwrap();
    assert_eq!((one.has_access, one.limit), (true, Some(10.0)), "{one:?}");
    let eleven = checker.check_quantity("acme", "calls", 11.0).await.unwrap();
    assert_eq!(
        (eleven.has_access, eleven.decision.as_str()),
        (false, "limit_reached")
    );
    // The key still decides: this one is for acme only.
    match checker.check("globex", "calls").await {
        Err(tally_sdk::Error::Refused { status: 403, .. }) => {}
        other => panic!("a portal key of acme checking globex: {other:?}"),
    }
    pipeline.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_trust_the_ca_is_refused_at_the_handshake() {
    let h = Harness::start().await;
    let certs = TestCerts::new();
    let api = h.api_tls(&certs).await;
    let healthz = format!("{}/healthz", api.base);

    // The system's roots only.
    let e = common::http().get(&healthz).send().await.unwrap_err();
    let words = causes(&e);
    assert!(
        words.contains("invalid peer certificate: UnknownIssuer"),
        "{words}"
    );
    // Trusting another CA (same name, another key) is no better.
    let stranger = TestCerts::new();
    let other = tally_sdk::http_client(Some(&CaCertificate::file(&stranger.ca)))
        .unwrap()
        .build()
        .unwrap();
    let e = other.get(&healthz).send().await.unwrap_err();
    let words = causes(&e);
    assert!(words.contains("invalid peer certificate"), "{words}");
    // The SDK says why.
    let key = api.key(&h, Role::Portal, &["acme"]).await;
    let sdk = Client::http(&api.base, &key, Options::default())
        .await
        .unwrap();
    match sdk.check("acme", "calls").await {
        Err(tally_sdk::Error::Unavailable(why)) => {
            assert!(
                why.contains("invalid peer certificate: UnknownIssuer"),
                "{why}"
            );
        }
        other => panic!("a check without the CA: {other:?}"),
    }

    // Meanwhile, a client trusting the CA is served.
    let ok = api.http.get(&healthz).send().await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_and_stalled_handshakes_get_nothing_and_hold_up_no_one() {
    let h = Harness::start().await;
    let certs = TestCerts::new();
    let api = h.api_tls(&certs).await;
    let addr = api.api.addr;

    // Connected, and silent: their handshakes wait (each up to the server's handshake
    // timeout, 10 s), each in a task of its own.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(TcpStream::connect(addr).await.unwrap());
    }

    // Plain HTTP to the TLS port: no HTTP answer at all, the connection closes.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut plain).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP was answered: {}",
        String::from_utf8_lossy(&answer)
    );
    // The same through an HTTP client: an error, never a 200.
    let through_client = common::http()
        .get(format!("http://{addr}/healthz"))
        .send()
        .await;
    if let Ok(response) = &through_client {
        assert_ne!(response.status(), StatusCode::OK);
    }

    // While the silent ones hold their connections, the API answers others at once, an
    // authenticated request included: well within the 30 s that three handshakes waited
    // out one after the other would take.
    let answered = async {
        for _ in 0..3 {
            let ok = api
                .request(reqwest::Method::GET, "/api/v1/customers", Some(&api.admin))
                .send()
                .await
                .unwrap();
            assert_eq!(ok.status(), StatusCode::OK);
        }
    };
    tokio::time::timeout(Duration::from_secs(20), answered)
        .await
        .expect("answered while handshakes are pending");
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_over_tls_stops_when_told_with_a_handshake_in_progress() {
    let h = Harness::start().await;
    let certs = TestCerts::new();
    let common::TestApi {
        base,
        http,
        stop,
        api,
        ..
    } = h.api_tls(&certs).await;
    let addr = api.addr;
    // A keep-alive connection at rest, and a handshake that never ends.
    let ok = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let mut stalled = TcpStream::connect(addr).await.unwrap();

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), api.stopped())
        .await
        .expect("the API stops within 30 s")
        .unwrap();
    // The handshake in progress was abandoned with the accept loop (its connection is
    // closed), and the port with it.
    let answer = read_until_closed(&mut stalled).await;
    assert!(answer.is_empty(), "{answer:?}");
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
}

/// `api.tls_cert` and `api.tls_key`: both or neither, files that exist, parse and go
/// together; each problem names its key and file.
#[test]
fn tls_settings_are_checked_and_each_problem_names_its_key_and_file() {
    let certs = TestCerts::new();
    let stranger = TestCerts::new();
    let problems = |cert: Option<&Path>, key: Option<&Path>| {
        ApiConfig {
            tls_cert: cert.map(Path::to_owned),
            tls_key: key.map(Path::to_owned),
            ..ApiConfig::default()
        }
        .problems()
    };
    assert_eq!(problems(None, None), Vec::<String>::new());
    assert_eq!(
        problems(Some(&certs.cert), Some(&certs.key)),
        Vec::<String>::new()
    );

    let one = |cert, key| {
        let p: Vec<String> = problems(cert, key);
        assert_eq!(p.len(), 1, "{p:?}");
        p.into_iter().next().unwrap()
    };
    let alone = one(Some(&certs.cert), None);
    assert!(alone.contains("set both"), "{alone}");
    let alone = one(None, Some(&certs.key));
    assert!(alone.contains("set both"), "{alone}");

    let absent = certs.dir.path().join("absent.pem");
    let missing = one(Some(&certs.cert), Some(&absent));
    assert!(
        missing.starts_with("api.tls_key: cannot read "),
        "{missing}"
    );
    assert!(missing.contains("absent.pem"), "{missing}");
    let missing = one(Some(&absent), Some(&certs.key));
    assert!(
        missing.starts_with("api.tls_cert: cannot read "),
        "{missing}"
    );

    // The files swapped: no certificate where one is expected.
    let swapped = one(Some(&certs.key), Some(&certs.cert));
    assert!(swapped.starts_with("api.tls_cert: "), "{swapped}");
    assert!(
        swapped.contains("server-key.pem holds no certificate"),
        "{swapped}"
    );

    // Another certificate's key.
    let foreign = one(Some(&certs.cert), Some(&stranger.key));
    assert!(foreign.starts_with("api.tls_key: "), "{foreign}");
    assert!(
        foreign.contains("cannot serve the certificate in"),
        "{foreign}"
    );
}

/// `tally serve` reads the two keys from its environment, says `https://`, and serves;
/// with a file missing it refuses to start and names the key and the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tally_serve_takes_its_certificate_from_the_environment() {
    let h = Harness::start().await;
    let certs = TestCerts::new();
    let absent = certs.dir.path().join("absent.pem");
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--nats-url", &h.server.url(), "--data-dir"])
        .arg(h.dir.path())
        .env("TALLY_API__LISTEN", "127.0.0.1:0")
        .env("TALLY_API__TLS_CERT", &certs.cert)
        .env("TALLY_API__TLS_KEY", &absent)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains(&format!("api.tls_key: cannot read {}", absent.display())),
        "{said}"
    );

    let cert = certs.cert.to_str().unwrap();
    let key = certs.key.to_str().unwrap();
    let serve = common::serve_with(
        &h,
        &[("TALLY_API__TLS_CERT", cert), ("TALLY_API__TLS_KEY", key)],
    );
    let base = serve.1.clone().expect("tally serve names its API");
    assert!(base.starts_with("https://"), "{base}");
    let http = tally_sdk::http_client(Some(&CaCertificate::file(&certs.ca)))
        .unwrap()
        .build()
        .unwrap();
    let ok = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    common::terminate(serve);
}
