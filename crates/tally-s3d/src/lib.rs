//! Runs a local S3-compatible server, `tally-s3-server` (s3s-fs), as a child process.
//!
//! The lake's Delta tables live on local disk or in S3-compatible object storage. Tests, the
//! fault suite and benchmarks need the second kind without a cloud account: this crate starts
//! `tally-s3-server` (`tools/s3-server`: the file system and S3 service of the crates.io
//! `s3s-fs`, at the version its lockfile pins), which serves the subdirectories of its root
//! directory as buckets, on a loopback port, with an access key and secret of its own. [`S3Server::start_temp`] gives a test a server on a free port with
//! a private temporary directory, one bucket and a random key, stopped on drop;
//! [`S3Server::restart`] brings it back on the same port with the same objects (the fault
//! suite's "object store restarted mid-run"). The crate knows nothing of `object_store`: a
//! caller builds its own client from [`S3Server::endpoint`], [`bucket`](S3Server::bucket),
//! the keys and [`region`](S3Server::region).
//!
//! **Ports.** s3s-fs takes its port on the command line and writes no ports file, so the
//! starter picks a free one (binding 127.0.0.1:0) and hands it over. Another process may
//! take the port in between; s3s-fs then exits with "address in use" and the start is tried
//! again on another port. The server counts as ready once its own log says that it listens
//! on the port and the port accepts a connection, so the starter never takes another
//! process's listener for its own. [`S3Server::restart`] keeps the port, and while another
//! process holds it, tries again until the ready timeout.
//!
//! **Conditional writes.** The server honours `If-None-Match: *` on PutObject
//! (object_store's `PutMode::Create`, which Delta commits rely on) and `If-Match`
//! (`PutMode::Update`) atomically: s3s-fs alone checks and then writes, so two concurrent
//! creates of one key could both succeed; `tally-s3-server` serves conditional requests one
//! at a time (`tests/object_store.rs` races them).
//!
//! The binary is found in this order: `TALLY_S3_SERVER`, then, when run by cargo, a
//! `.tools/bin/tally-s3-server` above the package (where `scripts/install-s3.sh` installs
//! it), then `./.tools/bin/tally-s3-server`, then `tally-s3-server` on `PATH`.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The region clients sign requests for (s3s-fs accepts any; this is the one to use).
pub const REGION: &str = "us-east-1";
/// The bucket [`S3Server::start_temp`] makes.
pub const BUCKET: &str = "tally";

/// How many free ports a start tries when another process takes the one it picked.
const PORT_ATTEMPTS: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no tally-s3-server found: set TALLY_S3_SERVER, run scripts/install-s3.sh, or put it on PATH"
    )]
    NotFound,
    #[error("s3s-fs at {path}: {source}")]
    Spawn { path: PathBuf, source: io::Error },
    #[error("s3s-fs I/O in {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("port {port} on 127.0.0.1 is another process's (waited {secs} s); s3s-fs's log: {log}")]
    PortInUse { port: u16, secs: u64, log: PathBuf },
    #[error("s3s-fs exited ({status}) before accepting connections; its log: {log}")]
    Exited { status: ExitStatus, log: PathBuf },
    #[error("s3s-fs did not accept connections within {secs} s; its log: {log}")]
    NotReady { secs: u64, log: PathBuf },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Path of the `s3s-fs` binary; `None` searches as the crate docs say.
    pub binary: Option<PathBuf>,
    /// Port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// The server's root directory: each subdirectory is a bucket.
    pub root: PathBuf,
    /// The bucket made (as a subdirectory of `root`) when missing.
    pub bucket: String,
    /// The server's standard output and error, appended.
    pub log: PathBuf,
    pub access_key: String,
    pub secret_key: String,
    /// How long to wait for the server to accept connections (and, on a restart, for its
    /// port to be free).
    pub ready_timeout: Duration,
}

impl ServerOptions {
    /// A server whose objects live in `dir/data` (bucket [`BUCKET`]) and whose log is
    /// `dir/s3s-fs.log`, with a random access key and secret.
    pub fn new(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        Self {
            binary: None,
            port: 0,
            root: dir.join("data"),
            bucket: BUCKET.to_owned(),
            log: dir.join("s3s-fs.log"),
            access_key: random_key(10),
            secret_key: random_key(20),
            ready_timeout: Duration::from_secs(15),
        }
    }
}

/// A running `s3s-fs` child, killed when dropped.
#[derive(Debug)]
pub struct S3Server {
    child: Option<Child>,
    binary: PathBuf,
    options: ServerOptions,
    _temp: Option<tempfile::TempDir>,
}

