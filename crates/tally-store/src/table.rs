//! The lake's tables: Delta Lake tables (written with delta-rs) on local disk or on
//! S3-compatible object storage.
//!
//! A table is a directory (a key prefix) of Parquet files and its `_delta_log`: the log's
//! commits say which files are part of the table at each version, so any engine that
//! reads Delta (DuckDB, polars, Spark, delta-rs) sees exactly the files Tally committed,
//! never a file being written or one a compaction replaced.
//!
//! **Exactly once through the log.** A flush commits its files together with a
//! transaction action per partition (`txn`: app id `p<partition>`, version: the last
//! stream sequence the flush accounts for). Before it commits, the writer checks under
//! the table's lock that the partition's version in the newest snapshot is the one its
//! flush follows ([`Expect`]); delta-rs's conflict checker refuses a commit if another
//! process committed the same app id since that snapshot. So a flush lands whole or not
//! at all, a retried flush never lands twice, and a worker that lost its partition cannot
//! commit over its successor: the successor's first commit moved the version.
//!
//! **Storage.** [`Storage`] is an `object_store` rooted at the lake: the local filesystem
//! (each put fsynced with its directory, so a commit is durable before it is answered), or
//! an S3-compatible bucket with conditional puts (`If-None-Match: *`), which Delta's
//! commits need.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use bytes::Bytes;
use deltalake::kernel::engine::arrow_conversion::TryFromArrow;
use deltalake::kernel::transaction::{CommitData, TransactionError};
use deltalake::kernel::{Action, Add, DataType, Remove, StructField, StructType, Transaction};
use deltalake::logstore::{
    CommitOrBytes, LogStore, LogStoreFactory, LogStoreRef, StorageConfig, default_logstore,
    logstore_factories, logstore_with,
};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::table::state::DeltaTableState;
use deltalake::{DeltaTableError, TableProperty};
use futures::stream::BoxStream;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use serde::{Deserialize, Serialize};
use tally_core::Fence;
use url::Url;

use crate::{Error, Result};

/// How often a table's log is checkpointed: every this many commits, a Parquet checkpoint
/// of the table's state, so a reader replays at most this many JSON commits.
pub const CHECKPOINT_INTERVAL: u32 = 100;

/// An S3-compatible bucket holding the lake under `prefix`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Location {
    pub bucket: String,
    /// The key prefix of the lake in the bucket ("" for the bucket's root).
    #[serde(default)]
    pub prefix: String,
    /// The service's URL (`http://127.0.0.1:9000`); AWS's own when unset.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

impl fmt::Debug for S3Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Location")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// Where the lake is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    S3(S3Location),
}

/// The lake's storage: an object store rooted at the storage's root and the lake's URL.
#[derive(Clone)]
pub struct Storage {
    /// The lake's root, ending in `/`: `file:///…/lake/` or `s3://bucket/prefix/`.
    url: Url,
    /// The store of the whole filesystem or bucket (Delta's log store wants the root).
    root: Arc<dyn ObjectStore>,
    /// The lake's key prefix in `root`.
    prefix: Path,
    location: Location,
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Storage({})", self.url)
    }
}

impl Storage {
    pub fn open(location: &Location) -> Result<Self> {
        match location {
            Location::Local(dir) => Self::local(dir),
            Location::S3(s3) => Self::s3(s3),
        }
    }

