//! docker-compose.yml and what it mounts, without Docker: every mounted file exists, every
//! build context has its Dockerfile, Prometheus scrapes Tally's services on the port their
//! API listens on, Grafana's data sources are the Prometheus service and Tally's SQL
//! endpoint (the Infinity plugin, with the analyst key the one-shot grafana-key service
//! writes), every dashboard it provisions is valid JSON whose Prometheus queries name only
//! metrics Tally exports, and every SQL panel's query runs on a real API over a lake with
//! data, with the key that service's script makes.

use crate::common;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use serde_norway::Value;
use tally_core::metrics as names;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut value: Value = serde_norway::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
    // Services share settings through anchors and merge keys (`<<: *tally`).
    value
        .apply_merge()
        .unwrap_or_else(|e| panic!("{}: a bad merge key: {e}", path.display()));
    value
}

fn compose() -> Value {
    yaml(&repo().join("docker-compose.yml"))
}

fn services(compose: &Value) -> Vec<(String, Value)> {
    compose["services"]
        .as_mapping()
        .expect("services")
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_owned(), v.clone()))
        .collect()
}

/// A service's bind mounts from the repository: (source in the repo, target).
fn bind_mounts(service: &Value) -> Vec<(PathBuf, String)> {
    let Some(volumes) = service["volumes"].as_sequence() else {
        return Vec::new();
    };
    volumes
        .iter()
        .filter_map(|v| {
            let spec = v.as_str().expect("short volume syntax");
            let mut parts = spec.split(':');
            let source = parts.next().unwrap();
            let target = parts.next().expect("a target").to_owned();
            source
                .starts_with("./")
                .then(|| (repo().join(source.trim_start_matches("./")), target))
        })
        .collect()
}

/// The repository file or directory mounted at `target` in `service`.
fn mounted_at(service: &Value, target: &str) -> PathBuf {
    let mounts = bind_mounts(service);
    // The deepest mount holding `target` (a file mounted itself, or inside a directory).
    mounts
        .iter()
        .filter(|(_, t)| target == t || target.starts_with(&format!("{t}/")))
        .max_by_key(|(_, t)| t.len())
        .map(
            |(source, t)| match target[t.len()..].trim_start_matches('/') {
                "" => source.clone(),
                rest => source.join(rest),
            },
        )
        .unwrap_or_else(|| panic!("nothing is mounted at {target}"))
}

fn env(service: &Value, key: &str) -> Option<String> {
    match &service["environment"] {
        Value::Mapping(m) => m.get(key).and_then(|v| v.as_str()).map(str::to_owned),
        Value::Sequence(s) => s.iter().filter_map(|v| v.as_str()).find_map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v.to_owned())
        }),
        _ => None,
    }
}

fn service<'a>(all: &'a [(String, Value)], image: &str) -> &'a (String, Value) {
    all.iter()
        .find(|(_, s)| s["image"].as_str().is_some_and(|i| i.contains(image)))
        .unwrap_or_else(|| panic!("no service runs {image}"))
}

#[test]
fn every_mount_and_build_context_exists() {
    let compose = compose();
    let all = services(&compose);
    assert!(
        all.len() >= 9,
        "3 NATS nodes, minio, tally, tally-worker, prometheus, grafana and the one-shots"
    );
    for (name, service) in &all {
        for (source, _) in bind_mounts(service) {
            assert!(
                source.exists(),
                "{name} mounts {}, which is missing",
                source.display()
            );
        }
        let build = &service["build"];
        let (context, dockerfile) = match build {
            Value::Null => continue,
            Value::String(c) => (c.clone(), "Dockerfile".to_owned()),
            Value::Mapping(_) => (
                build["context"].as_str().unwrap_or(".").to_owned(),
                build["dockerfile"]
                    .as_str()
                    .unwrap_or("Dockerfile")
                    .to_owned(),
            ),
            other => panic!("{name}: build is {other:?}"),
        };
        let path = repo().join(context).join(dockerfile);
        assert!(
            path.is_file(),
            "{name} builds with {}, which is missing",
            path.display()
        );
    }
    for (name, service) in &all {
        if let Some(volumes) = service["volumes"].as_sequence() {
            for v in volumes {
                let source = v.as_str().unwrap().split(':').next().unwrap();
                if !source.starts_with('.') && !source.starts_with('/') {
                    assert!(
                        compose["volumes"].get(source).is_some(),
                        "{name} uses the volume {source}, not declared"
                    );
                }
            }
        }
    }
}