impl S3Server {
    /// Starts a server and waits until it accepts connections.
    pub fn start(options: ServerOptions) -> Result<Self> {
        let binary = match options.binary.clone() {
            Some(b) => b,
            None => find_binary().ok_or(Error::NotFound)?,
        };
        let bucket = options.root.join(&options.bucket);
        fs::create_dir_all(&bucket).map_err(io_at(&bucket))?;
        if let Some(dir) = options.log.parent() {
            fs::create_dir_all(dir).map_err(io_at(dir))?;
        }
        let mut server = Self {
            child: None,
            binary,
            options,
            _temp: None,
        };
        let deadline = Instant::now() + server.options.ready_timeout;
        if server.options.port != 0 {
            server.spawn_on(server.options.port)?;
            return Ok(server);
        }
        let mut attempt = 1;
        loop {
            let port = free_port().map_err(|source| Error::Io {
                path: PathBuf::from("127.0.0.1:0"),
                source,
            })?;
            match server.spawn_on(port) {
                Err(Error::PortInUse { .. })
                    if attempt < PORT_ATTEMPTS && Instant::now() < deadline =>
                {
                    tracing::debug!(port, "the port picked for s3s-fs was taken; another");
                    attempt += 1;
                }
                Err(e) => return Err(e),
                Ok(()) => {
                    server.options.port = port;
                    return Ok(server);
                }
            }
        }
    }

    /// Starts a throwaway server for a test: a free port, its own temporary directory
    /// (removed on drop), bucket [`BUCKET`], a random access key and secret. When the server
    /// fails to start, the directory is kept so that the log the error names can be read.
    pub fn start_temp() -> Result<Self> {
        let temp = tempfile::Builder::new()
            .prefix("tally-s3-")
            .tempdir()
            .map_err(|source| Error::Io {
                path: std::env::temp_dir(),
                source,
            })?;
        let options = ServerOptions::new(temp.path());
        let log = options.log.clone();
        match Self::start(options) {
            Ok(mut server) => {
                server._temp = Some(temp);
                Ok(server)
            }
            Err(e) => {
                if log.exists() {
                    let _ = temp.keep();
                }
                Err(e)
            }
        }
    }

    /// The endpoint URL, `http://127.0.0.1:<port>` (path-style requests: the bucket is the
    /// first path segment).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }

