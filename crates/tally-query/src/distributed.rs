//! Distributed queries on Ballista: a scheduler that plans, executors that scan the lake
//! and shuffle between them, and a client session that sends them its plans.
//!
//! A [`Lakehouse`](crate::Lakehouse) opened with [`Engine::Ballista`] plans its queries as
//! a local one does (the same tables, views and named queries) and hands the optimized
//! logical plan to the scheduler; its result streams back from the executors. The
//! scheduler and the executors are Tally's own processes ([`run_scheduler`],
//! [`run_executor`]: `tally ballista scheduler|executor`) because each must see the lake
//! as Tally lists it: through [`LakeStore`], whose listings are the Delta tables'
//! snapshots rather than their directories. The scheduler lists (it makes the physical
//! plan); the executors read the files it listed.
//!
//! Ballista sends plans as DataFusion's protobuf, which has no form for an in-memory
//! table; [`TallyCodec`] adds one (the batches as an Arrow IPC stream per partition), so
//! that the tables Tally builds in memory (`decisions`, the definitions, the merged
//! lines of a closed month) travel with the plan.

use std::fmt;
use std::io::Cursor;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use ballista_core::extension::{SessionConfigExt, SessionStateExt};
use ballista_core::serde::BallistaLogicalExtensionCodec;
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::start_server;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::TableProvider;
use datafusion::common::TableReference;
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::FileFormatFactory;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::TaskContext;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::{AggregateUDF, Extension, LogicalPlan, ScalarUDF, WindowUDF};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use tally_store::Location;

use crate::store::LakeStore;
use crate::{Error, Result, on_lake};

/// The port a Ballista scheduler listens on unless told otherwise.
pub const DEFAULT_SCHEDULER_PORT: u16 = 50050;

/// Where a [`Lakehouse`](crate::Lakehouse) runs its queries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Engine {
    /// In this process.
    #[default]
    Local,
    /// On the Ballista scheduler at this host and port (`ballista://HOST:PORT`) and its
    /// executors.
    Ballista { host: String, port: u16 },
}

/// An engine that is neither `local` nor `ballista://HOST[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("query engine {given:?}: {reason} (expected `local` or `ballista://HOST:PORT`)")]
pub struct BadEngine {
    pub given: String,
    pub reason: String,
}

impl FromStr for Engine {
    type Err = BadEngine;

    fn from_str(given: &str) -> Result<Engine, BadEngine> {
        let bad = |reason: &str| BadEngine {
            given: given.to_owned(),
            reason: reason.to_owned(),
        };
        if given == "local" {
            return Ok(Engine::Local);
        }
        let url = url::Url::parse(given).map_err(|e| bad(&e.to_string()))?;
        if url.scheme() != "ballista" {
            return Err(bad(&format!("unknown scheme {:?}", url.scheme())));
        }
        if !(url.path().is_empty() || url.path() == "/")
            || url.query().is_some()
            || !url.username().is_empty()
        {
            return Err(bad("only a host and a port may follow ballista://"));
        }
        let host = match url.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(host) => host.to_string(),
            None => return Err(bad("no host")),
        };
        Ok(Engine::Ballista {
            host,
            port: url.port().unwrap_or(DEFAULT_SCHEDULER_PORT),
        })
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Engine::Local => f.write_str("local"),
            Engine::Ballista { host, port } if host.contains(':') => {
                write!(f, "ballista://[{host}]:{port}")
            }
            Engine::Ballista { host, port } => write!(f, "ballista://{host}:{port}"),
        }
    }
}

/// A session whose queries run on the scheduler at `host:port`: `config` and `runtime`
/// as a local session's (the client plans with them; the scheduler gets the settings).
pub(crate) fn remote_context(
    host: &str,
    port: u16,
    config: SessionConfig,
    runtime: Arc<RuntimeEnv>,
) -> Result<SessionContext> {
    let config = config.with_ballista_logical_extension_codec(Arc::new(TallyCodec::default()));
    let state = SessionStateBuilder::new()
        .with_default_features()
        .with_config(config)
        .with_runtime_env(runtime)
        .build();
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let state = state.upgrade_for_ballista(format!("http://{host}:{port}"))?;
    Ok(SessionContext::new_with_state(state))
}