#[test]
fn prometheus_scrapes_every_tally_service_on_its_api_port() {
    let compose = compose();
    let all = services(&compose);
    let tally = long_running_tally(&all);
    assert!(tally.len() >= 2, "two Tally replicas");
    let (_, prometheus) = service(&all, "prom/prometheus");
    let config = yaml(&mounted_at(prometheus, "/etc/prometheus/prometheus.yml"));
    let mut targets = BTreeSet::new();
    for job in config["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
    {
        assert_eq!(
            job["metrics_path"].as_str().unwrap_or("/metrics"),
            "/metrics"
        );
        for group in job["static_configs"].as_sequence().unwrap() {
            for t in group["targets"].as_sequence().unwrap() {
                targets.insert(t.as_str().unwrap().to_owned());
            }
        }
    }
    for target in &targets {
        let (host, port) = target.rsplit_once(':').expect("host:port");
        let (_, scraped) = all
            .iter()
            .find(|(n, _)| n == host)
            .unwrap_or_else(|| panic!("scrape target {target} names no compose service"));
        let listen = env(scraped, "TALLY_API__LISTEN")
            .unwrap_or_else(|| panic!("{host} sets no TALLY_API__LISTEN"));
        assert_eq!(
            listen.rsplit_once(':').unwrap().1,
            port,
            "{target} vs {listen}"
        );
        assert!(
            listen.starts_with("0.0.0.0:"),
            "{host} listens on {listen}: unreachable"
        );
        let command: Vec<&str> = scraped["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert!(
            command
                .first()
                .is_some_and(|c| *c == "serve" || *c == "api"),
            "{host} runs {command:?}, which serves no /metrics"
        );
    }
    for (name, _) in &tally {
        assert!(
            targets.iter().any(|t| t.starts_with(&format!("{name}:"))),
            "Prometheus does not scrape {name}"
        );
    }
}

/// Tally's long-running services (a one-shot built from the same image, such as
/// grafana-key, is not restarted and serves nothing; the Ballista cluster's are in
/// [`ballista`]).
fn long_running_tally(all: &[(String, Value)]) -> Vec<&(String, Value)> {
    all.iter()
        .filter(|(_, s)| {
            !s["build"].is_null()
                && s["restart"].as_str() == Some("unless-stopped")
                && s["command"][0].as_str() != Some("ballista")
        })
        .collect()
}

/// The services running `tally ballista <role>`.
fn ballista<'a>(all: &'a [(String, Value)], role: &str) -> Vec<&'a (String, Value)> {
    all.iter()
        .filter(|(_, s)| {
            s["command"][0].as_str() == Some("ballista") && s["command"][1].as_str() == Some(role)
        })
        .collect()
}

/// The value following `flag` in a service's command.
fn flag(service: &Value, flag: &str) -> Option<String> {
    let args = service["command"].as_sequence()?;
    let at = args.iter().position(|a| a.as_str() == Some(flag))?;
    Some(args.get(at + 1)?.as_str()?.to_owned())
}

/// Distributed queries: one scheduler and two or more executors, each reached by its
/// service name, on a data volume of its own and the object store's lake with the keys
/// nats-init gives them (and no NATS credential); every Tally service sends its queries
/// to the scheduler.
#[test]
fn the_ballista_cluster_reads_the_lake_and_serves_every_tally_service() {
    let compose = compose();
    let all = services(&compose);
    let schedulers = ballista(&all, "scheduler");
    assert_eq!(schedulers.len(), 1);
    let (scheduler, scheduling) = schedulers[0];
    assert_eq!(
        flag(scheduling, "--external-host").as_deref(),
        Some(scheduler.as_str())
    );
    let port = flag(scheduling, "--listen")
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let executors = ballista(&all, "executor");
    assert!(executors.len() >= 2, "{} executors", executors.len());
    let (minio, _) = service(&all, "minio/minio");
    let mut data_volumes = BTreeSet::new();
    for (name, service) in schedulers.iter().chain(&executors) {
        if name != scheduler {
            assert_eq!(
                flag(service, "--scheduler"),
                Some(format!("{scheduler}:{port}")),
                "{name}"
            );
            assert_eq!(
                flag(service, "--external-host").as_deref(),
                Some(name.as_str())
            );
        }
        assert_eq!(
            env(service, "TALLY_LAKE_S3__ENDPOINT"),
            Some(format!("http://{minio}:9000")),
            "{name}"
        );
        assert_eq!(
            env(service, "TALLY_LAKE_S3__BUCKET").as_deref(),
            Some("tally")
        );
        assert_eq!(env(service, "TALLY_NATS_URL"), None, "{name}");
        let script = service["entrypoint"][2].as_str().unwrap_or_default();
        assert!(
            script.contains("/run/tally/s3-secret-key"),
            "{name}: {script}"
        );
        let volumes: Vec<&str> = service["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(
            volumes.contains(&"lake-credentials:/run/tally:ro"),
            "{name}: {volumes:?}"
        );
        let data: Vec<&str> = volumes
            .iter()
            .filter_map(|v| v.strip_suffix(":/var/lib/tally"))
            .collect();
        assert_eq!(data.len(), 1, "{name}: {data:?}");
        assert!(data_volumes.insert(data[0]), "{name} shares {}", data[0]);
    }
    // The lake's keys and nothing else go to the Ballista services.
    let (init, one_shot) = all.iter().find(|(n, _)| n == "nats-init").unwrap();
    let script = entrypoint_script(init, one_shot);
    let lake = script
        .lines()
        .find(|l| l.trim_end().ends_with("/out/lake/"))
        .unwrap_or_else(|| panic!("nats-init fills no lake-credentials:\n{script}"));
    assert!(
        lake.contains("/secrets/s3-access-key /secrets/s3-secret-key"),
        "{lake}"
    );
    assert!(!lake.contains(".nk"), "{lake}");
    for (name, service) in long_running_tally(&all) {
        assert_eq!(
            env(service, "TALLY_QUERY_ENGINE"),
            Some(format!("ballista://{scheduler}:{port}")),
            "{name}"
        );
    }
}