    pub fn port(&self) -> u16 {
        self.options.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.options.port))
    }

    pub fn bucket(&self) -> &str {
        &self.options.bucket
    }

    pub fn access_key(&self) -> &str {
        &self.options.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.options.secret_key
    }

    pub fn region(&self) -> &str {
        REGION
    }

    /// The root directory: the bucket is its subdirectory of that name, and an object's
    /// key is its path below it.
    pub fn root(&self) -> &Path {
        &self.options.root
    }

    /// The server's log (its standard output and error, kept across restarts).
    pub fn log(&self) -> &Path {
        &self.options.log
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server (SIGKILL, as a crash would) and waits for it to exit. The objects
    /// stay.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same objects and keys. While
    /// another process holds the port, it tries again until the ready timeout.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let port = self.options.port;
        let began = Instant::now();
        loop {
            match self.spawn_on(port) {
                Err(Error::PortInUse { .. }) if began.elapsed() < self.options.ready_timeout => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(Error::PortInUse { port, log, .. }) => {
                    let secs = began.elapsed().as_secs();
                    return Err(Error::PortInUse { port, secs, log });
                }
                other => return other,
            }
        }
    }

    /// One start of s3s-fs on `port`, given the whole ready timeout: ready, or why not. A
    /// port another process holds is [`Error::PortInUse`], which the callers retry.
    fn spawn_on(&mut self, port: u16) -> Result<()> {
        let log = self.options.log.clone();
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io_at(&log))?;
        // Only what this start writes counts.
        let from = out.metadata().map_err(io_at(&log))?.len();
        let err = out.try_clone().map_err(io_at(&log))?;
        let started = Instant::now();
        let deadline = started + self.options.ready_timeout;
        let mut child = Command::new(&self.binary)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", &self.options.access_key])
            .args(["--secret-key", &self.options.secret_key])
            .arg(&self.options.root)
            // It prints its listening address; warnings only of the rest.
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| Error::Spawn {
                path: self.binary.clone(),
                source,
            })?;
        let listening = format!("server is running at http://127.0.0.1:{port}");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        loop {
            let said = read_from(&log, from);
            if let Some(status) = child.try_wait().map_err(io_at(&log))? {
                if said.contains("AddrInUse") || said.contains("os error 98") {
                    return Err(Error::PortInUse {
                        port,
                        secs: started.elapsed().as_secs(),
                        log,
                    });
                }
                return Err(Error::Exited { status, log });
            }
            if said.contains(&listening)
                && TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
            {
                tracing::debug!(%addr, root = %self.options.root.display(), "s3s-fs ready");
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::NotReady {
                    secs: self.options.ready_timeout.as_secs(),
                    log,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Looks for a `tally-s3-server` binary; see the crate docs for the order.
pub fn find_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TALLY_S3_SERVER") {
        return Some(PathBuf::from(p));
    }
    let tools = Path::new(".tools/bin/tally-s3-server");
    // Under cargo (tests, `cargo run`), the workspace's .tools above the package being run.
    if let Some(manifest) = std::env::var_os("CARGO_MANIFEST_DIR")
        && let Some(found) = Path::new(&manifest)
            .ancestors()
            .map(|dir| dir.join(tools))
            .find(|candidate| candidate.is_file())
    {
        return Some(found);
    }
    if tools.is_file() {
        return Some(tools.to_owned());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("tally-s3-server"))
        .find(|candidate| candidate.is_file())
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// `bytes` random bytes in upper-case hex (AWS keys are upper-case alphanumerics).
fn random_key(bytes: usize) -> String {
    (0..bytes).fold(String::with_capacity(bytes * 2), |mut key, _| {
        let _ = write!(key, "{:02X}", rand::random::<u8>());
        key
    })
}

/// What the log holds past `from` (empty when it cannot be read).
fn read_from(log: &Path, from: u64) -> String {
    let bytes = fs::read(log).unwrap_or_default();
    let from = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> Error + use<> {
    let path = path.to_owned();
    move |source| Error::Io { path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listens(addr: SocketAddr) -> bool {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
    }

    #[test]
    fn starts_restarts_and_stops() {
        let mut server = S3Server::start_temp().expect("run scripts/install-s3.sh first");
        let addr = server.addr();
        assert_eq!(
            server.endpoint(),
            format!("http://127.0.0.1:{}", addr.port())
        );
        assert!(server.root().join(BUCKET).is_dir(), "no bucket directory");
        assert_eq!(server.bucket(), BUCKET);
        assert_eq!(server.access_key().len(), 20);
        assert_eq!(server.secret_key().len(), 40);
        let other = ServerOptions::new("elsewhere");
        assert_ne!(server.access_key(), other.access_key);
        assert_ne!(server.secret_key(), other.secret_key);
        assert!(listens(addr));
        let first = server.pid().unwrap();

        server.restart().unwrap();
        assert_eq!(server.addr(), addr, "a restart keeps the port");
        assert_ne!(server.pid(), Some(first));
        assert!(listens(addr));

        server.stop();
        assert_eq!(server.pid(), None);
        assert!(!listens(addr), "still listening after stop");
        server.restart().unwrap();
        assert!(listens(addr));

        let dir = server.root().parent().unwrap().to_owned();
        let log = fs::read_to_string(server.log()).unwrap();
        assert_eq!(log.matches("server is running at").count(), 3, "{log}");
        drop(server);
        assert!(!listens(addr), "still listening after drop");
        assert!(!dir.exists(), "temporary directory left behind");
    }

    /// A restart whose port another process holds for a moment waits for it; one held
    /// for longer than the ready timeout is an error that names the port and the log.
    #[test]
    fn a_restart_waits_for_its_port() {
        let mut server = S3Server::start_temp().unwrap();
        let addr = server.addr();
        server.stop();
        let squatter = TcpListener::bind(addr).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            drop(squatter);
        });
        server.restart().unwrap();
        release.join().unwrap();
        assert_eq!(server.addr(), addr);
        assert!(listens(addr));

        server.stop();
        let _squatter = TcpListener::bind(addr).unwrap();
        server.options.ready_timeout = Duration::from_secs(1);
        let err = server.restart().unwrap_err();
        assert!(
            matches!(&err, Error::PortInUse { port, log, .. }
                if *port == addr.port() && log == server.log()),
            "{err}"
        );
        assert!(err.to_string().contains("s3s-fs.log"), "{err}");
        assert_eq!(server.pid(), None);
    }

    /// A server asked for a port that is taken says so rather than waiting for someone
    /// else's listener.
    #[test]
    fn a_taken_port_is_refused_not_adopted() {
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut options = ServerOptions::new(dir.path());
        options.port = taken.local_addr().unwrap().port();
        options.ready_timeout = Duration::from_secs(5);
        let err = S3Server::start(options).unwrap_err();
        assert!(matches!(err, Error::PortInUse { .. }), "{err}");
        let log = fs::read_to_string(dir.path().join("s3s-fs.log")).unwrap();
        assert!(log.contains("AddrInUse"), "{log}");
    }

    /// TALLY_S3_SERVER when set; else, under cargo, the workspace's `.tools/bin/tally-s3-server`
    /// (where `scripts/install-s3.sh` puts it) when there is one.
    #[test]
    fn the_binary_is_found() {
        let found = find_binary().expect("run scripts/install-s3.sh first");
        assert!(found.is_file(), "{}", found.display());
        let installed =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/bin/tally-s3-server");
        match std::env::var_os("TALLY_S3_SERVER") {
            Some(set) => assert_eq!(found, PathBuf::from(set)),
            None if installed.is_file() => assert_eq!(
                found.canonicalize().unwrap(),
                installed.canonicalize().unwrap()
            ),
            None => {}
        }
    }
}
