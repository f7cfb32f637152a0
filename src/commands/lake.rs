//! `tally lake`: work on the lake itself. `tally lake migrate` turns a lake of the
//! directory layout (before its tables were Delta tables) into tables, in place; the rule
//! it applies once is `tally_store::migrate`'s.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use tally_store::Lake;

use tally_node::config::Config;
use tally_node::output::Format;

#[derive(Debug, Subcommand)]
pub enum LakeCmd {
    /// Turn a lake of the directory layout into Delta tables, in place: the files that
    /// were part of the lake are committed; superseded files, orphan rollups and unfinished
    /// writes are left out (and removed by the next compaction's vacuum).
    ///
    /// Example: tally lake migrate --data-dir data --format json
    Migrate(MigrateArgs),
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

pub async fn run(config: &Config, cmd: LakeCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        LakeCmd::Migrate(args) => {
            let dir = config.lake_dir();
            let lake = Lake::new(&dir);
            let done = tokio::task::spawn_blocking(move || lake.migrate())
                .await
                .context("the migration panicked")?
                .with_context(|| format!("migrating {}", dir.display()))?;
            match args.format {
                Format::Json => println!("{}", serde_json::to_string(&done)?),
                _ => println!(
                    "{} events files ({} rows), {} rollup files and {} monthly rollups committed \
                     for {} partitions; {} files left out",
                    done.events_files,
                    done.events_rows,
                    done.rollup_files,
                    done.monthly_files,
                    done.partitions.len(),
                    done.left_out
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
