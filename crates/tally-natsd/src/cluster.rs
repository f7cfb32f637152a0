//! A NATS cluster of local nodes: the test harness's and the fault suite's stand-in for a
//! deployment's three hosts.
//!
//! Each node is a [`NatsServer`] of its own (its data directory, JetStream store, client
//! port chosen by the server, ports file, log), started by the same code as a single
//! server. The nodes share one credentials directory, so a client's credential is good on
//! every node, and they route to each other on loopback ports, authenticated with the
//! directory's route secret. JetStream in a cluster needs every node's route address in
//! each node's configuration before it starts, so the route ports are picked first (bound
//! and released); a start that loses one of them to another process meanwhile is tried
//! again with others. A restarted node keeps its ports.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{ConnectError, Credentials, Error, NatsServer, Result, ServerOptions, Service};

/// A node's place in a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterOptions {
    /// The cluster's name, the same on every node.
    pub name: String,
    /// This node's name, unique in the cluster and kept across restarts (JetStream knows
    /// its peers by name).
    pub server_name: String,
    /// The route port this node listens on, on 127.0.0.1.
    pub port: u16,
    /// The monitoring port (`/healthz`), on 127.0.0.1; 0 lets the server pick one.
    pub monitor_port: u16,
    /// Every node's route address, this node's own included (a node ignores a route to
    /// itself).
    pub routes: Vec<SocketAddr>,
}

impl ClusterOptions {
    /// The lines of a node's configuration: its name, a monitoring port (for `/healthz`),
    /// and its `cluster` block, its routes authenticated with `credentials`' route secret.
    pub(crate) fn config(&self, credentials: &Credentials) -> Result<String> {
        let peers: Vec<String> = self.routes.iter().map(SocketAddr::to_string).collect();
        Ok(format!(
            "server_name: \"{server}\"\nhttp: \"127.0.0.1:{monitor}\"\ncluster {{\n  name: \"{name}\"\n  listen: \"127.0.0.1:{port}\"\n{routes}}}\n",
            server = self.server_name,
            name = self.name,
            port = self.port,
            monitor = match self.monitor_port {
                0 => "-1".to_owned(),
                port => port.to_string(),
            },
            routes = credentials.routes(&peers)?,
        ))
    }
}

/// How long a cluster's start waits for JetStream on every node.
const READY: Duration = Duration::from_secs(30);