/// Past one machine: every Tally service is given every NATS node and keeps three copies
/// of each stream and bucket, one per node; the lake is in the object store's bucket,
/// which the one-shot minio-init makes, with the keys nats-init made; no two Tally
/// services share a data volume, as no two hosts share a disk.
#[test]
fn tally_runs_on_every_nats_node_and_the_lake_in_the_object_store() {
    let compose = compose();
    let all = services(&compose);
    let nodes: Vec<&String> = all
        .iter()
        .filter(|(_, s)| s["image"].as_str().is_some_and(|i| i.starts_with("nats:")))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    let (minio, _) = service(&all, "minio/minio");
    let tally = long_running_tally(&all);
    assert!(tally.len() >= 2);
    let mut data_volumes = BTreeSet::new();
    for (name, service) in &tally {
        let urls = env(service, "TALLY_NATS_URL").unwrap_or_else(|| panic!("{name}: no URL"));
        let urls = tally_core::subject::server_urls(&urls);
        let expected: Vec<String> = nodes.iter().map(|n| format!("tls://{n}:4222")).collect();
        assert_eq!(urls, expected, "{name} is not given every node");
        assert_eq!(
            env(service, "TALLY_INGEST__REPLICAS").as_deref(),
            Some("3"),
            "{name}"
        );
        assert_eq!(
            env(service, "TALLY_LAKE_S3__ENDPOINT"),
            Some(format!("http://{minio}:9000")),
            "{name}"
        );
        assert_eq!(
            env(service, "TALLY_LAKE_S3__BUCKET").as_deref(),
            Some("tally")
        );
        let script = service["entrypoint"][2].as_str().unwrap_or_default();
        for key in [
            "TALLY_LAKE_S3__ACCESS_KEY_ID",
            "TALLY_LAKE_S3__SECRET_ACCESS_KEY",
        ] {
            assert!(script.contains(key), "{name} sets no {key}:\n{script}");
        }
        let data = service["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str()?.strip_suffix(":/var/lib/tally"))
            .collect::<Vec<_>>();
        assert_eq!(data.len(), 1, "{name}: {data:?}");
        assert!(data_volumes.insert(data[0]), "{name} shares {}", data[0]);
    }
    // The bucket the Tally services name is the one minio-init makes; the keys they read
    // are the ones nats-init gives the object store.
    let (init, one_shot) = all.iter().find(|(n, _)| n == "minio-init").unwrap();
    assert!(entrypoint_script(init, one_shot).contains("mc mb --ignore-existing lake/tally"));
    let (init, one_shot) = all.iter().find(|(n, _)| n == "nats-init").unwrap();
    let script = entrypoint_script(init, one_shot);
    for (made, given) in [
        ("/secrets/s3-access-key /out/s3/access_key", "s3-access-key"),
        ("/secrets/s3-secret-key /out/s3/secret_key", "s3-secret-key"),
    ] {
        assert!(script.contains(made), "{script}");
        assert!(script.contains(&format!("/secrets/{given}")), "{script}");
    }
    for node in &nodes {
        assert!(script.contains(&format!("--route {node}:6222")), "{script}");
        assert!(script.contains(&format!("--tls-host {node}")), "{script}");
    }
}

/// Every `tally_…` metric named in a PromQL expression.
fn metrics_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("tally_") {
        let preceded = rest[..at]
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        if !preceded {
            out.push(name.clone());
        }
        rest = &rest[at + name.len()..];
    }
    out
}

fn exported(name: &str) -> bool {
    names::ALL.contains(&name)
        || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| names::HISTOGRAMS.contains(&base))
        })
}

fn panels(dashboard: &Json) -> Vec<&Json> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

