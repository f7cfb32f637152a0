//! `tally plans …` and `tally customers …`: load definitions from TOML or JSON files into
//! the key-value buckets (with an audit entry per change), and list what they hold.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use tally_node::pipeline::Service;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;
use tally_core::entitlement::{Catalog, Customers, Entitlement, Problem};
use tally_ingest::definitions::{Applied, Change, Definitions};

use tally_node::config::Config;
use tally_node::output::Format;
use tally_node::pipeline::Nats;

#[derive(Subcommand)]
pub enum DefinitionsCmd {
    /// Create or update the definitions in FILE (TOML, or JSON by its `.json` extension).
    /// Every problem in the file is listed and nothing is written if there is one.
    ///
    /// Example: tally plans apply examples/catalog.toml (or: tally customers apply examples/customers.toml)
    Apply(ApplyArgs),
    /// List the stored definitions.
    ///
    /// Example: tally plans list --format json (or: tally customers list)
    List(ListArgs),
}

#[derive(Args)]
pub struct ApplyArgs {
    /// The definitions: a catalogue (plans, add-ons, SKUs) or customers, TOML or JSON.
    file: PathBuf,
    /// Who makes the change, for the audit stream.
    #[arg(long, env = "USER", default_value = "tally-cli")]
    actor: String,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(Args)]
pub struct ListArgs {
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// Which definitions a command is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Plans, add-ons and SKU mappings (a catalogue file).
    Catalog,
    Customers,
}

/// Reads a definitions file: JSON when its name ends in `.json`, TOML otherwise.
pub fn read_file<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
    } else {
        toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
    }
}

pub async fn run(
    config: Config,
    kind: Kind,
    cmd: DefinitionsCmd,
) -> anyhow::Result<std::process::ExitCode> {
    match cmd {
        DefinitionsCmd::Apply(args) => {
            let (catalog, customers, problems) = match kind {
                Kind::Catalog => {
                    let c: Catalog = read_file(&args.file)?;
                    let p = c.problems();
                    (Some(c), None, p)
                }
                Kind::Customers => {
                    let c: Customers = read_file(&args.file)?;
                    let p = c.problems();
                    (None, Some(c), p)
                }
            };
            if !problems.is_empty() {
                report_problems(&args.file, &problems);
                return Ok(std::process::ExitCode::from(2));
            }
            let nats = Nats::connect(&config, Service::Admin).await?;
            let definitions = Definitions::open(&nats.jetstream, nats.replicas).await?;
            let mut applied = Vec::new();
            if let Some(c) = &catalog {
                applied.extend(definitions.apply_catalog(c, &args.actor).await?);
            }
            if let Some(c) = &customers {
                applied.extend(definitions.apply_customers(c, &args.actor).await?);
            }
            print_applied(&applied, args.format)?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        DefinitionsCmd::List(args) => {
            let nats = Nats::connect(&config, Service::Admin).await?;
            let snapshot = Definitions::open(&nats.jetstream, nats.replicas)
                .await?
                .load()
                .await?;
            let out = &mut std::io::stdout().lock();
            match (kind, args.format) {
                (Kind::Catalog, Format::Table) => {
                    for p in &snapshot.plans {
                        writeln!(out, "plan {} ({})", p.id, p.name)?;
                        for (feature, e) in &p.features {
                            writeln!(out, "  {feature:<24} {}", describe(e))?;
                        }
                    }
                    for a in &snapshot.addons {
                        writeln!(out, "addon {} ({})", a.id, a.name)?;
                    }
                    for s in &snapshot.skus {
                        writeln!(out, "sku {} -> {:?}", s.sku, s.target)?;
                    }
                    for m in snapshot.meters.iter().filter(|m| !m.is_deleted()) {
                        writeln!(
                            out,
                            "meter {} ({} of {} on events of type {:?})",
                            m.slug,
                            m.aggregation,
                            m.value_property.as_deref().unwrap_or("events"),
                            m.event_type
                        )?;
                    }
                    for f in &snapshot.features {
                        let filters: Vec<String> = f
                            .meter_group_by_filters
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect();
                        writeln!(
                            out,
                            "feature {} (meter {}{})",
                            f.key,
                            f.meter_slug,
                            if filters.is_empty() {
                                String::new()
                            } else {
                                format!(" where {}", filters.join(", "))
                            }
                        )?;
                    }
                }
                (Kind::Catalog, _) => {
                    let catalog = Catalog {
                        plans: snapshot.plans,
                        addons: snapshot.addons,
                        skus: snapshot.skus,
                        meters: snapshot.meters,
                        features: snapshot.features,
                    };
                    writeln!(out, "{}", serde_json::to_string(&catalog)?)?;
                }
                (Kind::Customers, Format::Table) => {
                    writeln!(
                        out,
                        "{:<24} {:<16} {:<10} grants",
                        "customer", "plan", "status"
                    )?;
                    for c in &snapshot.customers {
                        writeln!(
                            out,
                            "{:<24} {:<16} {:<10} {}",
                            c.id,
                            c.plan,
                            format!("{:?}", c.status).to_lowercase(),
                            c.grants.len()
                        )?;
                    }
                }
                (Kind::Customers, _) => {
                    let customers = Customers {
                        customers: snapshot.customers,
                    };
                    writeln!(out, "{}", serde_json::to_string(&customers)?)?;
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

fn report_problems(file: &Path, problems: &[Problem]) {
    eprintln!(
        "error: {} has {} problem(s); nothing was applied:",
        file.display(),
        problems.len()
    );
    for p in problems {
        eprintln!("  {p}");
    }
}

fn print_applied(applied: &[Applied], format: Format) -> anyhow::Result<()> {
    let out = &mut std::io::stdout().lock();
    if format != Format::Table {
        writeln!(out, "{}", serde_json::to_string(applied)?)?;
        return Ok(());
    }
    for a in applied {
        let what = match a.change {
            Change::Created => "created",
            Change::Updated => "updated",
            Change::Unchanged => "unchanged",
        };
        match a.revision {
            Some(r) => writeln!(out, "{:<9} {:<24} {what} (revision {r})", a.kind, a.id)?,
            None => writeln!(out, "{:<9} {:<24} {what}", a.kind, a.id)?,
        }
    }
    Ok(())
}

fn describe(e: &Entitlement) -> String {
    match e {
        Entitlement::Boolean { enabled } => {
            format!("boolean {}", if *enabled { "on" } else { "off" })
        }
        Entitlement::Static { value } => format!("static {value}"),
        Entitlement::Metered(m) => format!(
            "metered {} per {:?}, {:?}",
            m.limit.map_or("unlimited".to_owned(), |l| l.to_string()),
            m.period,
            m.enforcement
        )
        .to_lowercase(),
    }
}