/// Local nats-server nodes routed into one cluster, each killed when this is dropped.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
    credentials: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl NatsCluster {
    /// Starts `size` nodes (`n1` …) under `dir`, their shared credentials in
    /// `dir/credentials` (made when missing), and waits until JetStream answers on every
    /// node. A directory that held a cluster before keeps its streams.
    pub fn start(dir: &Path, size: usize, binary: Option<PathBuf>) -> Result<NatsCluster> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::try_start(dir, size, binary.clone()) {
                Ok(cluster) => return Ok(cluster),
                // A missing binary does not come back; a route port taken meanwhile might.
                Err(e @ (Error::NotFound | Error::Spawn { .. })) => return Err(e),
                Err(e) if attempt == 3 => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "NATS cluster did not start; trying other ports")
                }
            }
        }
    }

    /// A throwaway cluster for a test: its own temporary directory, removed on drop.
    pub fn start_temp(size: usize) -> Result<NatsCluster> {
        let temp = tempfile::Builder::new()
            .prefix("tally-nats-cluster-")
            .tempdir()
            .map_err(|source| Error::Io {
                path: std::env::temp_dir(),
                source,
            })?;
        let mut cluster = Self::start(temp.path(), size, None)?;
        cluster._temp = Some(temp);
        Ok(cluster)
    }

    fn try_start(dir: &Path, size: usize, binary: Option<PathBuf>) -> Result<NatsCluster> {
        let credentials = dir.join("credentials");
        // Every port a node listens on is picked here, all at once: a port the server
        // picked itself could be one just released for another node's route.
        let ports = crate::free_ports(3 * size).map_err(|source| Error::Io {
            path: dir.to_owned(),
            source,
        })?;
        let (routes, rest) = ports.split_at(size);
        let (clients, monitors) = rest.split_at(size);
        let routes: Vec<SocketAddr> = routes
            .iter()
            .map(|&port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .collect();
        let mut nodes = Vec::with_capacity(size);
        for i in 0..size {
            let mut options = ServerOptions::new(dir.join(format!("n{}", i + 1)));
            options.binary = binary.clone();
            options.credentials = credentials.clone();
            options.port = clients[i];
            options.cluster = Some(ClusterOptions {
                name: "tally".to_owned(),
                server_name: format!("n{}", i + 1),
                port: routes[i].port(),
                monitor_port: monitors[i],
                routes: routes.clone(),
            });
            nodes.push(NatsServer::start(options)?);
        }
        let cluster = NatsCluster {
            nodes,
            credentials,
            _temp: None,
        };
        cluster.wait_ready(0..size)?;
        Ok(cluster)
    }

    /// Waits until JetStream answers on these nodes (each node's `/healthz`).
    fn wait_ready(&self, nodes: impl Iterator<Item = usize> + Clone) -> Result<()> {
        let deadline = Instant::now() + READY;
        loop {
            let waiting = nodes.clone().find(|&i| !self.nodes[i].healthy());
            let Some(i) = waiting else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    secs: READY.as_secs(),
                    log: self.nodes[i].data_dir().join("nats-server.log"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every node's client URL, comma-separated: what a client is given to connect to
    /// whichever node answers, and to fail over between them.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// The credentials every node enforces.
    pub fn credentials(&self) -> Credentials {
        Credentials::open(&self.credentials)
    }

    /// Stops node `i` (SIGKILL); its store stays for its restart.
    pub fn stop_node(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Starts node `i` again on its ports and store and waits until JetStream answers on
    /// it.
    pub fn restart_node(&mut self, i: usize) -> Result<()> {
        self.nodes[i].restart()?;
        self.wait_ready(std::iter::once(i))
    }

    /// Connects as one of Tally's services, to whichever node answers.
    pub async fn connect(&self, service: Service) -> Result<async_nats::Client, ConnectError> {
        let seed = self.credentials().seed(service)?;
        Ok(async_nats::ConnectOptions::with_nkey(seed)
            .connect(tally_core::subject::server_urls(&self.url()))
            .await?)
    }
}

impl NatsServer {
    /// Whether the server reports itself healthy, JetStream included (`GET /healthz` on
    /// its monitoring port, which only cluster nodes open). A server without one is
    /// healthy once it accepts connections.
    pub fn healthy(&self) -> bool {
        if self.pid().is_none() {
            return false;
        }
        let Some(monitor) = self.monitor else {
            return true;
        };
        let answer = || -> std::io::Result<String> {
            let mut stream = TcpStream::connect_timeout(&monitor, Duration::from_secs(1))?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
            let mut text = String::new();
            stream.read_to_string(&mut text)?;
            Ok(text)
        };
        answer().is_ok_and(|text| text.split_whitespace().nth(1) == Some("200"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::{self, stream};

    /// A stream replicated on three nodes keeps taking and keeping messages while any one
    /// node is down, and the node that comes back catches up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replicated_stream_survives_the_loss_of_any_one_node() {
        let mut cluster = NatsCluster::start_temp(3).expect("run scripts/install-nats.sh first");
        assert_eq!(cluster.url().split(',').count(), 3);
        let client = cluster.connect(Service::Admin).await.unwrap();
        let js = jetstream::new(client);
        js.create_stream(stream::Config {
            name: "REPLICATED".to_owned(),
            subjects: vec!["replicated.>".to_owned()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap();
        let mut sent = 0;
        for down in 0..3 {
            cluster.stop_node(down);
            for _ in 0..20 {
                // The client fails over to a live node; JetStream answers once the stream
                // has a leader again (nats-server elects one within seconds).
                let deadline = Instant::now() + Duration::from_secs(60);
                let ack = loop {
                    assert!(
                        Instant::now() < deadline,
                        "no publish acknowledged within 60 s of node {down}'s loss"
                    );
                    match js.publish("replicated.x", "m".into()).await {
                        Ok(ack) => match ack.await {
                            Ok(ack) => break ack,
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        },
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                };
                sent += 1;
                assert_eq!(ack.sequence, sent, "a message stored twice or lost");
            }
            tokio::task::block_in_place(|| cluster.restart_node(down)).unwrap();
        }
        let mut stream = js.get_stream("REPLICATED").await.unwrap();
        let info = stream.info().await.unwrap();
        assert_eq!(info.state.messages, 60);
        assert_eq!(info.config.num_replicas, 3);
        let cluster_info = info.cluster.as_ref().unwrap();
        assert_eq!(cluster_info.replicas.len(), 2, "{cluster_info:?}");
    }

    /// A route without the cluster's secret is refused: a local process cannot join the
    /// cluster and so bypass the clients' authorization.
    #[test]
    fn a_route_without_the_secret_is_refused() {
        let cluster = NatsCluster::start_temp(3).unwrap();
        let options = cluster.nodes[0].options.cluster.clone().unwrap();
        let config = options.config(&cluster.credentials()).unwrap();
        let secret = cluster.credentials().route_secret().unwrap();
        assert!(config.contains(&format!("route:{secret}@")), "{config}");
        let mut route = TcpStream::connect(options.routes[1]).unwrap();
        route
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut info = [0u8; 4096];
        let n = route.read(&mut info).unwrap();
        assert!(String::from_utf8_lossy(&info[..n]).starts_with("INFO "));
        route
            .write_all(b"CONNECT {\"user\":\"route\",\"pass\":\"wrong\",\"name\":\"intruder\"}\r\nPING\r\n")
            .unwrap();
        let mut answer = String::new();
        let _ = route.read_to_string(&mut answer);
        assert!(
            answer.contains("-ERR 'Authorization Violation'"),
            "{answer:?}"
        );
    }
}