/// Written as its string (`local`, `ballista://HOST:PORT`) in configuration.
impl serde::Serialize for Engine {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Engine {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Engine, D::Error> {
        let given = String::deserialize(deserializer)?;
        given.parse().map_err(serde::de::Error::custom)
    }
}

/// How a scheduler is reached and where it listens.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// The address it binds.
    pub listen: SocketAddr,
    /// The host name executors and clients reach it by (default: `listen`'s address).
    pub external_host: Option<String>,
}

/// Runs a Ballista scheduler over the lake at `location` until the process ends.
pub async fn run_scheduler(location: &Location, options: SchedulerOptions) -> Result<()> {
    let lake = open_lake(location).await?;
    let builder = move |config: SessionConfig| -> DfResult<SessionState> {
        let state = ballista_core::utils::default_session_builder(config)?;
        let runtime = lake_runtime(&lake, RuntimeEnvBuilder::new())?;
        Ok(SessionStateBuilder::new_from_existing(state)
            .with_runtime_env(runtime)
            .build())
    };
    let config = SchedulerConfig {
        bind_host: options.listen.ip().to_string(),
        bind_port: options.listen.port(),
        external_host: options
            .external_host
            .unwrap_or_else(|| options.listen.ip().to_string()),
        override_session_builder: Some(Arc::new(builder)),
        override_logical_codec: Some(Arc::new(TallyCodec::default())),
        ..SchedulerConfig::default()
    };
    let cluster = BallistaCluster::new_from_config(&config)
        .await
        .map_err(ballista)?;
    start_server(cluster, options.listen, Arc::new(config))
        .await
        .map_err(ballista)
}

/// Where an executor listens, its scheduler, and what it may use.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// The scheduler's host and port.
    pub scheduler: (String, u16),
    /// The address it binds for Arrow Flight (results and shuffle data).
    pub listen: SocketAddr,
    /// The port of its gRPC service (tasks from the scheduler), on `listen`'s address.
    pub grpc_port: u16,
    /// The host name the scheduler, the other executors and clients reach it by
    /// (default: `listen`'s address).
    pub external_host: Option<String>,
    /// Its shuffle files and spill files.
    pub work_dir: PathBuf,
    /// Tasks it runs at once (0: one per core).
    pub concurrent_tasks: usize,
    /// Bytes its tasks may hold at once; they spill past it.
    pub memory_limit: u64,
}

/// Runs a Ballista executor over the lake at `location` until the process ends.
pub async fn run_executor(location: &Location, options: ExecutorOptions) -> Result<()> {
    let lake = open_lake(location).await?;
    std::fs::create_dir_all(&options.work_dir).map_err(|source| Error::Io {
        path: options.work_dir.display().to_string(),
        source,
    })?;
    let work_dir = options.work_dir.clone();
    let runtime = move |_: &SessionConfig| -> DfResult<Arc<RuntimeEnv>> {
        lake_runtime(
            &lake,
            RuntimeEnvBuilder::new().with_temp_file_path(work_dir.clone()),
        )
    };
    let config = ExecutorProcessConfig {
        bind_host: options.listen.ip().to_string(),
        port: options.listen.port(),
        grpc_port: options.grpc_port,
        external_host: options.external_host,
        scheduler_host: options.scheduler.0,
        scheduler_port: options.scheduler.1,
        work_dir: Some(options.work_dir.display().to_string()),
        vcores: options.concurrent_tasks,
        memory_pool_size: Some(options.memory_limit),
        override_runtime_producer: Some(Arc::new(runtime)),
        override_logical_codec: Some(Arc::new(TallyCodec::default())),
        ..ExecutorProcessConfig::default()
    };
    start_executor_process(Arc::new(config))
        .await
        .map_err(ballista)
}