    /// The lake in `dir` on the local filesystem (created if missing).
    pub fn local(dir: &FsPath) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(crate::io_err(dir))?;
        let dir = std::path::absolute(dir).map_err(crate::io_err(dir))?;
        let mut url = Url::from_directory_path(&dir)
            .map_err(|()| Error::Storage(format!("{} is not an absolute path", dir.display())))?;
        if !url.path().ends_with('/') {
            url.set_path(&format!("{}/", url.path()));
        }
        let prefix = Path::from_absolute_path(&dir).map_err(store_err)?;
        Ok(Self {
            url,
            root: Arc::new(DurableLocal(LocalFileSystem::new())),
            prefix,
            location: Location::Local(dir),
        })
    }

    /// The lake in an S3-compatible bucket, written with conditional puts.
    pub fn s3(s3: &S3Location) -> Result<Self> {
        register_s3_log_store();
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&s3.bucket)
            .with_region(&s3.region)
            .with_access_key_id(&s3.access_key_id)
            .with_secret_access_key(&s3.secret_access_key)
            .with_conditional_put(S3ConditionalPut::ETagMatch);
        if let Some(endpoint) = &s3.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        let store = builder.build().map_err(store_err)?;
        let prefix = s3.prefix.trim_matches('/');
        let url = Url::parse(&format!("s3://{}/{}", s3.bucket, prefix))
            .map_err(|e| Error::Storage(format!("s3://{}/{prefix}: {e}", s3.bucket)))?;
        let url = if url.path().ends_with('/') {
            url
        } else {
            Url::parse(&format!("{url}/")).map_err(|e| Error::Storage(e.to_string()))?
        };
        Ok(Self {
            url,
            root: Arc::new(store),
            prefix: Path::from(prefix),
            location: Location::S3(s3.clone()),
        })
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// The lake's root URL, ending in `/`.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The store rooted at the filesystem's or bucket's root.
    pub fn root_store(&self) -> Arc<dyn ObjectStore> {
        self.root.clone()
    }

    /// The key of `relative` (`events/date=…/p…parquet`) under the lake.
    pub fn key(&self, relative: &str) -> Path {
        relative
            .split('/')
            .filter(|p| !p.is_empty())
            .fold(self.prefix.clone(), |path, part| path.join(part))
    }

    /// A table's URL (`<lake>/<table>/`).
    pub fn table_url(&self, table: &str) -> Result<Url> {
        self.url
            .join(&format!("{table}/"))
            .map_err(|e| Error::Storage(format!("{}{table}/: {e}", self.url)))
    }

    pub async fn get(&self, relative: &str) -> Result<Bytes> {
        let key = self.key(relative);
        let got = self.root.get(&key).await.map_err(store_err)?;
        got.bytes().await.map_err(store_err)
    }

    /// The object at `relative`, or `None` where there is none.
    pub async fn get_if_exists(&self, relative: &str) -> Result<Option<Bytes>> {
        match self.root.get(&self.key(relative)).await {
            Ok(got) => Ok(Some(got.bytes().await.map_err(store_err)?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err(e)),
        }
    }

    /// The Parquet metadata of the file at `relative`, read from its end alone (one
    /// ranged read; two when the metadata is longer than the first guess).
    pub async fn footer(&self, relative: &str) -> Result<parquet::file::metadata::ParquetMetaData> {
        use parquet::file::metadata::{FooterTail, ParquetMetaDataReader};
        const GUESS: u64 = 64 * 1024;
        let key = self.key(relative);
        let size = self.root.head(&key).await.map_err(store_err)?.size;
        let bad = || Error::Storage(format!("{relative}: not a Parquet file"));
        let start = size.saturating_sub(GUESS);
        let mut tail = self
            .root
            .get_range(&key, start..size)
            .await
            .map_err(store_err)?;
        let at = tail.len().checked_sub(8).ok_or_else(bad)?;
        let footer = FooterTail::try_from(&tail[at..])?;
        let length = u64::try_from(footer.metadata_length()).unwrap_or(u64::MAX);
        let from = size.checked_sub(8 + length).ok_or_else(bad)?;
        if from < start {
            tail = self
                .root
                .get_range(&key, from..size)
                .await
                .map_err(store_err)?;
        } else {
            tail = tail.slice(usize::try_from(from - start).unwrap_or(0)..);
        }
        let metadata = tail.slice(..tail.len() - 8);
        Ok(ParquetMetaDataReader::decode_metadata(&metadata)?)
    }

    /// Writes `bytes` as `relative`, durably, failing if it exists.
    pub async fn create(&self, relative: &str, bytes: Bytes) -> Result<()> {
        let options = PutOptions {
            mode: object_store::PutMode::Create,
            ..PutOptions::default()
        };
        self.root
            .put_opts(&self.key(relative), bytes.into(), options)
            .await
            .map_err(store_err)?;
        Ok(())
    }

    /// Writes `bytes` as `relative`, durably, replacing what was there.
    pub async fn put(&self, relative: &str, bytes: Bytes) -> Result<()> {
        self.root
            .put(&self.key(relative), bytes.into())
            .await
            .map_err(store_err)?;
        Ok(())
    }

    pub async fn delete(&self, relative: &str) -> Result<()> {
        match self.root.delete(&self.key(relative)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err(e)),
        }
    }

    /// The store's clock now, read as the modification time of an object written for it
    /// (`_tally/clock`). Objects carry the store's times, not the writer's: comparing them
    /// with the store's own now keeps a host whose clock is apart from the store's (or a
    /// moved one) from taking a fresh upload for an old one.
    pub async fn clock(&self) -> Result<std::time::SystemTime> {
        let key = self.key(CLOCK);
        self.root
            .put(&key, Bytes::new().into())
            .await
            .map_err(store_err)?;
        let meta = self.root.head(&key).await.map_err(store_err)?;
        Ok(meta.last_modified.into())
    }

    /// Every object under `relative`, with its path relative to the lake.
    pub async fn list(&self, relative: &str) -> Result<Vec<(String, ObjectMeta)>> {
        use futures::TryStreamExt;
        let prefix = self.key(relative);
        let objects: Vec<ObjectMeta> = self
            .root
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(store_err)?;
        Ok(objects
            .into_iter()
            .filter_map(|o| {
                let parts: Vec<String> = o
                    .location
                    .prefix_match(&self.prefix)?
                    .map(|p| p.as_ref().to_owned())
                    .collect();
                Some((parts.join("/"), o))
            })
            .collect())
    }
}