#[test]
fn grafana_reads_the_prometheus_service_and_dashboards_name_exported_metrics() {
    let compose = compose();
    let all = services(&compose);
    let (prometheus_name, prometheus) = service(&all, "prom/prometheus");
    let (_, grafana) = service(&all, "grafana/grafana");

    // The data source: the Prometheus service, on the port it listens on.
    let datasources = mounted_at(grafana, "/etc/grafana/provisioning/datasources");
    let mut uids = BTreeSet::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&datasources).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yml" && e != "yaml") {
            continue;
        }
        files += 1;
        for ds in yaml(&path)["datasources"].as_sequence().unwrap() {
            match ds["type"].as_str() {
                Some("prometheus") => {
                    let url = ds["url"].as_str().unwrap();
                    assert_eq!(
                        url,
                        format!("http://{prometheus_name}:9090"),
                        "{}",
                        path.display()
                    );
                }
                // Checked by the_sql_data_source_reads_tally_with_the_key_grafana_key_writes.
                Some(INFINITY) => {}
                other => panic!("{}: a data source of type {other:?}", path.display()),
            }
            uids.insert(ds["uid"].as_str().unwrap().to_owned());
        }
    }
    assert!(files > 0, "no data source is provisioned");
    let ports: Vec<&str> = prometheus["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(ports.iter().any(|p| p.ends_with(":9090")), "{ports:?}");

    // The dashboards: where the provider reads them, mounted from the repository.
    let providers = mounted_at(grafana, "/etc/grafana/provisioning/dashboards");
    let mut dashboards = Vec::new();
    for entry in std::fs::read_dir(&providers).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yml" && e != "yaml") {
            continue;
        }
        for provider in yaml(&path)["providers"].as_sequence().unwrap() {
            let dir = mounted_at(grafana, provider["options"]["path"].as_str().unwrap());
            for entry in std::fs::read_dir(&dir).unwrap() {
                let file = entry.unwrap().path();
                if file.extension().is_some_and(|e| e == "json") {
                    dashboards.push(file);
                }
            }
        }
    }
    dashboards.sort();
    let names: Vec<String> = dashboards
        .iter()
        .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["business.json", "pipeline.json"]);
    for path in &dashboards {
        let dashboard: Json = serde_json::from_str(&std::fs::read_to_string(path).unwrap())
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        let panels = panels(&dashboard);
        assert!(panels.len() >= 5, "{}: too few panels", path.display());
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("?");
            let targets = panel["targets"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            if panel["type"] != "row" {
                assert!(
                    !targets.is_empty(),
                    "{}: {title} queries nothing",
                    path.display()
                );
            }
            for target in targets {
                for ds in [&panel["datasource"], &target["datasource"]] {
                    if let Some(uid) = ds["uid"].as_str() {
                        assert!(uids.contains(uid), "{title}: no data source {uid}");
                    }
                }
                if is_infinity(panel, target) {
                    // SQL over Tally's API: run by every_sql_panel_runs_on_a_lake_with_data.
                    sql_of(title, target);
                    continue;
                }
                let expr = target["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{title}: a Prometheus target without expr"));
                let used = metrics_in(expr);
                assert!(!used.is_empty(), "{title}: {expr} names no Tally metric");
                for name in used {
                    assert!(exported(&name), "{title}: Tally exports no {name}");
                }
            }
        }
    }
}

#[test]
fn expressions_are_read_for_their_metrics() {
    assert_eq!(
        metrics_in(
            "histogram_quantile(0.99, sum by (le) (rate(tally_flush_seconds_bucket[5m]))) / x_tally_y"
        ),
        ["tally_flush_seconds_bucket"]
    );
    assert!(exported("tally_flush_seconds_bucket"));
    assert!(!exported("tally_events_total_bucket"));
    assert!(!exported("tally_nope"));
}

// ---- the SQL-backed panels (Infinity over POST /api/v1/sql) ---------------------------

const INFINITY: &str = "yesoreyeram-infinity-datasource";

/// Whether a target is an Infinity query (its own data source, or its panel's).
fn is_infinity(panel: &Json, target: &Json) -> bool {
    match target["datasource"]["type"].as_str() {
        Some(t) => t == INFINITY,
        None => panel["datasource"]["type"] == INFINITY,
    }
}

