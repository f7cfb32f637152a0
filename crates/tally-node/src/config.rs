//! Configuration: defaults < file (`--config`, TOML) < `TALLY_*` environment variables.
//!
//! Nested keys use a double underscore in the environment: `TALLY_INGEST__FLUSH_AGE_MS=250`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use tally_api::ApiConfig;
use tally_ingest::IngestConfig;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// NATS server to use. Unset: start a local nats-server under `data_dir/nats`.
    pub nats_url: Option<String>,
    /// The NATS credentials directory (`worker.nk`, `api.nk`, `admin.nk`, `callout.nk`;
    /// each process reads only its own). Unset: `data_dir/nats/credentials`, made at the
    /// embedded server's first start (`tally nats init` makes one for a deployment).
    pub nats_credentials: Option<PathBuf>,
    /// A CA certificate (PEM) to trust for NATS over TLS (`tls://` URLs).
    pub nats_ca: Option<PathBuf>,
    /// Where the embedded nats-server's store and (unless `lake_s3` is set) the lake live.
    pub data_dir: PathBuf,
    /// The lake in an S3-compatible bucket (with conditional writes) instead of under
    /// `data_dir`: `bucket`, `prefix`, `endpoint`, `region`, `access_key_id`,
    /// `secret_access_key` (`TALLY_LAKE_S3__BUCKET=…` and so on in the environment).
    pub lake_s3: Option<tally_store::S3Location>,
    /// Path of the nats-server binary for the embedded default (searched when unset).
    pub nats_server: Option<PathBuf>,
    /// Parquet files encoded (and fsynced) at once. Above the core count on purpose: much
    /// of a write is waiting for fsync.
    pub writer_concurrency: usize,
    /// Sealed batches waiting for the lake writer, across all partitions.
    pub writer_queue: usize,
    /// Log filter, `tracing` env-filter syntax (`info`, `warn,tally=debug`). Unset: the
    /// command's own (`warn,tally=info` for `serve`, `worker` and `api`, warnings only for
    /// the others), raised by `-v` (see `main.rs`).
    pub log: Option<String>,
    /// Where SQL, billing, overage and adoption run: `local` (in the process that asks),
    /// or `ballista://HOST:PORT`, a Ballista scheduler (`tally ballista scheduler`) and
    /// its executors over the same lake.
    pub query_engine: tally_query::Engine,
    pub ingest: IngestConfig,
    pub api: ApiConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats_url: None,
            nats_credentials: None,
            nats_ca: None,
            data_dir: PathBuf::from("data"),
            lake_s3: None,
            nats_server: None,
            writer_concurrency: 8,
            writer_queue: 16,
            log: None,
            query_engine: tally_query::Engine::Local,
            ingest: IngestConfig::default(),
            api: ApiConfig::default(),
        }
    }
}

