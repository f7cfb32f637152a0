//! The query layer behind the API's report routes ([`tally_api::Reports`]): the CLI's own
//! `tally billing`, `tally overage`, `tally adoption` and `tally sql`, answered over HTTP.
//!
//! - **Billing, overage, adoption** are computed by the CLI's functions
//!   ([`billing::invoices`], [`analytics::overage`], [`analytics::adoption`]) and written
//!   by its writers into memory, then sent as one chunk: they are small (a line per
//!   customer × plan × feature), and whole they can still fail with a proper status.
//!   JSON, CSV and Arrow are byte for byte what the CLI prints with `--format`
//!   ([`crate::output::csv_to_arrow`], [`crate::output::sections_to_arrow`]).
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

use std::collections::BTreeSet;
use std::io::Write;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use chrono::NaiveDate;
use datafusion::error::DataFusionError;
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream};
use futures::{Stream, StreamExt};
use tally_api::{Format, ReportBody, ReportError, Reports};
use tally_query::analytics::DateRange;
use tally_query::output::{OutputFormat, write_stream};
use tally_query::sql::{self, SqlError};
use tally_query::{Lakehouse, LakehouseOptions, Period};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::PollSender;

use crate::config::Config;
use crate::output::ReportFormat;
use crate::{analytics, billing};

/// Reports over the configured lake.
#[derive(Debug, Clone)]
pub struct LakeReports {
    config: Config,
    /// Memory one SQL query may hold.
    memory_limit: usize,
    /// Wall-clock limit of one SQL query.
    time_limit: Duration,
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

