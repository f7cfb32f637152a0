//! `tally keys`: create, list and revoke the API's keys (stored in NATS, hashed).

use clap::{Args, Subcommand};
use tally_api::{ApiKeys, Role};
use tally_node::config::Config;
use tally_node::output::Format;
use tally_node::pipeline::Nats;
use tally_node::pipeline::Service;

/// Manage the API keys (stored in NATS, hashed).
#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Make a key; its secret is printed once, with what an application needs to connect.
    ///
    /// Example: tally keys create --role sdk --customer acme --name "acme's app"
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
    /// admin, provisioning, billing, analyst, ingest, sdk, notifications or portal.
    #[arg(long)]
    pub role: Role,
    /// A customer the key is limited to (portal: exactly one; ingest, sdk,
    /// notifications: any number, none meaning all).
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
pub async fn run(config: &Config, cmd: KeysCmd) -> anyhow::Result<std::process::ExitCode> {
    let nats = Nats::connect(config, Service::Admin).await?;
    let keys = ApiKeys::open(&nats.jetstream, nats.replicas).await?;
    // What an application computes check subjects with: the stream's count.
    let partitions = tally_ingest::topology::ensure_streams(&nats.jetstream, &config.ingest)
        .await?
        .current();
    match cmd {
        KeysCmd::Create(args) => {
            let created = keys.create(args.role, args.customers, args.name).await?;
            let connect = tally_api::callout::key_access(created.record.role).map(|_| {
                serde_json::json!({
                    "nats_url": nats.url,
                    "partitions": partitions,
                    "inbox_prefix": tally_core::access::inbox_prefix(&created.record.id),
                })
            });
            match args.format {
                Format::Table => {
                    println!("{}", created.token);
                    eprintln!(
                        "key {} ({}) made; the line above is its secret, shown this once",
                        created.record.id, created.record.role
                    );
                    if connect.is_some() {
                        eprintln!(
                            "an application connects to NATS at {} with the key as its token \
                             (tally_sdk::NatsTarget::with_key(url, key), Options {{ partitions: {}, .. }}; \
                             other clients: token = the key, inbox prefix {}), or to the HTTP API \
                             with `Authorization: Bearer <key>`",
                            nats.url,
                            partitions,
                            tally_core::access::inbox_prefix(&created.record.id)
                        );
                    }
                }
                _ => {
                    let mut json = serde_json::to_value(&created)?;
                    if let Some(connect) = connect {
                        json["connect"] = connect;
                    }
                    println!("{json}");
                }
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
