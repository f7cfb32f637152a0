//! The credentials of a Tally deployment's NATS, and the server configuration that
//! enforces them.
//!
//! A credentials directory (mode 0700) holds one nkey seed per [`Service`] (`worker.nk`,
//! `api.nk`, `admin.nk`) and the auth callout's signing key (`callout.nk`, an account
//! nkey), each file mode 0600. The server knows only their public halves: each service is a
//! user with [`Service::permissions`], and any other client is sent to Tally's auth
//! callout, which answers with a short-lived user signed by the callout key. No client
//! connects without one or the other. The nodes of a cluster present `route.secret` to
//! each other on their routes.
//!
//! [`Credentials::ensure`] makes what is missing (the embedded default does so at first
//! start, `tally nats init` for a deployment); a process then reads only the seed of the
//! service it runs as, so a deployment can give each process just its own file.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nkeys::KeyPair;
use rand::distr::SampleString as _;
use tally_core::access::Permissions;
pub use tally_core::access::Service;

use crate::{Error, Result};

/// The file of the auth callout's signing key in a credentials directory.
pub const CALLOUT_FILE: &str = "callout.nk";
/// The nats-server configuration fragment a deployment includes.
pub const AUTH_CONF_FILE: &str = "auth.conf";
/// The secret the nodes of a NATS cluster present to each other on their routes.
pub const ROUTE_FILE: &str = "route.secret";
/// The user name of cluster routes.
pub const ROUTE_USER: &str = "route";
/// The nats-server configuration fragment a cluster's nodes include in their `cluster`
/// block.
pub const CLUSTER_CONF_FILE: &str = "cluster.conf";

/// A directory of NATS credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    dir: PathBuf,
}

impl Credentials {
    /// The credentials in `dir`, as they are (see [`seed`](Self::seed) for a missing one).
    pub fn open(dir: impl Into<PathBuf>) -> Credentials {
        Credentials { dir: dir.into() }
    }

    /// The credentials in `dir`, making the directory (0700) and every missing key (0600).
    /// Keys already there are kept: processes holding them stay valid.
    pub fn ensure(dir: impl Into<PathBuf>) -> Result<Credentials> {
        let dir = dir.into();
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        // A directory made earlier by something else: tighten it.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
        let credentials = Credentials { dir };
        let mut files: Vec<(String, fn() -> KeyPair)> = Service::ALL
            .iter()
            .map(|s| (file_name(*s), KeyPair::new_user as fn() -> KeyPair))
            .collect();
        files.push((CALLOUT_FILE.to_owned(), KeyPair::new_account));
        for (name, make) in files {
            let path = credentials.dir.join(&name);
            if path.exists() {
                continue;
            }
            let seed = make().seed().map_err(|e| Error::Key {
                path: path.clone(),
                message: e.to_string(),
            })?;
            write_secret(&path, &seed)?;
        }
        let route = credentials.dir.join(ROUTE_FILE);
        if !route.exists() {
            let secret = rand::distr::Alphanumeric.sample_string(&mut rand::rng(), 40);
            write_secret(&route, &secret)?;
        }
        Ok(credentials)
    }