/// The object [`Storage::clock`] writes, outside every table.
const CLOCK: &str = "_tally/clock";

pub(crate) fn store_err(e: impl fmt::Display) -> Error {
    Error::Storage(e.to_string())
}

fn delta_err(e: impl fmt::Display) -> Error {
    Error::Table(e.to_string())
}

/// Delta's default log store (commits by put-if-absent) for `s3://` tables: the bucket's
/// conditional puts make it safe without a lock service.
fn register_s3_log_store() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        #[derive(Debug)]
        struct ConditionalPut;
        impl LogStoreFactory for ConditionalPut {
            fn with_options(
                &self,
                prefixed: Arc<dyn ObjectStore>,
                root: Arc<dyn ObjectStore>,
                location: &Url,
                options: &StorageConfig,
            ) -> deltalake::DeltaResult<Arc<dyn LogStore>> {
                Ok(default_logstore(prefixed, root, location, options))
            }
        }
        if let Ok(scheme) = Url::parse("s3://") {
            logstore_factories().insert(scheme, Arc::new(ConditionalPut));
        }
    });
}

/// Runs the storage and log work of a blocking [`Lake`](crate::Lake) method on the lake's
/// I/O runtime. Called where a runtime is driving the thread (a caller in async code that
/// did not move the call to a blocking thread), it blocks on a thread of its own.
pub(crate) fn block_on<F>(future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tally-lake-io")
            .enable_all()
            .build()
            .expect("the lake's I/O runtime starts")
    });
    if tokio::runtime::Handle::try_current().is_err() {
        return runtime.block_on(future);
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| runtime.block_on(future))
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// What a flush's commit expects of a partition's version in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    pub partition: u16,
    /// The last sequence committed before this flush (0: none).
    pub after_seq: u64,
}

/// The transaction app id of a partition.
pub fn app_id(partition: u16) -> String {
    format!("p{partition:03}")
}

/// A file of a table's current snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableFile {
    /// Relative to the table's root: `date=2026-11-01/p003-…parquet`.
    pub path: String,
    /// The partition value (`date` or `month`).
    pub value: String,
    pub size: u64,
    pub modified_ms: i64,
    /// Its rows, where the log's statistics say (`numRecords`).
    pub rows: Option<u64>,
    /// The columns the log's statistics count nulls of (`nullCount`), which the file so
    /// has; empty where the statistics do not say. Files written alike share one list.
    pub columns: Arc<[String]>,
}

impl TableFile {
    /// The last part of its path: `p003-…parquet`.
    pub fn file_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }

    fn of_add(add: &Add, partition_by: &str) -> Self {
        TableFile {
            path: decoded(&add.path),
            value: add
                .partition_values
                .get(partition_by)
                .cloned()
                .flatten()
                .unwrap_or_default(),
            size: u64::try_from(add.size).unwrap_or(0),
            modified_ms: add.modification_time,
            rows: None,
            columns: Arc::from([]),
        }
        .with_stats(add.stats.as_deref())
    }

    /// Its rows and counted columns from an add action's statistics (JSON).
    fn with_stats(mut self, stats: Option<&str>) -> Self {
        #[derive(Deserialize)]
        struct Stats {
            #[serde(rename = "numRecords")]
            num_records: Option<u64>,
            #[serde(rename = "nullCount", default)]
            null_count: serde_json::Map<String, serde_json::Value>,
        }
        if let Some(stats) = stats.and_then(|s| serde_json::from_str::<Stats>(s).ok()) {
            self.rows = stats.num_records;
            self.columns = shared(stats.null_count.into_iter().map(|(k, _)| k).collect());
        }
        self
    }
}

/// One shared copy of each distinct column list: a table's state keeps a list per file,
/// and the files of a table are written alike, so there are few lists and many files.
fn shared(columns: Vec<String>) -> Arc<[String]> {
    static LISTS: std::sync::Mutex<Vec<Arc<[String]>>> = std::sync::Mutex::new(Vec::new());
    let mut lists = LISTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(list) = lists.iter().find(|l| l[..] == columns[..]) {
        return list.clone();
    }
    let list: Arc<[String]> = columns.into();
    lists.push(list.clone());
    list
}

/// One Delta table of the lake.
pub(crate) struct Table {
    pub name: &'static str,
    /// The Delta partition column and its type.
    partition_by: &'static str,
    partition_type: DataType,
    schema: SchemaRef,
    log: LogStoreRef,
    storage: Storage,
    state: tokio::sync::Mutex<Option<State>>,
    /// Commits waiting for the log, written together by the first to get to it.
    waiting: std::sync::Mutex<Vec<Request>>,
}

