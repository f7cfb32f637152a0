//! `tally license`: checks a license token offline, against a published key set, with no
//! NATS and no network.

use std::io::{Read as _, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::builder::{PossibleValuesParser, TypedValueParser as _};
use clap::{Args, Subcommand, ValueEnum as _};
use tally_license::{KeySet, License};

use tally_node::output::Format;

/// Exit status of a token that was read but refused (unknown key, altered, expired, …).
const REFUSED: u8 = 2;

#[derive(Subcommand)]
pub enum LicenseCmd {
    /// Verify a license token offline and print what it grants.
    ///
    /// The key file is the key set that GET /api/v1/license-keys returns, or one
    /// `k4.public.…` key. Exits with status 2 and the reason (malformed, unknown key, bad
    /// signature, expired, not yet valid) when the token is refused.
    ///
    /// Example: tally license verify "$(cat license.token)" --key license-keys.json --format json
    Verify(VerifyArgs),
}

#[derive(Args)]
pub struct VerifyArgs {
    /// The license token (`v4.public.…`), or `-` to read it from standard input.
    pub token: String,
    /// The key file: the key set JSON of GET /api/v1/license-keys, or a file holding one
    /// `k4.public.…` key.
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// `table`: one line per field, for people; `json`: one JSON object.
    #[arg(
        long,
        default_value = "table",
        value_parser = PossibleValuesParser::new(["table", "json"])
            .try_map(|s| Format::from_str(&s, false)),
    )]
    pub format: Format,
}

/// Runs a `tally license` command.
pub fn run(cmd: LicenseCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        LicenseCmd::Verify(args) => verify(args),
    }
}

fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let token = if args.token == "-" {
        let mut token = String::new();
        std::io::stdin()
            .read_to_string(&mut token)
            .context("reading the token from standard input")?;
        token
    } else {
        args.token
    };
    let keys = KeySet::from_file(&args.key)?;
    let license = match tally_license::verify(&token, &keys, chrono::Utc::now()) {
        Ok(license) => license,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(REFUSED));
        }
    };
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Json => writeln!(out, "{}", serde_json::to_string(&license)?)?,
        _ => write_table(&mut out, &license)?,
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// One line per field; each feature's terms as compact JSON, as the API shaped them.
fn write_table(out: &mut dyn Write, license: &License) -> anyhow::Result<()> {
    let time =
        |t: &chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    let seats = license
        .seats
        .map_or_else(|| "unlimited".to_owned(), |s| s.to_string());
    let regions = if license.regions.is_empty() {
        "any".to_owned()
    } else {
        license.regions.join(", ")
    };
    writeln!(out, "customer    {}", license.customer)?;
    writeln!(out, "plan        {}", license.plan)?;
    writeln!(out, "seats       {seats}")?;
    writeln!(out, "regions     {regions}")?;
    writeln!(out, "issued at   {}", time(&license.issued_at))?;
    writeln!(out, "valid from  {}", time(&license.not_before))?;
    writeln!(out, "expires at  {}", time(&license.expires_at))?;
    writeln!(out, "key id      {}", license.key_id)?;
    if license.features.is_empty() {
        writeln!(out, "features    none")?;
        return Ok(());
    }
    writeln!(out, "features")?;
    let width = license
        .features
        .keys()
        .map(|f| f.chars().count())
        .max()
        .unwrap_or(0);
    for (feature, terms) in &license.features {
        writeln!(out, "  {feature:<width$}  {terms}")?;
    }
    Ok(())
}
