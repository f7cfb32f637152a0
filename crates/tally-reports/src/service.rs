//! The reports as a server answers them: billing, overage and adoption rendered whole,
//! SQL streamed, each off the runtime that serves requests and ingests events.
//!
//! - **Billing, overage, adoption** are computed by this crate's functions from the
//!   definitions the caller passes (the API's own, read through its connection) and
//!   rendered by [`crate::render`], then sent as one chunk: they are small (a line per
//!   customer × plan × feature), and whole they can still fail with a proper status.
//!   They are byte for byte what `tally billing`, `tally overage` and `tally adoption`
//!   print with `--format`.
//! - **SQL** streams: [`tally_query::sql::run`] under this server's memory and time
//!   limits (by default 512 MiB and 60 s, as `tally sql`), each record batch encoded by
//!   [`tally_query::output::write_stream`] as it arrives and handed over a channel of two
//!   chunks; the next batch is asked for only once the previous one's bytes are taken,
//!   so a slow client slows the query rather than filling memory. Nothing is sent before
//!   the first rows, so a query refused or past a limit before them gets its status. At
//!   most [`LakeReports::SQL_QUERIES_AT_ONCE`] queries run at once (the others wait),
//!   which bounds the memory SQL holds. When the client goes away, the query is dropped,
//!   which cancels it.
//!
//! The reports run off the runtime serving requests and ingesting events, so that a
//! query busy computing never holds up a check or an acknowledgement: billing, overage
//! and adoption on a runtime shared by them, each SQL query on a runtime of its own. A
//! query cancelled at its time limit ends only at its operator's next yield, which can be
//! seconds later (a cross join emits many batches without yielding); its runtime is let
//! go without waiting for that, so it delays no other query (it still uses a core until
//! then).

use std::io::Write;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use chrono::NaiveDate;
use datafusion::error::DataFusionError;
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use tally_core::meter::Meter;
use tally_query::meters::{EventFilter, MeterQuery, MeterRow, StoredEvent};
use tally_query::output::{OutputFormat, write_stream};
use tally_query::sql::{self, SqlError};
use tally_query::{Engine, Lakehouse, LakehouseOptions, Period};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::PollSender;

use crate::render::{Format, Report, to_bytes};
use crate::{AdoptionRequest, Definitions, InvoiceRequest};

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The request is malformed; `field` names the parameter.
    #[error("{message}")]
    BadRequest { field: String, message: String },
    /// The query ran past its time limit.
    #[error("{0}")]
    Timeout(String),
    /// The query needed more memory than its limit.
    #[error("{0}")]
    TooMuchMemory(String),
    #[error("{0}")]
    Internal(String),
}

