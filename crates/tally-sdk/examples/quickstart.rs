//! Records usage for a customer, flushes, checks the feature and prints the answer; with
//! `--license TOKEN --keys FILE` it also verifies a license offline.
//!
//! Against `tally serve` (after `tally plans apply examples/catalog.toml` and
//! `tally customers apply examples/customers.toml`):
//!
//! ```sh
//! KEY=$(tally keys create --role sdk --customer cust-00001)
//! cargo run -p tally-sdk --example quickstart -- --key $KEY      # the nats-server `tally serve` runs on ./data
//! cargo run -p tally-sdk --example quickstart -- --nats nats://127.0.0.1:4222 --key $KEY
//! cargo run -p tally-sdk --example quickstart -- --http http://127.0.0.1:8080 --key $KEY
//! ```
//!
//! The key is an API key of the `sdk` role: NATS lets it publish and check for its
//! customers only. With neither `--nats` nor `--http`, it uses the embedded nats-server of
//! the `tally serve` running on `--data-dir` (default `data`): that server listens on a
//! free port, which `tally serve` logs ("embedded nats-server started").
//!
//! Options: `--customer` (default `cust-00001`), `--feature` (`api-calls`), `--quantity`
//! (`3`), `--partitions` (NATS; `16`, as `tally serve`), `--license TOKEN --keys FILE`
//! (the key set from `GET /api/v1/license-keys`, or one `k4.public` key).

use std::error::Error;
use std::path::PathBuf;

use tally_sdk::{Client, KeySet, NatsTarget, Options, verify_license};

#[derive(Default)]
struct Args {
    nats: Option<String>,
    http: Option<String>,
    key: Option<String>,
    customer: String,
    feature: String,
    quantity: f64,
    partitions: u16,
    license: Option<String>,
    keys: Option<PathBuf>,
    data_dir: PathBuf,
}

const USAGE: &str = "usage: quickstart --key KEY [--nats URL | --http URL | --data-dir DIR] [--customer C] \
                     [--feature F] [--quantity Q] [--partitions P] [--license TOKEN --keys FILE]";

fn args() -> Result<Args, Box<dyn Error>> {
    let mut args = Args {
        customer: "cust-00001".into(),
        feature: "api-calls".into(),
        quantity: 3.0,
        partitions: 16,
        data_dir: PathBuf::from("data"),
        ..Args::default()
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--nats" => args.nats = Some(value()?),
            "--http" => args.http = Some(value()?),
            "--key" => args.key = Some(value()?),
            "--customer" => args.customer = value()?,
            "--feature" => args.feature = value()?,
            "--quantity" => args.quantity = value()?.parse()?,
            "--partitions" => args.partitions = value()?.parse()?,
            "--license" => args.license = Some(value()?),
            "--keys" => args.keys = Some(PathBuf::from(value()?)),
            "--data-dir" => args.data_dir = PathBuf::from(value()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = args()?;
    let options = Options {
        source: "quickstart".into(),
        partitions: args.partitions,
        ..Options::default()
    };
    let key = args
        .key
        .clone()
        .ok_or(format!("an API key is needed (--key)\n{USAGE}"))?;
    let tally = match (&args.nats, &args.http) {
        (Some(url), None) => Client::nats(NatsTarget::with_key(url, key), options).await?,
        (None, Some(url)) => Client::http(url, &key, options).await?,
        (None, None) => {
            let url = tally_natsd::running(&args.data_dir.join("nats")).ok_or_else(|| {
                format!(
                    "no `tally serve` runs on {}: start it, or pass --nats or --http\n{USAGE}",
                    args.data_dir.display()
                )
            })?;
            println!("using the nats-server of `tally serve`: {url}");
            Client::nats(NatsTarget::with_key(url, key), options).await?
        }
        _ => return Err(USAGE.into()),
    };

    let id = tally
        .record(&args.customer, &args.feature, args.quantity)
        .await?;
    tally.flush().await?;
    println!(
        "recorded {} {} for {} (event {id}), acknowledged",
        args.quantity, args.feature, args.customer
    );

    // The worker counts the event once it has read it: a check right away may not see it yet.
    let answer = tally.check(&args.customer, &args.feature).await?;
    println!(
        "check {} / {}: has_access={} decision={} usage={} limit={} remaining={} resets_at={}",
        args.customer,
        args.feature,
        answer.has_access,
        answer.decision,
        answer.usage,
        show(answer.limit),
        show(answer.remaining),
        show(answer.resets_at),
    );
    if let Some(value) = &answer.value {
        println!("value: {value}");
    }

    if let Some(token) = &args.license {
        let path = args.keys.as_ref().ok_or("--license needs --keys FILE")?;
        let keys = KeySet::from_file(path)?;
        match verify_license(token, &keys) {
            Ok(license) => println!(
                "license valid: customer {} plan {} until {} (key {})",
                license.customer, license.plan, license.expires_at, license.key_id
            ),
            Err(e) => println!("license refused: {e}"),
        }
    }
    tally.shutdown().await?;
    Ok(())
}

fn show<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}