/// The SQL of an Infinity target, checking the request is the one Tally's endpoint
/// answers: a JSON POST of `{"query": …}`, parsed by the backend into a table with its
/// columns declared.
fn sql_of(title: &str, target: &Json) -> String {
    for (key, want) in [
        ("type", "json"),
        ("source", "url"),
        ("parser", "backend"),
        ("format", "table"),
    ] {
        assert_eq!(target[key].as_str(), Some(want), "{title}: {key}");
    }
    let options = &target["url_options"];
    assert_eq!(options["method"].as_str(), Some("POST"), "{title}");
    assert_eq!(
        options["body_content_type"].as_str(),
        Some("application/json"),
        "{title}"
    );
    assert_eq!(options["body_type"].as_str(), Some("raw"), "{title}");
    let body: Json = serde_json::from_str(options["data"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{title}: the body is not JSON: {e}"));
    let columns = target["columns"].as_array().unwrap();
    assert!(!columns.is_empty(), "{title}: no columns declared");
    body["query"]
        .as_str()
        .unwrap_or_else(|| panic!("{title}: a body without query"))
        .to_owned()
}

/// Every Infinity panel of business.json: (title, target).
fn sql_panels() -> Vec<(String, Json)> {
    let path = repo().join("dashboards/business.json");
    let dashboard: Json = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = Vec::new();
    for panel in panels(&dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if is_infinity(panel, target) {
                out.push((panel["title"].as_str().unwrap().to_owned(), target.clone()));
            }
        }
    }
    out
}

/// The shell script a one-shot service runs (`entrypoint: [sh, -c, script]`), with the
/// `$$` that compose turns into `$` turned.
fn entrypoint_script(name: &str, service: &Value) -> String {
    let entrypoint: Vec<&str> = service["entrypoint"]
        .as_sequence()
        .unwrap_or_else(|| panic!("{name} has no entrypoint list"))
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(entrypoint.len(), 3, "{name}: {entrypoint:?}");
    assert_eq!(&entrypoint[..2], ["sh", "-c"], "{name}");
    let script = entrypoint[2];
    // Compose interpolates `$x` and `${x}` itself; a shell variable must be written `$$`.
    let unescaped = script.replace("$$", "");
    assert!(
        !unescaped.contains('$'),
        "{name}: a `$` compose would interpolate:\n{script}"
    );
    script.replace("$$", "$")
}

#[test]
fn the_sql_data_source_reads_tally_with_the_key_grafana_key_writes() {
    let compose = compose();
    let all = services(&compose);
    let (_, grafana) = service(&all, "grafana/grafana");

    // The plugin: installed by Grafana before it starts, at a pinned version.
    let preinstall = env(grafana, "GF_PLUGINS_PREINSTALL_SYNC")
        .or_else(|| env(grafana, "GF_PLUGINS_PREINSTALL"))
        .or_else(|| env(grafana, "GF_INSTALL_PLUGINS"))
        .expect("grafana installs no plugin");
    let plugin = preinstall
        .split(',')
        .map(str::trim)
        .find(|p| p.starts_with(INFINITY))
        .unwrap_or_else(|| panic!("grafana does not install {INFINITY}: {preinstall}"));
    let version = plugin[INFINITY.len()..].trim_start_matches(['@', ' ']);
    assert!(
        version.split('.').count() == 3 && version.split('.').all(|n| n.parse::<u32>().is_ok()),
        "{INFINITY} is not pinned: {plugin}"
    );

    // The data source: Infinity, allowed only Tally's API, with the key file as bearer.
    let datasources = mounted_at(grafana, "/etc/grafana/provisioning/datasources");
    let mut infinity = Vec::new();
    for entry in std::fs::read_dir(&datasources).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yml" || e == "yaml") {
            for ds in yaml(&path)["datasources"].as_sequence().unwrap() {
                if ds["type"].as_str() == Some(INFINITY) {
                    infinity.push(ds.clone());
                }
            }
        }
    }
    assert_eq!(infinity.len(), 1, "one Infinity data source");
    let ds = &infinity[0];
    let uid = ds["uid"].as_str().unwrap();
    let hosts: Vec<&str> = ds["jsonData"]["allowedHosts"]
        .as_sequence()
        .expect("allowedHosts")
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    assert_eq!(hosts.len(), 1, "{hosts:?}");
    let host = hosts[0];
    let authority = host
        .strip_prefix("https://")
        .expect("https://host:port: Tally's API serves TLS");
    let (name, port) = authority.split_once(':').expect("host:port");
    let (_, tally) = all
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{host} names no compose service"));
    assert!(
        !tally["build"].is_null(),
        "{name} is not a Tally service built here"
    );
    let listen = env(tally, "TALLY_API__LISTEN").expect("TALLY_API__LISTEN");
    assert_eq!(listen, format!("0.0.0.0:{port}"), "{host} vs {listen}");
    assert!(
        env(tally, "TALLY_API__TLS_CERT").is_some(),
        "{name} serves no TLS for {host}"
    );
    assert_eq!(tally["command"][0].as_str(), Some("serve"), "{name}");

    // The header: `Authorization: Bearer <the key file>`, the file in a volume mounted
    // into grafana read-only.
    let header = (1..10)
        .find(|i| ds["jsonData"][format!("httpHeaderName{i}")].as_str() == Some("Authorization"))
        .expect("no Authorization header");
    let value = ds["secureJsonData"][format!("httpHeaderValue{header}")]
        .as_str()
        .expect("the header's value is not in secureJsonData");
    let key_file = value
        .strip_prefix("Bearer $__file{")
        .and_then(|v| v.strip_suffix('}'))
        .unwrap_or_else(|| panic!("the header is {value:?}, not Bearer $__file{{…}}"));
    let volume_of = |service: &Value, file: &str| -> Option<(String, String, bool)> {
        service["volumes"]
            .as_sequence()?
            .iter()
            .filter_map(|v| {
                let mut parts = v.as_str()?.split(':');
                let (source, target) = (parts.next()?, parts.next()?);
                let ro = parts.next() == Some("ro");
                file.strip_prefix(&format!("{}/", target.trim_end_matches('/')))
                    .map(|rest| (source.to_owned(), rest.to_owned(), ro))
            })
            .next()
    };
    let (volume, file, read_only) = volume_of(grafana, key_file)
        .unwrap_or_else(|| panic!("nothing is mounted in grafana at {key_file}"));
    assert!(read_only, "grafana mounts {volume} writable");
    assert!(
        compose["volumes"].get(volume.as_str()).is_some(),
        "{volume} is not a named volume"
    );

    // The writer: a one-shot that mounts the same volume, writes that file, and that
    // grafana waits for.
    let writers: Vec<&(String, Value)> = all
        .iter()
        .filter(|(_, s)| {
            s["volumes"].as_sequence().into_iter().flatten().any(|v| {
                let v = v.as_str().unwrap();
                v.split(':').next() == Some(volume.as_str()) && !v.ends_with(":ro")
            })
        })
        .collect();
    assert_eq!(writers.len(), 1, "one service writes {volume}");
    let (writer, one_shot) = writers[0];
    assert_eq!(
        grafana["depends_on"][writer.as_str()]["condition"].as_str(),
        Some("service_completed_successfully"),
        "grafana does not wait for {writer}"
    );
    assert!(!one_shot["build"].is_null(), "{writer} runs Tally's image");
    assert_eq!(
        one_shot["restart"].as_str().unwrap_or("no"),
        "no",
        "{writer} is a one-shot"
    );
    assert!(
        env(one_shot, "TALLY_NATS_URL").is_some_and(|u| tally_core::subject::server_urls(&u)
            .iter()
            .all(|url| url.starts_with("tls://nats-"))),
        "{writer} reaches NATS over TLS"
    );
    assert!(
        env(one_shot, "TALLY_NATS_CREDENTIALS").is_some(),
        "{writer} has no NATS credential"
    );
    let script = entrypoint_script(writer, one_shot);
    // The writer sees the file at the path grafana reads it from.
    assert_eq!(
        volume_of(one_shot, key_file).map(|(v, f, _)| (v, f)),
        Some((volume.clone(), file.clone())),
        "{writer} mounts {volume} elsewhere"
    );
    for needle in [
        "tally keys create --role analyst",
        "tally keys list",
        &format!("[ -s {key_file} ]"),
    ] {
        assert!(script.contains(needle), "{writer} does not run {needle:?}");
    }

    // Every SQL panel names this data source and Tally's SQL route on that host.
    let panels = sql_panels();
    assert!(panels.len() >= 5, "{} SQL panels", panels.len());
    for (title, target) in &panels {
        assert_eq!(target["datasource"]["uid"].as_str(), Some(uid), "{title}");
        assert_eq!(
            target["url"].as_str(),
            Some(format!("{host}/api/v1/sql").as_str()),
            "{title}"
        );
    }
}