/// What a table's log says, kept up to date by reading each commit after it once.
///
/// delta-rs rebuilds a snapshot's whole file list on every update and replays the log for
/// every transaction-version lookup, which costs a commit time in proportion to the
/// table's files. A flush commits a few files, so Tally loads a snapshot with delta-rs
/// once and then applies each later commit's `add`, `remove` and `txn` actions itself.
struct State {
    /// The snapshot delta-rs loaded: where transaction versions older than `txns` are read.
    base: DeltaTableState,
    /// The newest commit applied.
    version: u64,
    files: BTreeMap<String, TableFile>,
    /// The transaction versions committed since `base`, and those already looked up in it.
    txns: HashMap<String, i64>,
    /// When the log was last read. A state left unread for long is loaded afresh: the
    /// commits after it may have been removed by the log's cleanup (after a checkpoint,
    /// once older than the log's retention, 30 days by default).
    read_at: Instant,
}

/// A state not read for this long is loaded afresh rather than brought up to date.
const RELOAD_AFTER: Duration = Duration::from_secs(3600);

impl State {
    fn apply(
        &mut self,
        version: u64,
        actions: impl IntoIterator<Item = Result<Action>>,
        partition_by: &str,
    ) -> Result<()> {
        for action in actions {
            match action? {
                Action::Add(add) => {
                    let file = TableFile::of_add(&add, partition_by);
                    self.files.insert(file.path.clone(), file);
                }
                Action::Remove(remove) => {
                    self.files.remove(&decoded(&remove.path));
                }
                Action::Txn(txn) => {
                    self.txns.insert(txn.app_id, txn.version);
                }
                _ => {}
            }
        }
        self.version = version;
        self.read_at = Instant::now();
        Ok(())
    }
}

/// The actions of a commit file that a [`State`] follows (`add`, `remove`, `txn`); the
/// others (commit info, metadata, protocol, and kinds delta-rs does not know) are passed
/// over.
fn followed_actions(bytes: &[u8]) -> impl Iterator<Item = Result<Action>> + '_ {
    bytes
        .split(|&b| b == b'\n')
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .filter_map(|line| {
            let value: serde_json::Value = match serde_json::from_slice(line) {
                Ok(v) => v,
                Err(e) => return Some(Err(Error::Table(format!("a commit line: {e}")))),
            };
            let object = value.as_object()?;
            if !["add", "remove", "txn"]
                .iter()
                .any(|k| object.contains_key(*k))
            {
                return None;
            }
            Some(
                serde_json::from_value::<Action>(value)
                    .map_err(|e| Error::Table(format!("a commit action: {e}"))),
            )
        })
}

/// A path of the log, as a path of the table (the log keeps them as URI references).
fn decoded(path: &str) -> String {
    percent_encoding::percent_decode_str(path)
        .decode_utf8_lossy()
        .into_owned()
}

/// A commit waiting for the table's log ([`Table::commit`]).
struct Request {
    actions: Vec<Action>,
    /// Whether every action adds a file: such commits are written together.
    appends: bool,
    txns: Vec<(u16, u64)>,
    expect: Vec<Expect>,
    fence: Option<(Fence, u16)>,
    operation: DeltaOperation,
    done: tokio::sync::oneshot::Sender<Result<u64>>,
}

/// Answers every request of a group that could not be written with `error` (the first
/// with `error` itself, the others with its message).
fn answer_all(group: Vec<Request>, error: Error) {
    let message = error.to_string();
    let mut error = Some(error);
    for request in group {
        let e = error
            .take()
            .unwrap_or_else(|| Error::Table(format!("commit: {message}")));
        let _ = request.done.send(Err(e));
    }
}

impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Table({})", self.name)
    }
}

