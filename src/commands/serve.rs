//! `tally serve`, `tally worker` and `tally api`: run until Ctrl-C or SIGTERM, then drain
//! in order.

use anyhow::Context as _;
use tally_node::config::Config;
use tally_node::pipeline::{self, Nats};
use tokio_util::sync::CancellationToken;

/// Whether an error is NATS failing an operation (retrying later may help), not a
/// configuration or topology one.
fn nats_unavailable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<tally_ingest::Error>(),
            Some(tally_ingest::Error::Nats { .. })
        ) || matches!(
            c.downcast_ref::<tally_api::keys::KeyError>(),
            Some(tally_api::keys::KeyError::Nats { .. })
        ) || matches!(
            c.downcast_ref::<tally_api::licenses::LicenseKeyError>(),
            Some(tally_api::licenses::LicenseKeyError::Nats { .. })
        )
    })
}

/// Runs `start` until it succeeds, retrying while NATS is unavailable (it may be
/// restarting while this process starts) for up to two minutes.
async fn starting<T, F: Future<Output = anyhow::Result<T>>>(
    what: &str,
    mut start: impl FnMut() -> F,
) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut pause = std::time::Duration::from_millis(250);
    loop {
        match start().await {
            Ok(started) => return Ok(started),
            Err(e) if nats_unavailable(&e) && std::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "cannot start the {what} yet");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Runs the worker (and the API, `with_api`) until Ctrl-C or SIGTERM, then drains in
/// order: the worker first, the API last, so requests can be answered while it drains.
pub async fn run(
    config: Config,
    partitions: Option<Vec<u16>>,
    with_api: bool,
) -> anyhow::Result<std::process::ExitCode> {
    // Handlers first: a SIGTERM during start-up must drain, not kill.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let nats = Nats::connect(&config, pipeline::Service::Worker).await?;
    let pipeline = starting("worker", || {
        pipeline::start(&config, &nats, partitions.clone())
    })
    .await?;
    let stop_api = CancellationToken::new();
    let api = if with_api {
        let api = starting("api", || {
            let checks = pipeline.local_checks.clone();
            tally_node::api::Api::start(&config, &nats, checks, stop_api.clone())
        })
        .await?;
        announce(&api);
        Some(api)
    } else {
        None
    };
    tracing::info!(lake = %tally_store::Storage::open(&config.lake())?.url(), "tally is running; Ctrl-C stops it");
    let cancel = pipeline.cancel_token();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; draining"),
        _ = term.recv() => tracing::info!("terminated; draining"),
        () = cancel.cancelled() => tracing::error!("a component failed; stopping"),
    }
    pipeline.shutdown().await?;
    stop_api.cancel();
    if let Some(api) = api {
        api.stopped().await?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Runs the API alone until Ctrl-C or SIGTERM.
pub async fn api(config: Config) -> anyhow::Result<std::process::ExitCode> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let nats = Nats::connect(&config, pipeline::Service::Api).await?;
    let stop = CancellationToken::new();
    let api = starting("api", || {
        tally_node::api::Api::start(&config, &nats, None, stop.clone())
    })
    .await?;
    announce(&api);
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
        _ = term.recv() => tracing::info!("terminated; stopping"),
    }
    stop.cancel();
    api.stopped().await?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Tells the operator where the API is, and where the first admin key went.
fn announce(api: &tally_node::api::Api) {
    eprintln!("tally api on {}", api.url());
    if let Some((_, path)) = &api.bootstrap {
        eprintln!(
            "no API key existed: an admin key was made and written to {} (tally keys create makes others)",
            path.display()
        );
    }
}