/// Free: calls 50 a month, hard; export off. Pro: calls 100 a month, soft; export.
const CATALOG: &str = r#"
    [[plans]]
    id = "free"
    name = "Free"
    [plans.features.calls]
    kind = "metered"
    limit = 50
    enforcement = "hard"
    [plans.features.export]
    kind = "boolean"
    enabled = false

    [[plans]]
    id = "pro"
    name = "Pro"
    [plans.features.calls]
    kind = "metered"
    limit = 100
    enforcement = "soft"
    [plans.features.export]
    kind = "boolean"
"#;

const CUSTOMERS: &str = r#"
    [[customers]]
    id = "ana"
    plan = "pro"

    [[customers]]
    id = "bo"
    plan = "pro"

    [[customers]]
    id = "fred"
    plan = "free"
"#;

/// Runs grafana-key's script against the harness: `tally` on the PATH, the key file in
/// `keys` instead of the volume. Answers the file's content.
fn run_grafana_key(h: &common::Harness, keys: &Path) -> String {
    let compose = compose();
    let all = services(&compose);
    let (name, one_shot) = all
        .iter()
        .find(|(n, _)| n == "grafana-key")
        .expect("a grafana-key service");
    let key_dir = keys.to_str().unwrap();
    let script = entrypoint_script(name, one_shot).replace("/keys/", &format!("{key_dir}/"));
    let bin = Path::new(env!("CARGO_BIN_EXE_tally")).parent().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .env("PATH", path)
        .env("TALLY_NATS_URL", h.server.url())
        .env("TALLY_NATS_CREDENTIALS", h.server.credentials().dir())
        .env("TALLY_DATA_DIR", h.dir.path())
        .env("TALLY_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "grafana-key failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(keys.join("analyst.key")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sql_panel_runs_on_a_lake_with_data() {
    let h = common::Harness::start().await;
    h.define(CATALOG, CUSTOMERS).await;
    let pipeline = tally::pipeline::start(&h.config, &h.nats, None)
        .await
        .unwrap();
    // Dated now, so in this month and the last 30 days whenever the test runs: ana past
    // pro's soft limit (overage), bo within it, fred refused by free's hard limit
    // (limit_reached) and by export being off (not_entitled), nobody unknown.
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    h.send("ana", "calls", 30, 5, &now, None).await;
    h.send("ana", "export", 2, 1, &now, None).await;
    h.send("bo", "calls", 10, 4, &now, None).await;
    h.send("fred", "calls", 12, 5, &now, None).await;
    h.send("fred", "export", 1, 1, &now, None).await;
    h.send("nobody", "calls", 1, 1, &now, None).await;
    h.drain(&pipeline, 30 + 2 + 10 + 12 + 1 + 1).await;
    pipeline.shutdown().await.unwrap();

    // The API as the tally service runs it; its first start makes the admin key, which
    // grafana-key waits for.
    let api = h.api().await;
    let keys = tempfile::tempdir().unwrap();
    let key = run_grafana_key(&h, keys.path());
    assert!(key.starts_with("tally_") && !key.contains('\n'), "{key:?}");
    // A second run (a restart of the stack) keeps the key it wrote.
    assert_eq!(run_grafana_key(&h, keys.path()), key);
    let made = tally_api::ApiKeys::open(&h.nats.jetstream, 1)
        .await
        .unwrap()
        .list()
        .await
        .unwrap();
    let analyst: Vec<_> = made
        .iter()
        .filter(|k| k.role == tally_api::Role::Analyst)
        .collect();
    assert_eq!(analyst.len(), 1, "{made:?}");
    assert_eq!(analyst[0].name, "grafana");
    assert!(key.starts_with(&format!("tally_{}_", analyst[0].id)));

    let panels = sql_panels();
    assert!(panels.len() >= 5, "{} SQL panels", panels.len());
    for (title, target) in &panels {
        let query = sql_of(title, target);
        // What Infinity sends: the body as written, the key as the data source's header.
        let response = api
            .request(reqwest::Method::POST, "/api/v1/sql", Some(&key))
            .header("content-type", "application/json")
            .body(target["url_options"]["data"].as_str().unwrap().to_owned())
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, reqwest::StatusCode::OK, "{title}: {query}\n{body}");
        let rows: Vec<serde_json::Map<String, Json>> = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{title}: not an array of rows ({e}): {body}"));
        assert!(!rows.is_empty(), "{title}: no rows\n{query}");
        // Every declared column is in every row, a number where it is declared one.
        for column in target["columns"].as_array().unwrap() {
            let selector = column["selector"].as_str().unwrap();
            let kind = column["type"].as_str().unwrap();
            for row in &rows {
                let value = row
                    .get(selector)
                    .unwrap_or_else(|| panic!("{title}: no column {selector} in {body}"));
                match kind {
                    "string" => assert!(value.is_string(), "{title}: {selector} {value}"),
                    "number" | "timestamp_epoch" | "timestamp_epoch_s" => {
                        assert!(value.is_number(), "{title}: {selector} {value}")
                    }
                    other => panic!("{title}: {selector} is declared {other}"),
                }
            }
        }
        eprintln!("{title}: {} rows: {body}", rows.len());
    }

    // What the panels show, for this lake.
    let rows_of = |title: &str| {
        let (_, target) = panels.iter().find(|(t, _)| t.starts_with(title)).unwrap();
        sql_of(title, target)
    };
    let run = |query: String| {
        let api = &api;
        let key = key.clone();
        async move {
            let r = api
                .request(reqwest::Method::POST, "/api/v1/sql", Some(&key))
                .json(&serde_json::json!({ "query": query }))
                .send()
                .await
                .unwrap();
            serde_json::from_str::<Json>(&r.text().await.unwrap()).unwrap()
        }
    };
    let overage = run(rows_of("Overage")).await;
    assert!(
        overage
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["customer"] == "ana" && r["feature"] == "calls"),
        "{overage}"
    );
    let rejections = run(rows_of("Rejections")).await;
    let reasons: BTreeSet<&str> = rejections
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        BTreeSet::from(["limit_reached", "not_entitled", "unknown_customer"]),
        "{rejections}"
    );
    let top = run(rows_of("Top 10")).await;
    assert_eq!(top[0]["customer"], "ana", "{top}");
    // The analyst key reads SQL only.
    let billing = api
        .request(reqwest::Method::GET, "/api/v1/billing", Some(&key))
        .send()
        .await
        .unwrap();
    assert!(billing.status().is_client_error(), "{}", billing.status());

    api.stop.cancel();
}