/// A runtime from `builder` that reads the lake through its [`LakeStore`] and lists it
/// afresh for every query.
fn lake_runtime(lake: &tally_store::Lake, builder: RuntimeEnvBuilder) -> DfResult<Arc<RuntimeEnv>> {
    let runtime = builder
        .with_cache_manager(
            datafusion::execution::cache::cache_manager::CacheManagerConfig::default()
                .with_list_files_cache_limit(0),
        )
        .build_arc()?;
    runtime.register_object_store(
        crate::store_url(lake)?.as_ref(),
        Arc::new(LakeStore::new(lake.clone())),
    );
    Ok(runtime)
}

async fn open_lake(location: &Location) -> Result<tally_store::Lake> {
    let location = location.clone();
    on_lake(move || tally_store::Lake::open(&location)).await
}

fn ballista(e: ballista_core::error::BallistaError) -> Error {
    Error::DataFusion(DataFusionError::External(Box::new(e)))
}

/// Ballista's codec, and in-memory tables sent whole with the plan.
#[derive(Debug, Default)]
pub struct TallyCodec {
    inner: BallistaLogicalExtensionCodec,
}

/// What starts an in-memory table's encoding (no protobuf message Ballista writes does).
const MEM_TABLE: &[u8] = b"tally.mem\0";

impl TallyCodec {
    fn encode_mem_table(table: &MemTable, buf: &mut Vec<u8>) -> DfResult<()> {
        buf.extend_from_slice(MEM_TABLE);
        buf.extend_from_slice(&(table.batches.len() as u32).to_le_bytes());
        for partition in &table.batches {
            let batches = partition.try_read().map_err(|_| {
                DataFusionError::Internal("an in-memory table is being written".to_owned())
            })?;
            let mut ipc = Vec::new();
            let mut writer = StreamWriter::try_new(&mut ipc, &table.schema())?;
            for batch in batches.iter() {
                writer.write(batch)?;
            }
            writer.finish()?;
            drop(writer);
            buf.extend_from_slice(&(ipc.len() as u64).to_le_bytes());
            buf.extend_from_slice(&ipc);
        }
        Ok(())
    }

    fn decode_mem_table(mut buf: &[u8], schema: SchemaRef) -> DfResult<MemTable> {
        let short =
            || DataFusionError::Internal("an in-memory table's encoding is cut short".into());
        let mut take = |n: usize| -> DfResult<&[u8]> {
            if buf.len() < n {
                return Err(short());
            }
            let (head, rest) = buf.split_at(n);
            buf = rest;
            Ok(head)
        };
        let count = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
        let mut partitions = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let len = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
            let ipc = take(usize::try_from(len).map_err(|_| short())?)?;
            let reader = StreamReader::try_new(Cursor::new(ipc), None)?;
            partitions.push(reader.collect::<Result<Vec<RecordBatch>, _>>()?);
        }
        MemTable::try_new(schema, partitions)
    }
}