impl Config {
    /// Loads and validates the configuration; every problem is reported at once.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.is_file() {
                bail!("config file {} does not exist", file.display());
            }
            figment = figment.merge(Toml::file(file));
        }
        let config: Config = figment
            // TALLY_CONFIG names the file; TALLY_VENV and TALLY_S3_SERVER belong to the
            // install scripts and the test harness (scripts/test.sh exports the latter).
            .merge(
                Env::prefixed("TALLY_")
                    .ignore(&["CONFIG", "VENV", "S3_SERVER"])
                    .split("__"),
            )
            .extract()
            .context("reading configuration")?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let mut problems = self.ingest.problems();
        problems.extend(self.api.problems());
        if self.writer_concurrency == 0 {
            problems.push("writer_concurrency must be at least 1".to_owned());
        }
        if let Some(log) = &self.log
            && let Err(e) = tracing_subscriber::EnvFilter::try_new(log)
        {
            problems.push(format!("log: {e}"));
        }
        if self.writer_queue == 0 {
            problems.push("writer_queue must be at least 1".to_owned());
        }
        if let Some(s3) = &self.lake_s3 {
            for (field, value) in [
                ("bucket", &s3.bucket),
                ("access_key_id", &s3.access_key_id),
                ("secret_access_key", &s3.secret_access_key),
            ] {
                if value.trim().is_empty() {
                    problems.push(format!("lake_s3.{field} must not be empty"));
                }
            }
            if let Some(endpoint) = &s3.endpoint
                && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
            {
                problems.push(format!(
                    "lake_s3.endpoint must be an http:// or https:// URL, not {endpoint:?}"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("invalid configuration:\n  - {}", problems.join("\n  - "))
        }
    }

    /// The lake's directory when it is on local disk (`data_dir/lake`).
    pub fn lake_dir(&self) -> PathBuf {
        self.data_dir.join("lake")
    }

    /// Where the lake is: the bucket of `lake_s3`, or `data_dir/lake`.
    pub fn lake(&self) -> tally_store::Location {
        match &self.lake_s3 {
            Some(s3) => tally_store::Location::S3(s3.clone()),
            None => tally_store::Location::Local(self.lake_dir()),
        }
    }

    pub fn nats_dir(&self) -> PathBuf {
        self.data_dir.join("nats")
    }

    /// The NATS credentials directory.
    pub fn nats_credentials_dir(&self) -> PathBuf {
        self.nats_credentials
            .clone()
            .unwrap_or_else(|| self.nats_dir().join("credentials"))
    }
}

/// Parses a partition list such as `0-7`, `3`, or `0-3,8,10-11`.
pub fn parse_partitions(spec: &str, partitions: u16) -> anyhow::Result<Vec<u16>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u16>()?, b.trim().parse::<u16>()?),
            None => {
                let p = part.parse::<u16>()?;
                (p, p)
            }
        };
        if lo > hi || hi >= partitions {
            bail!("partition range {part:?} is outside 0-{}", partitions - 1);
        }
        out.extend(lo..=hi);
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        bail!("no partitions in {spec:?}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_lists() {
        assert_eq!(
            parse_partitions("0-3,8, 2", 16).unwrap(),
            vec![0, 1, 2, 3, 8]
        );
        assert!(parse_partitions("0-16", 16).is_err());
        assert!(parse_partitions("5-2", 16).is_err());
        assert!(parse_partitions("", 16).is_err());
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's test jail fixes the closure's type
    fn environment_overrides_defaults_and_bad_values_are_reported() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("TALLY_INGEST__FLUSH_AGE_MS", "250");
            jail.set_env("TALLY_DATA_DIR", "/tmp/x");
            // The scripts' own variables are not configuration.
            jail.set_env("TALLY_VENV", "/tmp/venv");
            jail.set_env("TALLY_S3_SERVER", "/tmp/s3s-fs");
            let c = Config::load(None).unwrap();
            assert_eq!(c.log, None, "unset: each command picks its own");
            assert_eq!(c.ingest.flush_age_ms, 250);
            assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
            jail.set_env("TALLY_LOG", "warn,tally=debug");
            let c = Config::load(None).unwrap();
            assert_eq!(c.log.as_deref(), Some("warn,tally=debug"));
            jail.set_env("TALLY_LOG", "tally=nonsense[");
            let err = format!("{:#}", Config::load(None).unwrap_err());
            assert!(err.contains("log:"), "{err}");
            jail.set_env("TALLY_LOG", "warn");
            jail.set_env("TALLY_INGEST__PARTITIONS", "0");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("partitions"), "{err}");
            jail.create_file("tally.toml", "[ingest]\nflush_rowz = 5\n")?;
            let err = format!(
                "{:#}",
                Config::load(Some(Path::new("tally.toml"))).unwrap_err()
            );
            assert!(err.contains("flush_rowz"), "{err}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's test jail fixes the closure's type
    fn the_lake_is_local_unless_a_bucket_is_named_and_its_settings_are_checked() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("TALLY_DATA_DIR", "/tmp/x");
            let c = Config::load(None).unwrap();
            assert_eq!(
                c.lake(),
                tally_store::Location::Local(PathBuf::from("/tmp/x/lake"))
            );
            jail.create_file(
                "tally.toml",
                "[lake_s3]\nbucket = \"usage\"\nprefix = \"prod/lake\"\n\
                 endpoint = \"http://127.0.0.1:9000\"\naccess_key_id = \"k\"\n",
            )?;
            jail.set_env("TALLY_LAKE_S3__SECRET_ACCESS_KEY", "s3cr3t");
            let c = Config::load(Some(Path::new("tally.toml"))).unwrap();
            let tally_store::Location::S3(s3) = c.lake() else {
                panic!("a bucket is named: {:?}", c.lake());
            };
            assert_eq!(
                (s3.bucket.as_str(), s3.prefix.as_str(), s3.region.as_str()),
                ("usage", "prod/lake", "us-east-1")
            );
            assert_eq!(s3.secret_access_key, "s3cr3t");
            assert!(
                !format!("{c:?}").contains("s3cr3t"),
                "the secret is not printed"
            );
            jail.set_env("TALLY_LAKE_S3__ENDPOINT", "127.0.0.1:9000");
            jail.set_env("TALLY_LAKE_S3__SECRET_ACCESS_KEY", " ");
            let err = Config::load(Some(Path::new("tally.toml")))
                .unwrap_err()
                .to_string();
            assert!(err.contains("lake_s3.endpoint"), "{err}");
            assert!(err.contains("lake_s3.secret_access_key"), "{err}");
            jail.set_env("TALLY_LAKE_S3__ENDPOINT", "http://127.0.0.1:9000");
            jail.set_env("TALLY_LAKE_S3__SECRET_ACCESS_KEY", "s3cr3t");
            jail.set_env("TALLY_LAKE_S3__BUKKET", "typo");
            let err = format!(
                "{:#}",
                Config::load(Some(Path::new("tally.toml"))).unwrap_err()
            );
            assert!(err.contains("bukket"), "{err}");
            Ok(())
        });
    }
}