/// The compose file's nats-server configuration, with the authorization `tally nats init`
/// writes, refuses anonymous clients, clients that do not trust its CA and plain
/// connections; Tally's services get in with their nkeys over TLS, each with its own
/// permissions.
/// The compose NATS configuration, run as its three nodes: they form a JetStream cluster
/// over TLS routes with the route secret (a stream with three replicas is made and has
/// them), and every node refuses anonymous, plain and untrusting clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_nats_cluster_forms_and_refuses_anonymous_and_plain_clients() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("auth");
    // Route and client ports for the three nodes, as compose gives each its own host;
    // picked together so that no node's client port is another's route port.
    let picked = common::free_ports(6);
    let (routes, clients) = picked.split_at(3);
    // What nats-init runs, with the hosts a test reaches.
    let mut init = Command::new(env!("CARGO_BIN_EXE_tally"));
    init.args(["nats", "init", "--dir"]).arg(&auth).args([
        "--tls-host",
        "127.0.0.1",
        "--tls-host",
        "localhost",
    ]);
    for port in routes {
        init.args(["--route", &format!("127.0.0.1:{port}")]);
    }
    let out = init.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&auth), 0o700);
    for secret in [
        "worker.nk",
        "api.nk",
        "admin.nk",
        "callout.nk",
        "route.secret",
        "cluster.conf",
        "server-key.pem",
    ] {
        assert_eq!(mode(&auth.join(secret)), 0o600, "{secret}");
    }
    // The compose configuration, with this machine's paths and ports, for each node.
    let config = std::fs::read_to_string(repo().join("deploy/nats/nats-server.conf")).unwrap();
    assert!(config.contains("include \"auth/auth.conf\""), "{config}");
    assert!(config.contains("include \"auth/cluster.conf\""), "{config}");
    assert!(config.contains("port: 6222"), "{config}");
    let binary = tally_natsd::find_binary().expect("nats-server (scripts/install-nats.sh)");
    let mut nodes = Vec::new();
    let mut ports = Vec::new();
    for (i, route) in routes.iter().enumerate() {
        let node = dir.path().join(format!("n{i}"));
        std::fs::create_dir_all(&node).unwrap();
        let config = config
            .replace("port: 4222", &format!("port: {}", clients[i]))
            .replace("port: 6222", &format!("port: {route}"))
            .replace("http: \"127.0.0.1:8222\"\n", "")
            .replace("/data/jetstream", &node.join("js").display().to_string())
            .replace("/etc/nats/auth/", &format!("{}/", auth.display()))
            + &format!("ports_file_dir: \"{}\"\n", node.display());
        let conf = node.join("nats-server.conf");
        std::fs::write(&conf, config).unwrap();
        // `include "auth/…"` is relative to the configuration's directory.
        std::os::unix::fs::symlink(&auth, node.join("auth")).unwrap();
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&conf)
            .env("NATS_SERVER_NAME", format!("nats-{}", i + 1))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(node.join("log")).unwrap())
            .spawn()
            .unwrap();
        nodes.push(KillOnDrop(child));
    }
    for (i, node) in nodes.iter_mut().enumerate() {
        let ports_dir = dir.path().join(format!("n{i}"));
        let port = loop {
            let ports = std::fs::read_dir(&ports_dir)
                .unwrap()
                .filter_map(|e| e.ok())
                .find(|e| e.file_name().to_string_lossy().ends_with(".ports"));
            if let Some(text) = ports.and_then(|p| std::fs::read_to_string(p.path()).ok()) {
                let ports: Json = serde_json::from_str(&text).unwrap_or_default();
                if let Some(url) = ports["nats"][0].as_str() {
                    break url.rsplit_once(':').unwrap().1.parse::<u16>().unwrap();
                }
            }
            assert!(
                node.0.try_wait().unwrap().is_none(),
                "nats-server {i} exited: {}",
                std::fs::read_to_string(ports_dir.join("log")).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        ports.push(port);
    }
    let ca = auth.join("ca.pem");
    let seed = |name: &str| std::fs::read_to_string(auth.join(name)).unwrap();
    for port in &ports {
        let url = format!("tls://127.0.0.1:{port}");
        let attempts = [
            (
                "anonymous",
                async_nats::ConnectOptions::new().add_root_certificates(ca.clone()),
            ),
            (
                "a client that does not trust the CA",
                async_nats::ConnectOptions::with_nkey(seed("worker.nk")).require_tls(true),
            ),
        ];
        for (who, options) in attempts {
            assert!(!tally_natsd::lets_in(options, &url).await, "{who} got in");
        }
        let plain = async_nats::ConnectOptions::with_nkey(seed("worker.nk"));
        assert!(
            !tally_natsd::lets_in(plain, &format!("nats://127.0.0.1:{port}")).await,
            "a plain connection got in"
        );
    }
    // Tally's admin, given every node: a stream with three replicas is made once the
    // nodes found each other, and all three hold it.
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("tls://127.0.0.1:{p}"))
        .collect();
    let admin = async_nats::ConnectOptions::with_nkey(seed("admin.nk"))
        .add_root_certificates(ca.clone())
        .require_tls(true)
        .connect(urls)
        .await
        .unwrap();
    let js = async_nats::jetstream::new(admin);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut stream = loop {
        let made = js
            .get_or_create_stream(async_nats::jetstream::stream::Config {
                name: "TALLY_AUDIT".to_owned(),
                subjects: vec!["tally.audit.>".to_owned()],
                num_replicas: 3,
                ..Default::default()
            })
            .await;
        match made {
            Ok(stream) => break stream,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("waiting for the cluster: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            Err(e) => panic!("the nodes formed no cluster within 60 s: {e}"),
        }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let info = stream.info().await.unwrap();
        let cluster = info.cluster.as_ref().expect("a clustered stream");
        let current = cluster.replicas.iter().filter(|r| r.current).count();
        if cluster.leader.is_some() && current == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the stream has no three current copies: {cluster:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// A child process killed when dropped (a failed assertion leaves no server running).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