impl LogicalExtensionCodec for TallyCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[LogicalPlan],
        ctx: &TaskContext,
    ) -> DfResult<Extension> {
        self.inner.try_decode(buf, inputs, ctx)
    }

    fn try_encode(&self, node: &Extension, buf: &mut Vec<u8>) -> DfResult<()> {
        self.inner.try_encode(node, buf)
    }

    fn try_decode_table_provider(
        &self,
        buf: &[u8],
        table_ref: &TableReference,
        schema: SchemaRef,
        ctx: &TaskContext,
    ) -> DfResult<Arc<dyn TableProvider>> {
        match buf.strip_prefix(MEM_TABLE) {
            Some(table) => Ok(Arc::new(Self::decode_mem_table(table, schema)?)),
            None => self
                .inner
                .try_decode_table_provider(buf, table_ref, schema, ctx),
        }
    }

    fn try_encode_table_provider(
        &self,
        table_ref: &TableReference,
        node: Arc<dyn TableProvider>,
        buf: &mut Vec<u8>,
    ) -> DfResult<()> {
        match node.downcast_ref::<MemTable>() {
            Some(table) => Self::encode_mem_table(table, buf),
            None => self.inner.try_encode_table_provider(table_ref, node, buf),
        }
    }

    fn try_decode_file_format(
        &self,
        buf: &[u8],
        ctx: &TaskContext,
    ) -> DfResult<Arc<dyn FileFormatFactory>> {
        self.inner.try_decode_file_format(buf, ctx)
    }

    fn try_encode_file_format(
        &self,
        buf: &mut Vec<u8>,
        node: Arc<dyn FileFormatFactory>,
    ) -> DfResult<()> {
        self.inner.try_encode_file_format(buf, node)
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> DfResult<Arc<ScalarUDF>> {
        self.inner.try_decode_udf(name, buf)
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> DfResult<()> {
        self.inner.try_encode_udf(node, buf)
    }

    fn try_decode_udaf(&self, name: &str, buf: &[u8]) -> DfResult<Arc<AggregateUDF>> {
        self.inner.try_decode_udaf(name, buf)
    }

    fn try_encode_udaf(&self, node: &AggregateUDF, buf: &mut Vec<u8>) -> DfResult<()> {
        self.inner.try_encode_udaf(node, buf)
    }

    fn try_decode_udwf(&self, name: &str, buf: &[u8]) -> DfResult<Arc<WindowUDF>> {
        self.inner.try_decode_udwf(name, buf)
    }

    fn try_encode_udwf(&self, node: &WindowUDF, buf: &mut Vec<u8>) -> DfResult<()> {
        self.inner.try_encode_udwf(node, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    #[test]
    fn engines_parse_and_print_back() {
        assert_eq!("local".parse::<Engine>(), Ok(Engine::Local));
        let engine: Engine = "ballista://sched.internal:50070".parse().unwrap();
        assert_eq!(
            engine,
            Engine::Ballista {
                host: "sched.internal".into(),
                port: 50070
            }
        );
        assert_eq!(engine.to_string(), "ballista://sched.internal:50070");
        let default_port: Engine = "ballista://127.0.0.1".parse().unwrap();
        assert_eq!(default_port.to_string(), "ballista://127.0.0.1:50050");
        let v6: Engine = "ballista://[::1]:7".parse().unwrap();
        assert_eq!(v6.to_string(), "ballista://[::1]:7");
        for bad in [
            "",
            "remote",
            "http://h:1",
            "ballista://",
            "ballista://h:1/x",
            "df://h",
        ] {
            let e = bad.parse::<Engine>().unwrap_err();
            assert_eq!(e.given, bad);
            assert!(e.to_string().contains("ballista://HOST:PORT"), "{e}");
        }
    }

    #[test]
    fn an_in_memory_table_travels_whole() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("customer", DataType::Utf8, false),
            Field::new("n", DataType::Int64, true),
        ]));
        let batch = |names: &[&str], n: &[Option<i64>]| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from_iter_values(names)),
                    Arc::new(Int64Array::from(n.to_vec())),
                ],
            )
            .unwrap()
        };
        let partitions = vec![
            vec![
                batch(&["a", "b"], &[Some(1), None]),
                batch(&["c"], &[Some(3)]),
            ],
            vec![],
            vec![batch(&["d"], &[Some(-4)])],
        ];
        let table = Arc::new(MemTable::try_new(schema.clone(), partitions.clone()).unwrap());
        let codec = TallyCodec::default();
        let mut buf = Vec::new();
        let name = TableReference::bare("decisions");
        codec
            .try_encode_table_provider(&name, table, &mut buf)
            .unwrap();
        let ctx = SessionContext::new().task_ctx();
        let decoded = codec
            .try_decode_table_provider(&buf, &name, schema.clone(), &ctx)
            .unwrap();
        let decoded = decoded.downcast_ref::<MemTable>().unwrap();
        let got: Vec<Vec<RecordBatch>> = decoded
            .batches
            .iter()
            .map(|p| p.try_read().unwrap().clone())
            .collect();
        assert_eq!(got, partitions);
        // Cut short (in the count, or in the last partition), it is an error rather
        // than a smaller table.
        for len in [MEM_TABLE.len() + 2, buf.len() - 1] {
            let e = codec
                .try_decode_table_provider(&buf[..len], &name, schema.clone(), &ctx)
                .unwrap_err();
            assert!(e.to_string().contains("cut short"), "{e}");
        }
    }
}