    pub fn new(config: Config) -> Self {
        let runtime = match QueryRuntime::start() {
            Ok(runtime) => Some(Arc::new(runtime)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the query runtime: reports run on the server's");
                None
            }
        };
        Self {
            config,
            memory_limit: Self::DEFAULT_SQL_MEMORY_LIMIT,
            time_limit: Self::DEFAULT_SQL_TIME_LIMIT,
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

    /// The query runtime, or the caller's if it could not be started.
    fn handle(&self) -> tokio::runtime::Handle {
        match self.runtime.as_ref().and_then(|r| r.0.as_ref()) {
            Some(runtime) => runtime.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }

    /// Runs a report that is rendered whole, and answers it as one chunk.
    async fn whole(
        &self,
        work: impl Future<Output = Result<Vec<u8>, ReportError>> + Send + 'static,
    ) -> Result<ReportBody, ReportError> {
        // Aborted if this request goes away before the report is done.
        let mut task = AbortOnDrop(self.handle().spawn(work));
        let bytes = (&mut task.0)
            .await
            .map_err(|e| ReportError::Internal(format!("the report's task failed: {e}")))??;
        Ok(futures::stream::once(async move { Ok(Bytes::from(bytes)) }).boxed())
    }
}

#[async_trait::async_trait]
impl Reports for LakeReports {
    async fn billing(
        &self,
        period: String,
        customer: Option<String>,
        anniversary: bool,
        format: Format,
    ) -> Result<ReportBody, ReportError> {
        let period = parse_period(&period)?;
        let config = self.config.clone();
        self.whole(async move {
            let bills = billing::invoices(&config, period, customer.as_deref(), anniversary)
                .await
                .map_err(internal)?;
            render(format, |out, f| billing::write(out, &bills, period, f))
        })
        .await
    }

    async fn overage(&self, period: String, format: Format) -> Result<ReportBody, ReportError> {
        let period = parse_period(&period)?;
        let config = self.config.clone();
        self.whole(async move {
            let report = analytics::overage(&config, period)
                .await
                .map_err(internal)?;
            render(format, |out, f| analytics::write_overage(out, &report, f))
        })
        .await
    }

    async fn adoption(
        &self,
        from: String,
        to: String,
        feature: Option<String>,
        free_plans: Vec<String>,
        format: Format,
    ) -> Result<ReportBody, ReportError> {
        let (from, to) = (parse_day("from", &from)?, parse_day("to", &to)?);
        let range = DateRange::new(from, to).ok_or_else(|| {
            ReportError::bad_request("to", format!("to {to} is before from {from}"))
        })?;
        let free: BTreeSet<String> = if free_plans.is_empty() {
            BTreeSet::from([analytics::FREE_PLAN.to_owned()])
        } else {
            free_plans.into_iter().collect()
        };
        let config = self.config.clone();
        self.whole(async move {
            let report = analytics::adoption(&config, range, feature.as_deref(), &free)
                .await
                .map_err(internal)?;
            render(format, |out, f| analytics::write_adoption(out, &report, f))
        })
        .await
    }

    async fn sql(&self, query: String, format: Format) -> Result<ReportBody, ReportError> {
        let options = LakehouseOptions {
            memory_limit: self.memory_limit,
            time_limit: self.time_limit,
            ..LakehouseOptions::default()
        };
        let config = self.config.clone();
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
                    let lake = Lakehouse::open_with(&config.lake_dir(), options)
                        .await
                        .map_err(|e| ReportError::Internal(format!("opening the lake: {e}")))?;
                    crate::sql::with_definitions(&config, &lake, &query)
                        .await
                        .map_err(|e| ReportError::Internal(format!("{e:#}")))?;
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

    async fn usage(
        &self,
        customer: String,
        from: String,
        to: String,
        format: Format,
    ) -> Result<ReportBody, ReportError> {
        let (from, to) = (parse_day("from", &from)?, parse_day("to", &to)?);
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
        self.sql(usage_query(&customer, from, to), format).await
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

/// A month parameter, `YYYY-MM`.
fn parse_period(period: &str) -> Result<Period, ReportError> {
    period
        .parse()
        .map_err(|e| ReportError::bad_request("period", format!("{e}, such as 2026-11")))
}

/// A day parameter, `YYYY-MM-DD`.
fn parse_day(field: &str, day: &str) -> Result<NaiveDate, ReportError> {
    NaiveDate::parse_from_str(day, "%Y-%m-%d").map_err(|_| {
        ReportError::bad_request(
            field,
            format!("bad {field} {day:?}: expected a day, YYYY-MM-DD, such as 2026-11-01"),
        )
    })
}

fn internal(e: impl std::fmt::Display) -> ReportError {
    ReportError::Internal(format!("{e:#}"))
}

/// A SQL query's failure: the query's fault (bad input, a limit) or the server's.
fn sql_error(e: SqlError) -> ReportError {
    let query = |e: &SqlError| ReportError::bad_request("query", e.to_string());
    match &e {
        SqlError::TimeLimit { .. } => ReportError::Timeout(e.to_string()),
        SqlError::MemoryLimit { .. } => ReportError::TooMuchMemory(e.to_string()),
        SqlError::Refused(_) | SqlError::Syntax(_) | SqlError::UnknownTable { .. } => query(&e),
        SqlError::Query(df) if the_query_is_at_fault(df) => query(&e),
        _ => internal(e),
    }
}

/// Planning errors (an unknown column, a type error) and errors of the query's own
/// expressions (a division by zero, a cast) are the query's; reading the lake is not.
fn the_query_is_at_fault(e: &DataFusionError) -> bool {
    match e.find_root() {
        DataFusionError::Plan(_)
        | DataFusionError::SchemaError(..)
        | DataFusionError::SQL(..)
        | DataFusionError::NotImplemented(_)
        | DataFusionError::Execution(_) => true,
        DataFusionError::ArrowError(e, _) => {
            !matches!(**e, ArrowError::IoError(..) | ArrowError::ExternalError(_))
        }
        _ => false,
    }
}

/// A report the CLI writes, in the API's `format`.
fn render(
    format: Format,
    write: impl Fn(&mut dyn Write, ReportFormat) -> anyhow::Result<()>,
) -> Result<Vec<u8>, ReportError> {
    let format = match format {
        Format::Json => ReportFormat::Json,
        Format::Csv => ReportFormat::Csv,
        Format::Arrow => ReportFormat::Arrow,
    };
    let mut out = Vec::new();
    write(&mut out, format).map_err(internal)?;
    Ok(out)
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
        Format::Json => OutputFormat::Json,
        Format::Csv => OutputFormat::Csv,
        Format::Arrow => OutputFormat::Arrow,
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