impl Table {
    pub fn new(
        storage: &Storage,
        name: &'static str,
        schema: SchemaRef,
        partition_by: &'static str,
        partition_type: DataType,
    ) -> Result<Self> {
        let url = storage.table_url(name)?;
        let log = logstore_with(storage.root_store(), &url, StorageConfig::default())
            .map_err(delta_err)?;
        Ok(Self {
            name,
            partition_by,
            partition_type,
            schema,
            log,
            storage: storage.clone(),
            state: tokio::sync::Mutex::new(None),
            waiting: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The newest state of the table (created if it does not exist yet): the state kept
    /// from the last call with the commits since applied, or, the first time, a snapshot
    /// loaded from the log.
    async fn refreshed<'a>(&self, state: &'a mut Option<State>) -> Result<&'a mut State> {
        let current = match state.take() {
            Some(s) if s.read_at.elapsed() < RELOAD_AFTER => self.advanced(s).await?,
            _ => self.load_or_create().await?,
        };
        Ok(state.insert(current))
    }

    /// `state` with every commit after it applied.
    async fn advanced(&self, mut state: State) -> Result<State> {
        loop {
            let next = state.version + 1;
            match self.log.read_commit_entry(next).await.map_err(delta_err)? {
                Some(bytes) => state.apply(next, followed_actions(&bytes), self.partition_by)?,
                None => {
                    state.read_at = Instant::now();
                    return Ok(state);
                }
            }
        }
    }

    async fn load_or_create(&self) -> Result<State> {
        for _ in 0..3 {
            if self
                .log
                .is_delta_table_location()
                .await
                .map_err(delta_err)?
            {
                let base = DeltaTableState::try_new(self.log.as_ref(), None)
                    .await
                    .map_err(delta_err)?;
                let files = self
                    .listed(&base)
                    .into_iter()
                    .map(|f| (f.path.clone(), f))
                    .collect();
                return Ok(State {
                    version: base.version(),
                    base,
                    files,
                    txns: HashMap::new(),
                    read_at: Instant::now(),
                });
            }
            match self.create().await {
                Ok(()) => {}
                // Another process created it first.
                Err(DeltaTableError::Transaction {
                    source: TransactionError::VersionAlreadyExists(_),
                }) => {}
                Err(e) => return Err(delta_err(e)),
            }
        }
        Err(Error::Table(format!("{}: could not be created", self.name)))
    }

    async fn create(&self) -> Result<(), DeltaTableError> {
        let columns = StructType::try_from_arrow(self.schema.as_ref())?;
        let mut fields: Vec<StructField> = columns.fields().cloned().collect();
        fields.push(StructField::new(
            self.partition_by,
            self.partition_type.clone(),
            true,
        ));
        deltalake::operations::create::CreateBuilder::new()
            .with_log_store(self.log.clone())
            .with_table_name(self.name)
            .with_columns(fields)
            .with_partition_columns([self.partition_by])
            .with_save_mode(SaveMode::Ignore)
            .with_configuration_property(
                TableProperty::CheckpointInterval,
                Some(CHECKPOINT_INTERVAL.to_string()),
            )
            .await?;
        Ok(())
    }

    /// The files of the newest snapshot.
    pub async fn files(&self) -> Result<Vec<TableFile>> {
        let mut state = self.state.lock().await;
        let state = self.refreshed(&mut state).await?;
        Ok(state.files.values().cloned().collect())
    }

    fn listed(&self, snapshot: &DeltaTableState) -> Vec<TableFile> {
        snapshot
            .log_data()
            .iter()
            .map(|f| {
                TableFile {
                    path: f.path().into_owned(),
                    value: f
                        .partition_values_map()
                        .get(self.partition_by)
                        .cloned()
                        .flatten()
                        .unwrap_or_default(),
                    size: u64::try_from(f.size()).unwrap_or(0),
                    modified_ms: f.modification_time(),
                    rows: None,
                    columns: Arc::from([]),
                }
                .with_stats(f.stats().as_deref())
            })
            .collect()
    }

    /// The paths of the newest snapshot's files, and of its tombstones (files removed
    /// from it) with the time each was removed, in milliseconds. Read from a snapshot
    /// loaded for the purpose (a vacuum's, now and then).
    pub async fn files_and_tombstones(&self) -> Result<(HashSet<String>, HashMap<String, i64>)> {
        use futures::TryStreamExt;
        // Creates the table if need be.
        self.refreshed(&mut *self.state.lock().await).await?;
        let snapshot = DeltaTableState::try_new(self.log.as_ref(), None)
            .await
            .map_err(delta_err)?;
        let live = self.listed(&snapshot).into_iter().map(|f| f.path).collect();
        let tombstones: Vec<(String, i64)> = snapshot
            .all_tombstones(self.log.as_ref())
            .map_ok(|t| (t.path().into_owned(), t.deletion_timestamp().unwrap_or(0)))
            .try_collect()
            .await
            .map_err(delta_err)?;
        Ok((live, tombstones.into_iter().collect()))
    }

    /// The last sequence committed for `partition` (0: none).
    pub async fn version_of(&self, partition: u16) -> Result<u64> {
        let mut state = self.state.lock().await;
        let state = self.refreshed(&mut state).await?;
        self.txn_version(state, partition).await
    }

    async fn txn_version(&self, state: &mut State, partition: u16) -> Result<u64> {
        let app = app_id(partition);
        let version = match state.txns.get(&app) {
            Some(&v) => v,
            None => {
                let v = state
                    .base
                    .transaction_version(self.log.as_ref(), app.clone())
                    .await
                    .map_err(delta_err)?
                    .unwrap_or(0);
                state.txns.insert(app, v);
                v
            }
        };
        Ok(u64::try_from(version).unwrap_or(0))
    }

    /// An add action for a file written at `path` (relative to the table's root).
    pub fn add(&self, path: String, value: &str, size: u64, stats: Option<String>) -> Action {
        Action::Add(Add {
            path,
            partition_values: HashMap::from([(
                self.partition_by.to_owned(),
                Some(value.to_owned()),
            )]),
            size: i64::try_from(size).unwrap_or(i64::MAX),
            modification_time: chrono::Utc::now().timestamp_millis(),
            data_change: true,
            stats,
            tags: None,
            deletion_vector: None,
            base_row_id: None,
            default_row_commit_version: None,
            clustering_provider: None,
        })
    }

    /// A remove action for a file of the snapshot that a compaction replaced (its rows are
    /// in the file added in the same commit), dated `now`: the clock the file's retention
    /// is measured on.
    pub fn remove(&self, file: &TableFile, now: std::time::SystemTime) -> Action {
        let now_ms = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Action::Remove(Remove {
            path: file.path.clone(),
            data_change: false,
            deletion_timestamp: Some(now_ms),
            extended_file_metadata: Some(true),
            partition_values: Some(HashMap::from([(
                self.partition_by.to_owned(),
                Some(file.value.clone()),
            )])),
            size: Some(i64::try_from(file.size).unwrap_or(i64::MAX)),
            tags: None,
            deletion_vector: None,
            base_row_id: None,
            default_row_commit_version: None,
        })
    }

    /// Commits `actions` with a transaction action per `(partition, version)` of `txns`,
    /// once each of `expect` holds in the newest snapshot, each file `actions` removes is
    /// still in it, and `fence` (if any) still holds. Returns the table version committed.
    ///
    /// The commit is written as the log's next version only if no other has been
    /// (put-if-absent); when another writer took that version, its commit is read and the
    /// conditions are checked again before the next one is tried.
    ///
    /// **Group commit.** Appends (commits that only add files) waiting for the log are
    /// written together, as one version, by whichever of them gets to the log first: each
    /// keeps its own conditions, checked in the order they came (a partition's next flush
    /// may follow its previous one in the same version), and its own answer; the version
    /// carries one transaction action per partition, its newest. Sixteen partitions that
    /// flush at once cost one commit, not sixteen in a row.
    pub async fn commit(
        &self,
        actions: Vec<Action>,
        txns: &[(u16, u64)],
        expect: &[Expect],
        fence: Option<(&Fence, u16)>,
        operation: DeltaOperation,
    ) -> Result<u64> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let request = Request {
            appends: actions.iter().all(|a| matches!(a, Action::Add(_))),
            actions,
            txns: txns.to_vec(),
            expect: expect.to_vec(),
            fence: fence.map(|(f, p)| (f.clone(), p)),
            operation,
            done,
        };
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(request);
        {
            let mut state = self.state.lock().await;
            // Every request waiting now, this one too unless a commit before took it.
            let waiting = std::mem::take(
                &mut *self
                    .waiting
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            let mut waiting = waiting.into_iter().peekable();
            while let Some(first) = waiting.next() {
                let mut group = vec![first];
                while group[0].appends
                    && waiting.peek().is_some_and(|r| {
                        r.appends && r.operation.name() == group[0].operation.name()
                    })
                {
                    group.extend(waiting.next());
                }
                self.commit_group(&mut state, group).await;
            }
        }
        answer
            .await
            .map_err(|_| Error::Table("a commit was abandoned before it was answered".into()))?
    }

    /// Writes `group` as the log's next version and answers each of its requests: those
    /// whose conditions fail with their error, the others with the version.
    async fn commit_group(&self, state: &mut Option<State>, mut group: Vec<Request>) {
        loop {
            let current = match self.refreshed(state).await {
                Ok(current) => current,
                Err(e) => return answer_all(group, e),
            };
            // Conditions checked in order, each against the snapshot with the group's
            // requests before it applied.
            let mut accepted: Vec<Request> = Vec::with_capacity(group.len());
            let mut versions: BTreeMap<u16, u64> = BTreeMap::new();
            let mut removed: HashSet<String> = HashSet::new();
            for request in group {
                match self.check(current, &request, &versions, &removed).await {
                    Ok(()) => {
                        versions.extend(request.txns.iter().copied());
                        removed.extend(request.actions.iter().filter_map(|a| match a {
                            Action::Remove(r) => Some(decoded(&r.path)),
                            _ => None,
                        }));
                        accepted.push(request);
                    }
                    Err(e) => {
                        let _ = request.done.send(Err(e));
                    }
                }
            }
            let Some(first) = accepted.first() else {
                return;
            };
            let transactions = versions
                .iter()
                .map(|(&p, &v)| {
                    Transaction::new_with_last_update(
                        app_id(p),
                        i64::try_from(v).unwrap_or(i64::MAX),
                        Some(chrono::Utc::now().timestamp_millis()),
                    )
                })
                .collect();
            let actions: Vec<Action> = accepted
                .iter()
                .flat_map(|r| r.actions.iter().cloned())
                .collect();
            let commit = CommitData::new(
                actions,
                first.operation.clone(),
                HashMap::new(),
                transactions,
            );
            let bytes = match commit.get_bytes() {
                Ok(bytes) => bytes,
                Err(e) => return answer_all(accepted, delta_err(e)),
            };
            let version = current.version + 1;
            let written = self
                .log
                .write_commit_entry(
                    version,
                    CommitOrBytes::LogBytes(bytes),
                    uuid::Uuid::new_v4(),
                )
                .await;
            match written {
                Ok(()) => {
                    let applied = current.apply(
                        version,
                        commit.actions.iter().cloned().map(Ok),
                        self.partition_by,
                    );
                    if let Err(e) = applied {
                        // Committed, but the state kept here is not to be trusted: read
                        // the log afresh next time.
                        *state = None;
                        tracing::warn!(table = self.name, version, error = %e, "state reloaded");
                    }
                    if version % u64::from(CHECKPOINT_INTERVAL) == 0 {
                        self.checkpoint(version);
                    }
                    for request in accepted {
                        let _ = request.done.send(Ok(version));
                    }
                    return;
                }
                // Another writer's commit took the version: read it, check again.
                Err(TransactionError::VersionAlreadyExists(_)) => group = accepted,
                Err(e) => return answer_all(accepted, delta_err(e)),
            }
        }
    }

    /// Whether `request` may be committed on `current` after the requests of its group
    /// before it, which set the partitions' `versions` and removed the files `removed`.
    async fn check(
        &self,
        current: &mut State,
        request: &Request,
        versions: &BTreeMap<u16, u64>,
        removed: &HashSet<String>,
    ) -> Result<()> {
        for e in &request.expect {
            let found = match versions.get(&e.partition) {
                Some(&v) => v,
                None => self.txn_version(current, e.partition).await?,
            };
            if found != e.after_seq {
                return Err(Error::Unexpected {
                    table: self.name,
                    partition: e.partition,
                    expected: e.after_seq,
                    found,
                });
            }
        }
        for action in &request.actions {
            if let Action::Remove(r) = action {
                let path = decoded(&r.path);
                if !current.files.contains_key(&path) || removed.contains(&path) {
                    return Err(Error::Conflict {
                        table: self.name,
                        reason: format!("{} was removed by another commit", r.path),
                    });
                }
            }
        }
        if let Some((fence, partition)) = &request.fence
            && !fence.holds()
        {
            return Err(Error::Fenced(*partition));
        }
        Ok(())
    }

    /// Writes a checkpoint of `version` and removes the log files it makes unneeded that
    /// are past the log's retention, in the background: a checkpoint reads the whole
    /// table, which a commit does not wait for. A checkpoint that fails (the process ends,
    /// the store is away) is only a longer log to replay until the next one.
    ///
    /// The retention is measured on the store's clock, which dated the log's files, not
    /// on this host's: a host clock ahead of the store's would otherwise remove commits a
    /// reader that has not seen the checkpoint yet still reads.
    fn checkpoint(&self, version: u64) {
        let log = self.log.clone();
        let storage = self.storage.clone();
        let name = self.name;
        tokio::spawn(async move {
            use deltalake::table::config::TablePropertiesExt;
            let mut table = deltalake::DeltaTable::new(log.clone());
            let done = async {
                table.load_version(version).await.map_err(delta_err)?;
                deltalake::checkpoints::create_checkpoint(&table, None)
                    .await
                    .map_err(delta_err)?;
                let retention = table
                    .snapshot()
                    .map_err(delta_err)?
                    .table_config()
                    .log_retention_duration();
                let now = storage.clock().await?;
                let cutoff = now
                    .checked_sub(retention)
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0));
                deltalake::checkpoints::cleanup_expired_logs_for(
                    version,
                    log.as_ref(),
                    cutoff,
                    None,
                )
                .await
                .map_err(delta_err)
            };
            if let Err(e) = done.await {
                tracing::warn!(table = name, version, error = %e, "no checkpoint");
            }
        });
    }
}

