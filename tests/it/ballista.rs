//! Distributed queries: a Ballista scheduler and two executors (`tally ballista …`, real
//! processes on loopback ports) answer billing, overage, adoption and SQL over a demo's
//! lake exactly as the local engine does.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Datelike;
use serde_json::Value;

/// A `tally ballista …` or `tally serve` process, stopped on drop, whose log lines are
/// kept.
struct Node {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    /// `tally ballista <args>` over the demo's data directory.
    fn start(data: &Path, args: &[&str]) -> Node {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
        command.arg("ballista").args(args).env(
            "TALLY_LOG",
            "warn,tally=info,ballista_scheduler=info,ballista_executor=info",
        );
        Node::spawn(command, data)
    }

    /// `tally serve` over the demo's data directory, its queries on `engine`; returns
    /// once its API listens.
    fn serve(data: &Path, engine: &str) -> Node {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
        command
            .arg("serve")
            .env("TALLY_QUERY_ENGINE", engine)
            .env("TALLY_API__LISTEN", "127.0.0.1:0")
            .env("TALLY_LOG", "warn,tally=info");
        let mut node = Node::spawn(command, data);
        node.wait_for("tally serve", |n| n.count("tally is running") > 0);
        node
    }

    /// Runs `command` on `data`, keeping its log lines.
    fn spawn(mut command: Command, data: &Path) -> Node {
        let mut child = command
            .arg("--data-dir")
            .arg(data)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        Node { child, log }
    }

    /// The URL `tally serve` printed for its API.
    fn api_url(&self) -> String {
        let log = self.log.lock().unwrap();
        let line = log
            .iter()
            .find_map(|l| l.strip_prefix("tally api on "))
            .expect("tally serve printed its API's URL");
        line.trim().to_owned()
    }