    /// The secret of cluster routes: a node accepts a route only from a peer that presents
    /// it, so no process that reaches a route port joins the cluster (and bypasses the
    /// clients' authorization) without it.
    pub fn route_secret(&self) -> Result<String> {
        let path = self.dir.join(ROUTE_FILE);
        fs::read_to_string(&path)
            .map(|s| s.trim().to_owned())
            .map_err(|source| Error::Io { path, source })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The seed a service connects with.
    pub fn seed(&self, service: Service) -> Result<String> {
        self.read(&file_name(service)).map(|(seed, _)| seed)
    }

    /// The auth callout's signing key.
    pub fn callout_key(&self) -> Result<KeyPair> {
        self.read(CALLOUT_FILE).map(|(_, key)| key)
    }

    /// The `authorization` block of a nats-server configuration: each service a user by
    /// its public key with its permissions, every other client sent to the auth callout,
    /// whose answers must be signed by the callout key.
    pub fn authorization(&self) -> Result<String> {
        let mut users = String::new();
        let mut auth_users = Vec::new();
        for service in Service::ALL {
            let (_, key) = self.read(&file_name(service))?;
            let public = key.public_key();
            let _ = writeln!(
                users,
                "    {{ nkey: \"{public}\", permissions: {} }}",
                permissions_block(&service.permissions())
            );
            auth_users.push(format!("\"{public}\""));
        }
        let issuer = self.callout_key()?.public_key();
        Ok(format!(
            "authorization {{\n  users: [\n{users}  ]\n  auth_callout {{\n    issuer: \"{issuer}\"\n    auth_users: [ {} ]\n  }}\n}}\n",
            auth_users.join(", ")
        ))
    }

    /// The lines of a node's `cluster` block that make its routes: the authorization a
    /// peer must present (user `route`, the route secret) and a route to each of `peers`
    /// (`host:port`; a node's own address among them is ignored by the node), presenting it.
    pub fn routes(&self, peers: &[String]) -> Result<String> {
        let secret = self.route_secret()?;
        let routes = peers
            .iter()
            .map(|peer| format!("\"nats://{ROUTE_USER}:{secret}@{peer}\""))
            .collect::<Vec<_>>()
            .join(", ");
        Ok(format!(
            "authorization {{\n  user: \"{ROUTE_USER}\"\n  password: \"{secret}\"\n}}\nroutes: [{routes}]\n"
        ))
    }

    /// Writes [`routes`](Self::routes) to `cluster.conf` in the directory, for a node's
    /// `cluster` block to `include`; returns its path.
    pub fn write_cluster_config(&self, peers: &[String]) -> Result<PathBuf> {
        let path = self.dir.join(CLUSTER_CONF_FILE);
        write_secret(&path, &self.routes(peers)?)?;
        Ok(path)
    }

    /// Writes [`authorization`](Self::authorization) to `auth.conf` in the directory, for a
    /// nats-server configuration to `include`; returns its path.
    pub fn write_server_config(&self) -> Result<PathBuf> {
        let path = self.dir.join(AUTH_CONF_FILE);
        write_secret(&path, &self.authorization()?)?;
        Ok(path)
    }

    fn read(&self, name: &str) -> Result<(String, KeyPair)> {
        let path = self.dir.join(name);
        let seed = fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let seed = seed.trim().to_owned();
        let key = KeyPair::from_seed(&seed).map_err(|e| Error::Key {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Ok((seed, key))
    }
}

/// `<service>.nk`.
pub fn file_name(service: Service) -> String {
    format!("{}.nk", service.name())
}

/// Writes a file only its owner can read (0600), replacing it whole.
pub(crate) fn write_secret(path: &Path, text: &str) -> Result<()> {
    write_file(path, text, 0o600)
}

/// Writes a file anyone may read (a certificate), replacing it whole.
pub(crate) fn write_public(path: &Path, text: &str) -> Result<()> {
    write_file(path, text, 0o644)
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let temp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temp)
        .map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&temp, path).map_err(io)
}

/// `{ publish: { allow: [...] }, subscribe: { allow: [...] }, allow_responses: true }`.
fn permissions_block(p: &Permissions) -> String {
    let list = |subjects: &[String]| {
        subjects
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut block = format!(
        "{{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [{}] }}",
        list(&p.publish),
        list(&p.subscribe)
    );
    if p.responses {
        block.push_str(", allow_responses: true");
    }
    block.push_str(" }");
    block
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn credentials_are_made_once_and_readable_by_their_owner_only() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("credentials");
        let credentials = Credentials::ensure(&dir).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        for service in Service::ALL {
            let path = dir.join(file_name(service));
            assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
            assert!(credentials.seed(service).unwrap().starts_with("SU"));
        }
        assert!(
            credentials
                .callout_key()
                .unwrap()
                .public_key()
                .starts_with('A')
        );
        let worker = credentials.seed(Service::Worker).unwrap();
        let again = Credentials::ensure(&dir).unwrap();
        assert_eq!(again.seed(Service::Worker).unwrap(), worker, "kept");
        let conf = again.authorization().unwrap();
        assert!(!conf.contains(&worker), "a seed in the server config");
        assert!(conf.contains("auth_callout"));
        let route = again.route_secret().unwrap();
        assert_eq!(route.len(), 40);
        assert_eq!(
            fs::metadata(dir.join(ROUTE_FILE)).unwrap().mode() & 0o777,
            0o600
        );
    }
}