/// The operation a compaction is recorded as in the log.
pub(crate) fn optimize() -> DeltaOperation {
    DeltaOperation::Optimize {
        predicate: None,
        target_size: 0,
    }
}

/// The operation a streaming append is recorded as in the log.
pub(crate) fn append() -> DeltaOperation {
    DeltaOperation::Write {
        mode: SaveMode::Append,
        partition_by: None,
        predicate: None,
    }
}

/// The local filesystem with every put made durable before it is answered: the file and
/// its directory fsynced (object_store's own local store does neither).
#[derive(Debug)]
struct DurableLocal(LocalFileSystem);

impl fmt::Display for DurableLocal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DurableLocal({})", self.0)
    }
}

impl DurableLocal {
    async fn sync(&self, location: &Path) -> object_store::Result<()> {
        let path = self.0.path_to_filesystem(location)?;
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::File::open(&path)?.sync_all()?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(|e| object_store::Error::Generic {
            store: "DurableLocal",
            source: Box::new(e),
        })?
        .map_err(|e| object_store::Error::Generic {
            store: "DurableLocal",
            source: Box::new(e),
        })
    }
}

#[async_trait]
impl ObjectStore for DurableLocal {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let put = self.0.put_opts(location, payload, opts).await?;
        self.sync(location).await?;
        Ok(put)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.0.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.0.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.0.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.0.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.0.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.0.copy_opts(from, to, options).await?;
        self.sync(to).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Lake;

