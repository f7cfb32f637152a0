//! The process's Prometheus recorder: installed once, before the pipeline or the API
//! starts, so that the libraries' `metrics` calls land in it; the API renders it on
//! `GET /metrics`. Names and bucket bounds come from `tally_core::metrics`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tally_core::metrics as names;

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the recorder (the first call only) and returns its handle; `None` when
/// another recorder was installed first (metrics are then not served).
pub fn install() -> Option<PrometheusHandle> {
    RECORDER
        .get_or_init(|| match build().install_recorder() {
            Ok(handle) => {
                let upkeep = handle.clone();
                // Drains histogram samples into their buckets between scrapes.
                let spawned = std::thread::Builder::new()
                    .name("metrics-upkeep".to_owned())
                    .spawn(move || {
                        loop {
                            std::thread::sleep(Duration::from_secs(5));
                            upkeep.run_upkeep();
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start the metrics upkeep thread");
                }
                Some(handle)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot install the metrics recorder; /metrics is off");
                None
            }
        })
        .clone()
}

fn build() -> PrometheusBuilder {
    let mut builder = PrometheusBuilder::new();
    for name in names::HISTOGRAMS {
        let buckets = if *name == names::FLUSH_ROWS {
            names::ROWS_BUCKETS
        } else {
            names::SECONDS_BUCKETS
        };
        builder = builder
            .set_buckets_for_metric(Matcher::Full((*name).to_owned()), buckets)
            .expect("bucket bounds are not empty");
    }
    builder
}

/// What `GET /metrics` serves: the recorder's metrics, with the NATS connection's state
/// sampled at the scrape.
pub fn render(client: async_nats::Client) -> Option<tally_api::RenderMetrics> {
    let handle = install()?;
    Some(Arc::new(move || {
        let connected = client.connection_state() == async_nats::connection::State::Connected;
        metrics::gauge!(names::NATS_CONNECTED).set(if connected { 1.0 } else { 0.0 });
        handle.render()
    }))
}
