//! docker-compose.yml and what it mounts, without Docker: every mounted file exists, every
//! build context has its Dockerfile, Prometheus scrapes Tally's services on the port their
//! API listens on, Grafana's data source is the Prometheus service, and every dashboard it
//! provisions is valid JSON whose queries name only metrics Tally exports.

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
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
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
        all.len() >= 5,
        "nats, tally, tally-worker, prometheus, grafana"
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
    let tally: Vec<&(String, Value)> = all.iter().filter(|(_, s)| !s["build"].is_null()).collect();
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
            assert_eq!(ds["type"].as_str(), Some("prometheus"));
            let url = ds["url"].as_str().unwrap();
            assert_eq!(
                url,
                format!("http://{prometheus_name}:9090"),
                "{}",
                path.display()
            );
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
                let expr = target["expr"].as_str().unwrap();
                let used = metrics_in(expr);
                assert!(!used.is_empty(), "{title}: {expr} names no Tally metric");
                for name in used {
                    assert!(exported(&name), "{title}: Tally exports no {name}");
                }
                for ds in [&panel["datasource"], &target["datasource"]] {
                    if let Some(uid) = ds["uid"].as_str() {
                        assert!(uids.contains(uid), "{title}: no data source {uid}");
                    }
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