    /// Appends that wait for the log together land as one version, each checked on its
    /// own: a partition's next flush after its previous one, a fenced flush and one that
    /// follows the wrong version refused, the rest committed.
    #[test]
    fn appends_waiting_together_are_one_version_each_answered_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let table = &lake.tables.events;
        let (open, revoked) = (Fence::open(), Fence::open());
        revoked.revoke();
        let add = |name: &str| {
            vec![table.add(
                format!("date=2026-12-01/{name}.parquet"),
                "2026-12-01",
                1,
                None,
            )]
        };
        let expects = [(1, 0), (1, 10), (2, 0), (3, 5), (4, 0)].map(|(partition, after_seq)| {
            [Expect {
                partition,
                after_seq,
            }]
        });
        let (answers, start) = block_on(async {
            assert_eq!(table.version_of(1).await.unwrap(), 0);
            let held = table.state.lock().await;
            let start = held.as_ref().unwrap().version;
            let commits = vec![
                table.commit(
                    add("a"),
                    &[(1, 10)],
                    &expects[0],
                    Some((&open, 1)),
                    append(),
                ),
                table.commit(
                    add("b"),
                    &[(1, 20)],
                    &expects[1],
                    Some((&open, 1)),
                    append(),
                ),
                table.commit(
                    add("c"),
                    &[(2, 10)],
                    &expects[2],
                    Some((&revoked, 2)),
                    append(),
                ),
                table.commit(
                    add("d"),
                    &[(3, 10)],
                    &expects[3],
                    Some((&open, 3)),
                    append(),
                ),
                table.commit(
                    add("e"),
                    &[(4, 10)],
                    &expects[4],
                    Some((&open, 4)),
                    append(),
                ),
            ];
            // Every commit waits for the log while this holds it; then it is let go.
            let release = async move {
                while table.waiting.lock().unwrap().len() < 5 {
                    tokio::task::yield_now().await;
                }
                drop(held);
            };
            let (answers, ()) = tokio::join!(futures::future::join_all(commits), release);
            (answers, start)
        });
        let version = start + 1;
        assert_eq!(answers[0].as_ref().unwrap(), &version);
        assert_eq!(answers[1].as_ref().unwrap(), &version);
        assert!(
            matches!(answers[2], Err(Error::Fenced(2))),
            "{:?}",
            answers[2]
        );
        assert!(
            matches!(
                answers[3],
                Err(Error::Unexpected {
                    partition: 3,
                    expected: 5,
                    found: 0,
                    ..
                })
            ),
            "{:?}",
            answers[3]
        );
        assert_eq!(answers[4].as_ref().unwrap(), &version);

        // What the log says, read afresh: one version, one transaction per partition.
        let again = Lake::new(dir.path());
        let events = &again.tables.events;
        let mut files: Vec<String> = block_on(events.files())
            .unwrap()
            .into_iter()
            .map(|f| f.file_name().to_owned())
            .collect();
        files.sort();
        assert_eq!(files, ["a.parquet", "b.parquet", "e.parquet"]);
        assert_eq!(block_on(events.version_of(1)).unwrap(), 20);
        assert_eq!(block_on(events.version_of(2)).unwrap(), 0);
        assert_eq!(block_on(events.version_of(4)).unwrap(), 10);
        let log = dir.path().join("events/_delta_log");
        let newest = format!("{version:020}.json");
        assert!(log.join(&newest).is_file());
        assert!(!log.join(format!("{:020}.json", version + 1)).exists());
        let commit = std::fs::read_to_string(log.join(newest)).unwrap();
        assert_eq!(commit.matches("\"txn\"").count(), 2, "{commit}");
    }
}
