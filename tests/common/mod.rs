//! The end-to-end harness: a real nats-server on a free port with its own temporary
//! directory (stopped and removed on drop), and Tally's pipeline wired as the binary
//! wires it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::ProgressBar;
use tally::config::Config;
use tally::demo::wait_drained;
use tally::pipeline::{Nats, Pipeline};
use tally_natsd::NatsServer;

pub struct Harness {
    pub server: NatsServer,
    pub dir: tempfile::TempDir,
    pub config: Config,
    pub nats: Nats,
}

impl Harness {
    pub async fn start() -> Harness {
        let server = tokio::task::spawn_blocking(NatsServer::start_temp)
            .await
            .unwrap()
            .expect("nats-server must be installed: run scripts/install-nats.sh");
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            nats_url: Some(server.url()),
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        let nats = Nats::connect(&config).await.unwrap();
        Harness {
            server,
            dir,
            config,
            nats,
        }
    }

    /// Puts customers `cust-00000` … of the workload generator on a plan with every
    /// feature metered and unlimited, so that every valid event is `accepted`: for tests of
    /// delivery, where the decisions are not the subject.
    pub async fn entitle_everyone(&self, customers: u32) {
        use tally_core::entitlement::{Catalog, Customer, Customers, Entitlement, Metered, Plan};
        let plan = Plan {
            id: "unlimited".to_owned(),
            name: "Unlimited".to_owned(),
            features: tally::workload::features(u32::MAX)
                .iter()
                .map(|f| ((*f).to_owned(), Entitlement::Metered(Metered::new(None))))
                .collect(),
            seats: None,
        };
        let defs = tally_ingest::definitions::Definitions::open(&self.nats.jetstream)
            .await
            .unwrap();
        let catalog = Catalog {
            plans: vec![plan],
            ..Catalog::default()
        };
        defs.apply_catalog(&catalog, "test").await.unwrap();
        let customers = Customers {
            customers: (0..customers)
                .map(|i| Customer::new(tally::workload::customer_id(i), "unlimited"))
                .collect(),
        };
        defs.apply_customers(&customers, "test").await.unwrap();
    }

    pub fn lake_events(&self) -> PathBuf {
        self.config.lake_dir().join("events")
    }

    /// Waits (with a deadline, never a fixed sleep) until every partition's consumer has
    /// nothing pending or unacknowledged and `rows` rows are durable.
    pub async fn drain(&self, pipeline: &Pipeline, rows: u64) {
        wait_drained(
            &self.nats,
            self.config.ingest.partitions,
            &pipeline.stats,
            rows,
            &ProgressBar::hidden(),
            pipeline,
            Duration::from_secs(300),
        )
        .await
        .unwrap();
    }

    /// Every dead letter: (reason, field, batch index, body).
    pub async fn dead_letters(&self) -> Vec<DeadLetter> {
        let mut stream = self
            .nats
            .jetstream
            .get_stream(tally_core::subject::DEAD_LETTER_STREAM)
            .await
            .unwrap();
        let info = stream.info().await.unwrap().clone();
        let mut out = Vec::new();
        for seq in info.state.first_sequence..=info.state.last_sequence {
            if info.state.messages == 0 {
                break;
            }
            let msg = stream.get_raw_message(seq).await.unwrap();
            let h = |name: &str| msg.headers.get(name).map(|v| v.as_str().to_owned());
            out.push(DeadLetter {
                reason: h("Tally-Reason").unwrap_or_default(),
                field: h("Tally-Field"),
                index: h("Tally-Batch-Index").map(|i| i.parse().unwrap()),
                error: h("Tally-Error").unwrap_or_default(),
                body: msg.payload.to_vec(),
            });
        }
        out
    }
}

#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub reason: String,
    pub field: Option<String>,
    pub index: Option<usize>,
    pub error: String,
    pub body: Vec<u8>,
}

/// Every Parquet file under a directory, recursively.
pub fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let path = e.unwrap().path();
        if path.is_dir() {
            out.extend(parquet_files(&path));
        } else if path.extension().is_some_and(|x| x == "parquet") {
            out.push(path);
        }
    }
    out.sort();
    out
}
