//! The HTTP API as the binary runs it (`tally api`, and inside `tally serve`), and
//! `tally keys`, which manages the API keys.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use tally_api::{ApiKeys, AppState, Role};
use tally_ingest::checks::LocalChecks;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::output::Format;
use crate::pipeline::Nats;

/// A running API server.
pub struct Api {
    /// Where it listens (the configured address, with the port chosen when it was 0).
    pub addr: SocketAddr,
    /// The admin key made at the first start, and the file it was written to.
    pub bootstrap: Option<(String, PathBuf)>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Api {
    /// Opens the API's buckets, makes the first admin key when there is no key at all,
    /// binds `api.listen` and serves until `cancel`. `local_checks`: the worker running in
    /// this process, if any.
    pub async fn start(
        config: &Config,
        nats: &Nats,
        local_checks: Option<LocalChecks>,
        cancel: CancellationToken,
    ) -> anyhow::Result<Api> {
        // Events are accepted before any worker has run: the streams must exist.
        tally_ingest::topology::ensure_streams(&nats.jetstream, &config.ingest)
            .await
            .context("creating the events streams")?;
        let reports = tally_reports::LakeReports::new(config.lake_dir());
        let state = AppState::open(
            nats.jetstream.clone(),
            config.ingest.partitions,
            config.ingest.limits,
            config.api.clone(),
            reports,
            local_checks,
            cancel.clone(),
        )
        .await
        .context("opening the API's buckets")?;
        if let Some(render) = crate::metrics::render(nats.client.clone()) {
            state.serve_metrics(render);
        }
        let bootstrap = bootstrap_admin_key(config, &state.keys).await?;
        let listener = tokio::net::TcpListener::bind(&config.api.listen)
            .await
            .with_context(|| format!("listening on {} (api.listen)", config.api.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "api listening");
        let task = tokio::spawn(tally_api::serve(listener, state, cancel));
        Ok(Api {
            addr,
            bootstrap,
            task,
        })
    }

    /// Waits for the server to finish (after its cancel token fired).
    pub async fn stopped(self) -> anyhow::Result<()> {
        self.task
            .await
            .context("api server panicked")?
            .context("api server failed")
    }
}

/// With no API key at all (a fresh installation), makes an admin key and writes it to
/// `<data_dir>/api-admin.key`, readable by its owner only.
async fn bootstrap_admin_key(
    config: &Config,
    keys: &ApiKeys,
) -> anyhow::Result<Option<(String, PathBuf)>> {
    if !keys.list().await?.is_empty() {
        return Ok(None);
    }
    let created = keys
        .create(
            Role::Admin,
            Vec::new(),
            "made at the first start".to_owned(),
        )
        .await?;
    let path = config.data_dir.join("api-admin.key");
    std::fs::create_dir_all(&config.data_dir)?;
    write_private(&path, &format!("{}\n", created.token))
        .with_context(|| format!("writing the first admin key to {}", path.display()))?;
    tracing::warn!(path = %path.display(), id = %created.record.id, "no API key existed: made an admin key");
    Ok(Some((created.token, path)))
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}

/// Manage the API keys (stored in NATS, hashed).
#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Make a key; its secret is printed once.
    ///
    /// Example: tally keys create --role portal --customer acme --name "acme's portal"
    Create(CreateArgs),
    /// List the keys (never their secrets).
    ///
    /// Example: tally keys list --format json
    List(ListArgs),
    /// Revoke a key by id; requests with it are refused from then on.
    ///
    /// Example: tally keys revoke 3f9c2a7b1e4d5c60
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// admin, provisioning, billing, analyst, ingest or portal.
    #[arg(long)]
    pub role: Role,
    /// A customer the key is limited to (portal: exactly one; ingest: any number).
    #[arg(long = "customer")]
    pub customers: Vec<String>,
    /// What the key is for.
    #[arg(long, default_value = "")]
    pub name: String,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The key's id (the part after `tally_`, before the second `_`).
    pub id: String,
}

/// Runs a `tally keys` command against the configured NATS.
pub async fn run_keys(config: &Config, cmd: KeysCmd) -> anyhow::Result<std::process::ExitCode> {
    let nats = Nats::connect(config).await?;
    let keys = ApiKeys::open(&nats.jetstream).await?;
    match cmd {
        KeysCmd::Create(args) => {
            let created = keys.create(args.role, args.customers, args.name).await?;
            match args.format {
                Format::Table => {
                    println!("{}", created.token);
                    eprintln!(
                        "key {} ({}) made; the line above is its secret, shown this once",
                        created.record.id, created.record.role
                    );
                }
                _ => println!("{}", serde_json::to_string(&created)?),
            }
        }
        KeysCmd::List(args) => {
            let list = keys.list().await?;
            match args.format {
                Format::Table => {
                    println!(
                        "{:<18} {:<13} {:<26} {:<8} customers / name",
                        "id", "role", "created", "state"
                    );
                    for k in &list {
                        println!(
                            "{:<18} {:<13} {:<26} {:<8} {}{}",
                            k.id,
                            k.role.as_str(),
                            k.created_at.format("%Y-%m-%d %H:%M:%S UTC"),
                            if k.revoked_at.is_some() {
                                "revoked"
                            } else {
                                "live"
                            },
                            k.customers.join(","),
                            if k.name.is_empty() {
                                String::new()
                            } else {
                                format!(" {:?}", k.name)
                            }
                        );
                    }
                }
                Format::Csv => {
                    println!("id,role,customers,name,created_at,revoked_at");
                    for k in &list {
                        println!(
                            "{},{},{},{},{},{}",
                            k.id,
                            k.role,
                            csv_field(&k.customers.join(" ")),
                            csv_field(&k.name),
                            k.created_at.to_rfc3339(),
                            k.revoked_at.map(|t| t.to_rfc3339()).unwrap_or_default()
                        );
                    }
                }
                Format::Json => println!("{}", serde_json::to_string(&list)?),
            }
        }
        KeysCmd::Revoke(args) => {
            let record = keys.revoke(&args.id).await?;
            eprintln!(
                "key {} ({}) revoked at {}",
                record.id,
                record.role,
                record
                    .revoked_at
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_default()
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// A CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}
