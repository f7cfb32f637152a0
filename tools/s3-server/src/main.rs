//! `tally-s3-server`: s3s-fs, an S3-compatible server over a local directory (each
//! subdirectory of the root a bucket), with its conditional writes made atomic.
//!
//! s3s-fs (crates.io) honours `If-None-Match: *` and `If-Match` on PutObject, but checks
//! the condition and then writes: two concurrent creates of one key may both succeed, the
//! later silently replacing the earlier. Delta Lake commits are exactly such creates (each
//! writer puts the log's next version if it is absent), so two workers committing at once
//! could both believe they committed while one commit is lost. This server runs s3s-fs's
//! file system and service unchanged, with the one difference that requests carrying a
//! condition (`If-None-Match` or `If-Match`) are served one at a time, check and write
//! together, as S3 itself does. Other requests run concurrently.
//!
//! A conditional request's body is read whole before the condition is checked. s3s-fs
//! answers a failed condition without reading the body; the connection then closes with
//! the unread rest of the body in its buffer, and the kernel resets it, so a client still
//! sending its body may see a reset instead of the `412` (a racing create "failed
//! otherwise"). Reading the body first lets every loser read its answer.
//!
//! The command line is s3s-fs's (`--host`, `--port`, `--access-key`, `--secret-key`,
//! the root directory), and it prints `server is running at http://HOST:PORT` once it
//! listens, as s3s-fs does.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use hyper::body::Incoming;
use hyper::service::{Service, service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use s3s::{Body, HttpError};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

#[derive(Debug, Parser)]
#[command(version, about)]
struct Opt {
    /// Host name to listen on.
    #[arg(long, default_value = "localhost")]
    host: String,
    /// Port number to listen on.
    #[arg(long, default_value_t = 8014)]
    port: u16,
    /// Access key used for authentication (with `--secret-key`).
    #[arg(long, requires = "secret_key")]
    access_key: Option<String>,
    /// Secret key used for authentication (with `--access-key`).
    #[arg(long, requires = "access_key")]
    secret_key: Option<String>,
    /// Root directory of stored data: each subdirectory is a bucket.
    root: PathBuf,
}

/// The largest conditional request body read before its condition is checked. Delta log
/// entries and checkpoints of a lake are far smaller.
const CONDITIONAL_BODY_LIMIT: usize = 256 << 20;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let opt = Opt::parse();
    let file_system = s3s_fs::FileSystem::new(&opt.root)
        .map_err(|e| format!("the root directory {}: {e:?}", opt.root.display()))?;
    let mut builder = S3ServiceBuilder::new(file_system);
    if let (Some(key), Some(secret)) = (opt.access_key, opt.secret_key) {
        builder.set_auth(SimpleAuth::from_single(key, secret));
    }
    let s3 = builder.build();
    // Held by each conditional request from its check to the end of its write.
    let conditional = Arc::new(Mutex::new(()));

    let listener = TcpListener::bind((opt.host.as_str(), opt.port)).await?;
    eprintln!("server is running at http://{}", listener.local_addr()?);
    loop {
        let socket = match listener.accept().await {
            Ok((socket, _)) => socket,
            Err(e) => {
                eprintln!("error accepting a connection: {e}");
                continue;
            }
        };
        let (s3, conditional) = (s3.clone(), conditional.clone());
        let service = service_fn(move |request: hyper::Request<Incoming>| {
            let (s3, conditional) = (s3.clone(), conditional.clone());
            async move {
                let headers = request.headers();
                if !(headers.contains_key(hyper::header::IF_NONE_MATCH)
                    || headers.contains_key(hyper::header::IF_MATCH))
                {
                    return Service::call(&s3, request).await;
                }
                let (parts, body) = request.into_parts();
                let mut body = Body::from(body);
                // A client that is gone or sends too much gets its connection closed.
                body.store_all_limited(CONDITIONAL_BODY_LIMIT)
                    .await
                    .map_err(HttpError::new)?;
                let _one_at_a_time = conditional.lock_owned().await;
                s3.call(hyper::Request::from_parts(parts, body)).await
            }
        });
        tokio::spawn(async move {
            let connection = Builder::new(TokioExecutor::new());
            let _ = connection
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}