    /// Its log lines containing `text`.
    fn count(&self, text: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(text))
            .count()
    }

    fn wait_for(&mut self, what: &str, ready: impl Fn(&Node) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready(self) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{what}: exited with {status}:\n{}",
                    self.log.lock().unwrap().join("\n")
                );
            }
            assert!(Instant::now() < deadline, "{what}: not within 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Node {
    /// SIGTERM, so that `tally serve` stops the nats-server it started (SIGKILL would leave
    /// that server running), then SIGKILL after 20 s.
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tally(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .env("TALLY_LOG", "warn")
        .output()
        .unwrap()
}

/// `tally <args>`'s stdout, which must succeed.
fn answer(data: &Path, args: &[&str]) -> String {
    let out = tally(data, args);
    assert!(
        out.status.success(),
        "tally {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_and_two_executors_answer_as_the_local_engine_does() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    // Last month: closed, whatever today is.
    let today = chrono::Utc::now().date_naive();
    let month = today - chrono::Days::new(u64::from(today.day()));
    let period = month.format("%Y-%m").to_string();
    let (first, last) = (month.with_day(1).unwrap().to_string(), month.to_string());
    let demo = answer(
        &data,
        &[
            "demo",
            "--month",
            &period,
            "--events",
            "20000",
            "--customers",
            "120",
            "--format",
            "json",
        ],
    );
    assert!(demo.contains(&period), "{demo}");

    let ports = crate::common::free_ports(5);
    let scheduler_addr = format!("127.0.0.1:{}", ports[0]);
    let engine = format!("ballista://{scheduler_addr}");
    let mut scheduler = Node::start(&data, &["scheduler", "--listen", &scheduler_addr]);
    scheduler.wait_for("the scheduler", |_| {
        std::net::TcpStream::connect(&scheduler_addr).is_ok()
    });
    let executors: Vec<Node> = [(ports[1], ports[2]), (ports[3], ports[4])]
        .into_iter()
        .map(|(flight, grpc)| {
            Node::start(
                &data,
                &[
                    "executor",
                    "--scheduler",
                    &scheduler_addr,
                    "--listen",
                    &format!("127.0.0.1:{flight}"),
                    "--grpc-port",
                    &grpc.to_string(),
                    "--concurrent-tasks",
                    "2",
                    "--memory-limit-mib",
                    "512",
                ],
            )
        })
        .collect();
    scheduler.wait_for("both executors registering", |s| {
        s.count("Received register executor request") >= 2
    });

    // The same command, here and on the cluster: the same bytes.
    let both = |args: &[&str]| {
        let local = answer(&data, args);
        let distributed = answer(&data, &[args, &["--engine", &engine]].concat());
        assert_eq!(local, distributed, "tally {args:?}");
        local
    };
    let bill: Vec<Value> =
        serde_json::from_str(&both(&["billing", "--period", &period, "--format", "json"])).unwrap();
    assert!(bill.len() >= 100, "{} invoices", bill.len());
    let overage: Value =
        serde_json::from_str(&both(&["overage", "--period", &period, "--format", "json"])).unwrap();
    assert!(overage.is_object(), "{overage}");
    let adoption: Value = serde_json::from_str(&both(&[
        "adoption", "--from", &first, "--to", &last, "--format", "json",
    ]))
    .unwrap();
    assert!(adoption.is_object(), "{adoption}");
    // SQL with a join of the lake with tables made in memory (decisions, plans), a
    // shuffle (group by) and an order.
    let by_plan = both(&[
        "sql",
        "SELECT p.name AS plan, d.decision, COUNT(*) AS events, SUM(e.quantity) AS quantity \
         FROM events e JOIN decisions d ON e.decision_code = d.code \
         LEFT JOIN plans p ON e.plan = p.plan \
         GROUP BY p.name, d.decision ORDER BY plan, decision",
        "--format",
        "csv",
    ]);
    let rows: Vec<&str> = by_plan.lines().skip(1).collect();
    assert!(rows.len() >= 2, "{by_plan}");
    let events: u64 = rows
        .iter()
        .map(|r| r.split(',').nth(2).unwrap().parse::<u64>().unwrap())
        .sum();
    let total = answer(
        &data,
        &["sql", "SELECT COUNT(*) AS n FROM events", "--format", "csv"],
    );
    assert_eq!(format!("n\n{events}\n"), total);

    // The API's SQL route, with `query_engine` set: the same rows as `tally sql` here.
    let key = answer(&data, &["keys", "create", "--role", "analyst"]);
    let tasks_before: usize = executors.iter().map(|e| e.count("Execute task")).sum();
    let serve = Node::serve(&data, &engine);
    let url = serve.api_url();
    let query = "SELECT customer, COUNT(*) AS events, SUM(quantity) AS quantity \
                 FROM events GROUP BY customer ORDER BY customer";
    let over_http = crate::common::http()
        .post(format!("{url}/api/v1/sql"))
        .bearer_auth(key.trim())
        .header("accept", "text/csv")
        .json(&serde_json::json!({ "query": query }))
        .send()
        .await
        .unwrap();
    assert_eq!(over_http.status(), 200);
    let over_http = over_http.text().await.unwrap();
    assert_eq!(over_http, answer(&data, &["sql", query, "--format", "csv"]));
    assert!(over_http.lines().count() > 100, "{over_http}");
    let tasks_after: usize = executors.iter().map(|e| e.count("Execute task")).sum();
    assert!(
        tasks_after > tasks_before,
        "the API's query ran on no executor"
    );
    drop(serve);

    // The cluster did the work: tasks ran on both executors.
    for (i, executor) in executors.iter().enumerate() {
        assert!(
            executor.count("Execute task") > 0,
            "executor {i} ran no task"
        );
    }

    // With the scheduler gone a distributed query fails; it never runs here instead.
    drop(scheduler);
    let out = tally(
        &data,
        &["sql", "SELECT COUNT(*) FROM events", "--engine", &engine],
    );
    assert!(!out.status.success());
    let refused = tally(&data, &["sql", "SELECT 1", "--engine", "http://x:1"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("ballista://HOST:PORT"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