impl ReportError {
    /// A bad request naming `field`.
    pub fn bad_request(field: impl Into<String>, message: impl Into<String>) -> Self {
        ReportError::BadRequest {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A report's body, in chunks as it is produced.
pub type ReportBody = BoxStream<'static, Result<Bytes, ReportError>>;

/// Reports over a lake.
#[derive(Debug, Clone)]
pub struct LakeReports {
    lake: tally_store::Location,
    /// Memory one SQL query may hold.
    memory_limit: usize,
    /// Wall-clock limit of one SQL query.
    time_limit: Duration,
    /// Where the reports and SQL queries run.
    engine: Engine,
    /// `None` if it could not be started: reports then run on the caller's runtime.
    runtime: Option<Arc<QueryRuntime>>,
    sql_slots: Arc<Semaphore>,
}

impl LakeReports {
    /// Memory one SQL query may hold by default, as `tally sql`.
    pub const DEFAULT_SQL_MEMORY_LIMIT: usize = 512 * 1024 * 1024;
    /// Time one SQL query may take by default, as `tally sql`.
    pub const DEFAULT_SQL_TIME_LIMIT: Duration = Duration::from_secs(60);
    /// SQL queries that run at once; more wait for their turn.
    pub const SQL_QUERIES_AT_ONCE: usize = 2;

    /// Reports over the lake at `lake`.
    pub fn new(lake: tally_store::Location) -> Self {
        let runtime = match QueryRuntime::start() {
            Ok(runtime) => Some(Arc::new(runtime)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the query runtime: reports run on the server's");
                None
            }
        };
        Self {
            lake,
            memory_limit: Self::DEFAULT_SQL_MEMORY_LIMIT,
            time_limit: Self::DEFAULT_SQL_TIME_LIMIT,
            engine: Engine::Local,
            runtime,
            sql_slots: Arc::new(Semaphore::new(Self::SQL_QUERIES_AT_ONCE)),
        }
    }

    /// The same, with SQL queries limited to `memory_limit` bytes and `time_limit`.
    pub fn with_limits(mut self, memory_limit: usize, time_limit: Duration) -> Self {
        self.memory_limit = memory_limit;
        self.time_limit = time_limit;
        self
    }

    /// The same, with reports and SQL queries run on `engine`.
    pub fn with_engine(mut self, engine: Engine) -> Self {
        self.engine = engine;
        self
    }

    /// The query runtime, or the caller's if it could not be started.
    fn handle(&self) -> tokio::runtime::Handle {
        match self.runtime.as_ref().and_then(|r| r.0.as_ref()) {
            Some(runtime) => runtime.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }

    /// Every invoice of the request (`tally billing`).
    pub async fn billing(
        &self,
        defs: Definitions,
        request: InvoiceRequest,
        format: Format,
    ) -> Result<ReportBody, ReportError> {
        self.whole(format, move |lake| async move {
            crate::invoices(&lake, &defs, &request).await
        })
        .await
    }

    /// The overage report of a month (`tally overage`).
    pub async fn overage(
        &self,
        defs: Definitions,
        period: Period,
        format: Format,
    ) -> Result<ReportBody, ReportError> {
        self.whole(format, move |lake| async move {
            crate::overage(&lake, &defs, period).await
        })
        .await
    }

    /// Adoption over a range of days (`tally adoption`).
    pub async fn adoption(
        &self,
        defs: Definitions,
        request: AdoptionRequest,
        format: Format,
    ) -> Result<ReportBody, ReportError> {
        self.whole(format, move |lake| async move {
            crate::adoption(&lake, &defs, &request).await
        })
        .await
    }

    /// `meter`'s usage as `query` asks for it (OpenMeter's meter query), on the reports'
    /// runtime. Meter queries run here even when the reports run on Ballista: its
    /// executors do not have the functions that read `data`.
    pub async fn meter_query(
        &self,
        meter: Meter,
        query: MeterQuery,
    ) -> Result<Vec<MeterRow>, ReportError> {
        self.on_local_lake(move |lake| async move { lake.meter_query(&meter, &query).await })
            .await
    }

    /// The values `meter`'s group-by `name` took over `[from, to)`.
    pub async fn group_by_values(
        &self,
        meter: Meter,
        name: String,
        from: Option<chrono::DateTime<chrono::Utc>>,
        to: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<Vec<String>, ReportError> {
        self.on_local_lake(move |lake| async move {
            tally_query::meters::group_by_values(lake.context(), &meter, &name, from, to).await
        })
        .await
    }

    /// The latest events `filter` selects (OpenMeter's event list).
    pub async fn list_events(&self, filter: EventFilter) -> Result<Vec<StoredEvent>, ReportError> {
        self.on_local_lake(move |lake| async move {
            tally_query::meters::list_events(lake.context(), &filter).await
        })
        .await
    }

    /// Runs `work` on the reports' runtime over a local session of the lake.
    async fn on_local_lake<T, F>(
        &self,
        work: impl FnOnce(Lakehouse) -> F + Send + 'static,
    ) -> Result<T, ReportError>
    where
        T: Send + 'static,
        F: Future<Output = tally_query::Result<T>> + Send,
    {
        let location = self.lake.clone();
        let task = async move {
            let lake = Lakehouse::open(&location).await.map_err(internal)?;
            work(lake).await.map_err(internal)
        };
        // Aborted if this request goes away before the answer is ready.
        let mut task = AbortOnDrop(self.handle().spawn(task));
        (&mut task.0)
            .await
            .map_err(|e| ReportError::Internal(format!("the query's task failed: {e}")))?
    }

    /// Runs a report that is rendered whole, and answers it as one chunk.
    async fn whole<R, F>(
        &self,
        format: Format,
        report: impl FnOnce(Lakehouse) -> F + Send + 'static,
    ) -> Result<ReportBody, ReportError>
    where
        R: Report,
        F: Future<Output = crate::Result<R>> + Send,
    {
        let location = self.lake.clone();
        let options = LakehouseOptions {
            engine: self.engine.clone(),
            ..LakehouseOptions::default()
        };
        let work = async move {
            let lake = Lakehouse::open_with(&location, options)
                .await
                .map_err(internal)?;
            let report = report(lake).await.map_err(internal)?;
            to_bytes(&report, format).map_err(internal)
        };
        // Aborted if this request goes away before the report is done.
        let mut task = AbortOnDrop(self.handle().spawn(work));
        let bytes = (&mut task.0)
            .await
            .map_err(|e| ReportError::Internal(format!("the report's task failed: {e}")))??;
        Ok(futures::stream::once(async move { Ok(Bytes::from(bytes)) }).boxed())
    }

    /// Runs read-only SQL, streaming the result. The definitions' tables are read through
    /// `definitions` when the query names one.
    pub async fn sql(
        &self,
        query: String,
        format: Format,
        definitions: tally_ingest::definitions::Definitions,
    ) -> Result<ReportBody, ReportError> {
        self.stream_sql(query, format, Some(definitions)).await
    }

    /// [`Self::sql`]; without `definitions`, their tables stay empty.
    async fn stream_sql(
        &self,
        query: String,
        format: Format,
        definitions: Option<tally_ingest::definitions::Definitions>,
    ) -> Result<ReportBody, ReportError> {
        let options = LakehouseOptions {
            memory_limit: self.memory_limit,
            time_limit: self.time_limit,
            engine: self.engine.clone(),
            ..LakehouseOptions::default()
        };
        let location = self.lake.clone();
        // Waiting for a turn ends with this request if its client goes away.
        let slot = self
            .sql_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(internal)?;
        let (tx, mut rx) = mpsc::channel::<Result<Bytes, ReportError>>(2);
        // Each query runs on a runtime of its own, driven from a blocking thread (`sql::run`
        // holds its SQL dialect across awaits, so its future is not `Send`). A query
        // cancelled at its time limit goes on until its operator's next yield, which can
        // be seconds: its runtime is let go without waiting, so that it never holds up the
        // next query.
        let task = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let runtime = match QueryRuntime::build("tally-sql") {
                Ok(runtime) => runtime,
                Err(e) => {
                    let e = ReportError::Internal(format!("starting the query's runtime: {e}"));
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                let work = async {
                    let lake = Lakehouse::open_with(&location, options)
                        .await
                        .map_err(|e| ReportError::Internal(format!("opening the lake: {e}")))?;
                    if let Some(definitions) = &definitions
                        && crate::needs_definitions(&lake, &query)
                    {
                        Definitions::load(definitions)
                            .await
                            .map_err(internal)?
                            .register(&lake)
                            .map_err(internal)?;
                    }
                    let stream = sql::run(&lake, &query).await.map_err(sql_error)?;
                    send_stream(stream, format, tx.clone()).await
                };
                // The client went away: dropping the query cancels it.
                let outcome = tokio::select! {
                    outcome = work => Some(outcome),
                    () = tx.closed() => None,
                };
                if let Some(Err(e)) = outcome {
                    let _ = tx.send(Err(e)).await;
                }
            });
            runtime.shutdown_background();
        });
        // Wait for the first chunk: an error before it still becomes the status.
        let first = match rx.recv().await {
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => return Err(e),
            None => return Err(ended(task.await)),
        };
        let rest = futures::stream::unfold(Some((rx, task)), |state| async move {
            let (mut rx, task) = state?;
            match rx.recv().await {
                Some(item) => Some((item, Some((rx, task)))),
                // The channel closed: the task is done; it ended well unless it panicked.
                None => match task.await {
                    Ok(()) => None,
                    Err(e) => Some((Err(ended(Err(e))), None)),
                },
            }
        });
        Ok(futures::stream::once(async move { Ok(first) })
            .chain(rest)
            .boxed())
    }

    /// `customer`'s usage per UTC day and feature from `from` to `to`, both included: rows
    /// `day, feature, events, quantity` of the events decided `accepted` or `overage`,
    /// ordered by day and feature (the portal's daily chart).
    pub async fn usage(
        &self,
        customer: &str,
        from: NaiveDate,
        to: NaiveDate,
        format: Format,
    ) -> Result<ReportBody, ReportError> {
        if to < from {
            return Err(ReportError::bad_request(
                "to",
                format!("to {to} is before from {from}"),
            ));
        }
        if (to - from).num_days() > 366 {
            return Err(ReportError::bad_request(
                "to",
                "the range is longer than 366 days",
            ));
        }
        self.stream_sql(usage_query(customer, from, to), format, None)
            .await
    }
}

/// The portal's daily usage of one customer over the raw events (`date` is the events
/// table's day partition, so only the range's days are read). The customer id is bound
/// as an escaped literal; the days were parsed as dates.
fn usage_query(customer: &str, from: NaiveDate, to: NaiveDate) -> String {
    let customer = customer.replace('\'', "''");
    format!(
        "SELECT \"date\" AS day, feature, CAST(COUNT(*) AS BIGINT) AS events, SUM(quantity) AS quantity \
         FROM events \
         WHERE customer = '{customer}' AND decision IN ('accepted', 'overage') \
         AND \"date\" >= '{from}' AND \"date\" <= '{to}' \
         GROUP BY \"date\", feature ORDER BY day, feature"
    )
}

/// Why a query's task ended without a word.
fn ended(joined: Result<(), tokio::task::JoinError>) -> ReportError {
    match joined {
        Ok(()) => ReportError::Internal("the query ended without an answer".to_owned()),
        Err(e) => ReportError::Internal(format!("the query's task failed: {e}")),
    }
}

fn internal(e: impl std::fmt::Display) -> ReportError {
    ReportError::Internal(format!("{e:#}"))
}

/// A SQL query's failure: the query's fault (bad input, a limit) or the server's.
fn sql_error(e: SqlError) -> ReportError {
    match &e {
        SqlError::TimeLimit { .. } => ReportError::Timeout(e.to_string()),
        SqlError::MemoryLimit { .. } => ReportError::TooMuchMemory(e.to_string()),
        _ if e.is_bad_query() => ReportError::bad_request("query", e.to_string()),
        _ => internal(e),
    }
}

/// Encodes a query's result batch by batch ([`write_stream`]) and sends each batch's
/// bytes as a chunk.
async fn send_stream(
    stream: SendableRecordBatchStream,
    format: Format,
    tx: mpsc::Sender<Result<Bytes, ReportError>>,
) -> Result<(), ReportError> {
    let buffer = Buffer::default();
    let paced = Paced {
        schema: stream.schema(),
        inner: stream,
        buffer: buffer.clone(),
        tx: PollSender::new(tx.clone()),
        started: false,
    };
    let format = match format {
        Format::Csv => OutputFormat::Csv,
        Format::Arrow => OutputFormat::Arrow,
        Format::Json | Format::Table => OutputFormat::Json,
    };
    write_stream(Box::pin(paced), format, buffer.clone())
        .await
        .map_err(sql_error)?;
    // The end: the closing `]`, the end-of-stream marker, or the whole of a small result.
    let rest = buffer.take();
    if !rest.is_empty() {
        // A client gone by now has its query done anyway.
        let _ = tx.send(Ok(Bytes::from(rest))).await;
    }
    Ok(())
}

/// Where [`write_stream`] writes: taken a chunk at a time by [`Paced`].
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Buffer {
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.lock())
    }
}

impl Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.lock().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A query's stream that, before each batch after the first, sends what was written of
/// the previous ones: the next batch is computed only once the channel has room. Until
/// the first rows are written nothing is sent (an Arrow stream's schema waits for them),
/// so a failure before them is still answered with its status.
struct Paced {
    schema: SchemaRef,
    inner: SendableRecordBatchStream,
    buffer: Buffer,
    tx: PollSender<Result<Bytes, ReportError>>,
    started: bool,
}

impl Stream for Paced {
    type Item = datafusion::error::Result<RecordBatch>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.started && !this.buffer.lock().is_empty() {
            let gone = || {
                Poll::Ready(Some(Err(DataFusionError::Execution(
                    "the client went away".to_owned(),
                ))))
            };
            if ready!(this.tx.poll_reserve(cx)).is_err() {
                return gone();
            }
            if this
                .tx
                .send_item(Ok(Bytes::from(this.buffer.take())))
                .is_err()
            {
                return gone();
            }
        }
        let next = ready!(this.inner.poll_next_unpin(cx));
        if let Some(Ok(batch)) = &next {
            this.started |= batch.num_rows() > 0;
        }
        Poll::Ready(next)
    }
}

impl RecordBatchStream for Paced {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
}

/// A task aborted when dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The runtime the reports run on. Shut down without waiting when the last handle goes
/// (which may be inside another runtime, where waiting is not allowed).
#[derive(Debug)]
struct QueryRuntime(Option<tokio::runtime::Runtime>);

impl QueryRuntime {
    fn start() -> std::io::Result<Self> {
        Self::build("tally-query").map(|runtime| Self(Some(runtime)))
    }

    /// A runtime with a worker per core.
    fn build(name: &str) -> std::io::Result<tokio::runtime::Runtime> {
        let threads = std::thread::available_parallelism().map_or(2, NonZeroUsize::get);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name(name)
            .enable_all()
            .build()
    }
}

impl Drop for QueryRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
