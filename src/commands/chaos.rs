//! `tally chaos`: the workbench's fault suite on this configuration, with its exit code.

use std::process::ExitCode;

use tally_node::config::Config;
use tally_node::output::Format;

/// Runs the fault suite; exit code 2 unless every figure is exact.
pub async fn run(
    mut config: Config,
    args: tally_workbench::chaos::ChaosArgs,
) -> anyhow::Result<ExitCode> {
    if config.data_dir == Config::default().data_dir {
        config.data_dir = config.data_dir.join("chaos");
    }
    let format = args.format;
    let report = tally_workbench::chaos::run(config, args).await?;
    match format {
        Format::Table => tally_workbench::chaos::print_table(&report),
        _ => println!("{}", serde_json::to_string(&report)?),
    }
    Ok(if report.exact {
        ExitCode::SUCCESS
    } else {
        eprintln!("error: the lake does not match what was published; see the figures");
        ExitCode::from(2)
    })
}
