//! A person's own SQL over the lake, read-only and bounded.
//!
//! [`run`] takes one statement of text and answers with a stream of record batches. It
//! runs only queries: the statement is parsed and looked at before anything is planned,
//! and refused ([`Refusal`]) if it is not a query (DDL such as `CREATE [EXTERNAL] TABLE`,
//! `CREATE VIEW`, `DROP`, `ALTER`, or `SELECT … INTO`; DML such as `INSERT`, `UPDATE`,
//! `DELETE`; `COPY`; `SET` / `RESET`; `EXPLAIN`, `SHOW` and every other statement), if
//! the text holds more than one statement, or if it calls a table function other than
//! those in [`ALLOWED_TABLE_FUNCTIONS`] (a function that reads files would reach past the
//! lake). A table that is not registered is refused by name before planning. The plan is
//! then checked again with DataFusion's own [`SQLOptions`] (no DDL, no DML, no
//! statements), so a kind of plan the first check missed still never runs.
//!
//! The query runs in the [`Lakehouse`]'s bounded session: its memory pool, spilling to
//! disk ([`LakehouseOptions`](crate::LakehouseOptions)). Reaching the memory limit is
//! reported as [`SqlError::MemoryLimit`]; the failed query's memory is released when its
//! stream ends, so the session serves the next query. The time limit covers planning and
//! the whole stream: past it the stream yields [`SqlError::TimeLimit`] and drops the
//! query, which cancels its work.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::error::ArrowError;
use datafusion::error::DataFusionError;
use datafusion::execution::SessionState;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream};
use datafusion::physical_plan::stream::RecordBatchReceiverStreamBuilder;
use datafusion::sql::parser::{DFParserBuilder, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::{
    ObjectName, Query, SetExpr, Statement, TableFactor, Visit, Visitor,
};
use datafusion::sql::sqlparser::dialect::dialect_from_str;
use futures::task::AtomicWaker;
use futures::{Stream, StreamExt};

use crate::Lakehouse;

/// Table functions a query may call: they generate numbers and read nothing.
pub const ALLOWED_TABLE_FUNCTIONS: &[&str] = &["generate_series", "range"];

/// Why a statement was refused before anything ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Data definition: `CREATE TABLE`, `CREATE EXTERNAL TABLE`, `CREATE VIEW`, `DROP …`,
    /// `ALTER …`, `SELECT … INTO`. The statement's kind, e.g. `"CREATE VIEW"`.
    Ddl(String),
    /// Data modification: `INSERT`, `UPDATE`, `DELETE`, `MERGE`, `TRUNCATE`.
    Dml(String),
    /// `COPY` and other statements that read or write files.
    Copy(String),
    /// `SET`, `RESET`, `USE`: a change to the session's configuration.
    Config(String),
    /// Any other statement that is not a query: `EXPLAIN`, `SHOW`, `BEGIN`, `PREPARE` ….
    NotAQuery(String),
    /// More than one statement (how many).
    MultipleStatements(usize),
    /// No statement at all.
    Empty,
    /// A call of a table function not in [`ALLOWED_TABLE_FUNCTIONS`] (its name).
    TableFunction(String),
    /// DataFusion's [`SQLOptions`] check refused the plan (its message).
    Plan(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const ONLY: &str = "only read-only queries (SELECT …) run here";
        match self {
            Refusal::Ddl(kind) => {
                write!(f, "{kind} defines tables or views (DDL); {ONLY}")
            }
            Refusal::Dml(kind) => write!(f, "{kind} modifies data (DML); {ONLY}"),
            Refusal::Copy(kind) => write!(f, "{kind} reads or writes files; {ONLY}"),
            Refusal::Config(kind) => {
                write!(f, "{kind} changes the session's configuration; {ONLY}")
            }
            Refusal::NotAQuery(kind) => write!(f, "{kind} is not a query; {ONLY}"),
            Refusal::MultipleStatements(n) => {
                write!(f, "{n} statements given; send one query at a time")
            }
            Refusal::Empty => write!(f, "no statement given"),
            Refusal::TableFunction(name) => write!(
                f,
                "table function {name}(…) is not allowed; the allowed ones are {}",
                ALLOWED_TABLE_FUNCTIONS.join(", ")
            ),
            Refusal::Plan(message) => write!(f, "{message}; {ONLY}"),
        }
    }
}

/// What can go wrong with a query of [`run`], or while its result is written.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The statement is not one that may run (bad input).
    #[error("refused: {0}")]
    Refused(Refusal),
    /// The text does not parse as SQL (bad input).
    #[error("syntax error: {0}")]
    Syntax(String),
    /// The query names a table the lake does not have (bad input).
    #[error("unknown table {name}; the tables are: {}", .known.join(", "))]
    UnknownTable { name: String, known: Vec<String> },
    /// The query needed more memory than the session's limit and could not spill.
    #[error("memory limit of {} MiB exceeded; narrow the query (filters, fewer groups, a LIMIT) or raise the limit ({detail})", mib(*.limit))]
    MemoryLimit { limit: usize, detail: String },
    /// The query ran longer than the time limit and was cancelled.
    #[error("time limit of {} s exceeded; the query was cancelled", .limit.as_secs_f64())]
    TimeLimit { limit: Duration },
    /// Planning or running the query failed otherwise (an unknown column, a type error …).
    #[error("query failed: {0}")]
    Query(DataFusionError),
    /// Encoding the result failed.
    #[error("writing the result: {0}")]
    Encode(#[from] ArrowError),
    /// Writing the result failed (the reader went away, a full disk).
    #[error("writing the result: {0}")]
    Io(#[from] std::io::Error),
}

impl SqlError {
    /// Whether the query itself is at fault (refused, malformed, over a limit, or failing
    /// in its own expressions), rather than the lake or the output.
    pub fn is_bad_query(&self) -> bool {
        match self {
            SqlError::Refused(_)
            | SqlError::Syntax(_)
            | SqlError::UnknownTable { .. }
            | SqlError::MemoryLimit { .. }
            | SqlError::TimeLimit { .. } => true,
            SqlError::Query(e) => query_at_fault(e),
            _ => false,
        }
    }
}

/// Planning errors (an unknown column, a type error) and errors of the query's own
/// expressions (a division by zero, a cast) are the query's; reading the lake is not.
fn query_at_fault(e: &DataFusionError) -> bool {
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

/// An error of a [`run`] stream back as the [`SqlError`] it was: the stream can only
/// yield `DataFusionError`s, so it carries its own errors inside `External`.
impl From<DataFusionError> for SqlError {
    fn from(e: DataFusionError) -> Self {
        match e {
            DataFusionError::External(inner) => match inner.downcast::<SqlError>() {
                Ok(sql) => *sql,
                Err(inner) => SqlError::Query(DataFusionError::External(inner)),
            },
            e => SqlError::Query(e),
        }
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Runs one read-only query against the lake's tables and returns its result as a
/// stream; see the module's documentation for what is refused and the limits.
///
/// Errors met while the stream runs come out of it as `DataFusionError`s; convert them
/// with `SqlError::from` to see the memory and time limits as such.
pub async fn run(lake: &Lakehouse, sql: &str) -> Result<SendableRecordBatchStream, SqlError> {
    let options = lake.options();
    let deadline = Instant::now() + options.time_limit;
    let memory_limit = options.memory_limit;
    let time_limit = options.time_limit;
    let ctx = lake.context();
    let state = ctx.state();
    let statement = parse(&state, sql)?;

    // Only a query, calling only allowed table functions, over registered tables.
    let functions = check_statement(&statement).map_err(SqlError::Refused)?;
    let known = table_names(ctx);
    for reference in state
        .resolve_table_references(&statement)
        .map_err(SqlError::Query)?
    {
        let called = reference.schema().is_none() && functions.contains(reference.table());
        // An unknown catalog or schema is an error of its own: the table is unknown too.
        if !called && !ctx.table_exist(reference.clone()).unwrap_or(false) {
            return Err(SqlError::UnknownTable {
                name: reference.to_string(),
                known,
            });
        }
    }

    let failed = |e: DataFusionError| classify(e, memory_limit);
    let planned = async {
        let plan = state.statement_to_plan(statement).await.map_err(failed)?;
        // DataFusion's own check, on the plan: a second line behind `check_statement`.
        SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(&plan)
            .map_err(|e| SqlError::Refused(Refusal::Plan(e.strip_backtrace())))?;
        let frame = ctx.execute_logical_plan(plan).await.map_err(failed)?;
        frame.execute_stream().await.map_err(failed)
    };
    let mut stream = tokio::time::timeout_at(deadline.into(), planned)
        .await
        .map_err(|_| SqlError::TimeLimit { limit: time_limit })??;
    // The query runs in a task of its own, handing over at most two batches ahead of the
    // reader. An operator can work for long stretches without returning (a cross join
    // emits many batches from one input batch); this way the reader still sees the time
    // limit when it falls. Dropping the receiving stream aborts the task.
    let schema = stream.schema();
    let mut channel = RecordBatchReceiverStreamBuilder::new(schema.clone(), 2);
    let tx = channel.tx();
    channel.spawn(async move {
        while let Some(batch) = stream.next().await {
            if tx.send(batch).await.is_err() {
                break; // the reader went away
            }
        }
        Ok(())
    });
    Ok(Box::pin(Bounded {
        schema,
        inner: Some(channel.build()),
        deadline,
        watchdog: Some(Watchdog::start(deadline)?),
        memory_limit,
        time_limit,
    }))
}

/// The one statement `sql` holds; more than one is refused by name.
fn parse(state: &SessionState, sql: &str) -> Result<DfStatement, SqlError> {
    let config = state.config().options();
    let dialect = dialect_from_str(config.sql_parser.dialect)
        .ok_or_else(|| SqlError::Syntax("the session's SQL dialect is unknown".to_owned()))?;
    let mut statements = DFParserBuilder::new(sql)
        .with_dialect(dialect.as_ref())
        .with_recursion_limit(config.sql_parser.recursion_limit.get())
        .build()
        .and_then(|mut parser| parser.parse_statements())
        .map_err(|e| SqlError::Syntax(e.strip_backtrace()))?;
    match statements.len() {
        0 => Err(SqlError::Refused(Refusal::Empty)),
        1 => Ok(statements.pop_front().expect("one statement")),
        n => Err(SqlError::Refused(Refusal::MultipleStatements(n))),
    }
}

/// The names of the tables `sql` names (none where it does not parse: [`run`] then says
/// why), for a caller to register what the query reads before running it.
pub fn tables_named(lake: &Lakehouse, sql: &str) -> BTreeSet<String> {
    let state = lake.context().state();
    let Ok(statement) = parse(&state, sql) else {
        return BTreeSet::new();
    };
    state
        .resolve_table_references(&statement)
        .map(|references| references.iter().map(|r| r.table().to_owned()).collect())
        .unwrap_or_default()
}

/// The names of the tables a query may read, sorted.
fn table_names(ctx: &datafusion::prelude::SessionContext) -> Vec<String> {
    let state = ctx.state();
    let catalog = &state.config().options().catalog;
    let mut names = ctx
        .catalog(&catalog.default_catalog)
        .and_then(|c| c.schema(&catalog.default_schema))
        .map(|s| s.table_names())
        .unwrap_or_default();
    names.sort();
    names
}

/// A DataFusion error as the memory limit when memory ran out, else as a query error.
fn classify(e: DataFusionError, memory_limit: usize) -> SqlError {
    if let DataFusionError::ResourcesExhausted(detail) = e.find_root() {
        return SqlError::MemoryLimit {
            limit: memory_limit,
            detail: detail.clone(),
        };
    }
    SqlError::from(e)
}

/// Refuses a statement that is not a query, or that calls a table function not allowed;
/// answers the names of the (allowed) table functions it calls.
fn check_statement(statement: &DfStatement) -> Result<BTreeSet<String>, Refusal> {
    let sql = match statement {
        DfStatement::Statement(s) => s,
        DfStatement::CreateExternalTable(_) => {
            return Err(Refusal::Ddl("CREATE EXTERNAL TABLE".to_owned()));
        }
        DfStatement::CopyTo(_) => return Err(Refusal::Copy("COPY".to_owned())),
        DfStatement::Explain(_) => return Err(Refusal::NotAQuery("EXPLAIN".to_owned())),
        DfStatement::Reset(_) => return Err(Refusal::Config("RESET".to_owned())),
    };
    let mut check = QueryCheck::default();
    match sql.visit(&mut check) {
        ControlFlow::Break(refusal) => Err(refusal),
        ControlFlow::Continue(()) => Ok(check.functions),
    }
}

/// Walks a statement, its subqueries and common table expressions: every statement in it
/// must be a query, no `SELECT` may have an `INTO`, and every table function called must
/// be allowed.
#[derive(Default)]
struct QueryCheck {
    functions: BTreeSet<String>,
}

impl Visitor for QueryCheck {
    type Break = Refusal;

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<Refusal> {
        match statement {
            Statement::Query(_) => ControlFlow::Continue(()),
            other => ControlFlow::Break(refusal_of(other)),
        }
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<Refusal> {
        fn into(body: &SetExpr) -> bool {
            match body {
                SetExpr::Select(select) => select.into.is_some(),
                SetExpr::SetOperation { left, right, .. } => into(left) || into(right),
                _ => false,
            }
        }
        if into(&query.body) {
            return ControlFlow::Break(Refusal::Ddl("SELECT … INTO".to_owned()));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<Refusal> {
        let name = match factor {
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            }
            | TableFactor::Function { name, .. } => function_name(name),
            TableFactor::TableFunction { .. } => "TABLE".to_owned(),
            TableFactor::JsonTable { .. } | TableFactor::OpenJsonTable { .. } => {
                "JSON_TABLE".to_owned()
            }
            TableFactor::XmlTable { .. } => "XMLTABLE".to_owned(),
            _ => return ControlFlow::Continue(()),
        };
        if ALLOWED_TABLE_FUNCTIONS.contains(&name.as_str()) {
            self.functions.insert(name);
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(Refusal::TableFunction(name))
        }
    }
}

/// A table function's name as DataFusion looks it up: unquoted parts in lower case.
fn function_name(name: &ObjectName) -> String {
    name.0
        .iter()
        .map(|part| match part.as_ident() {
            Some(ident) if ident.quote_style.is_none() => ident.value.to_lowercase(),
            Some(ident) => ident.value.clone(),
            None => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The refusal of a statement that is not a query: its kind in words (`CREATE VIEW`,
/// `DROP TABLE`) and what kind of statement that is.
fn refusal_of(statement: &Statement) -> Refusal {
    let kind = match statement {
        Statement::Drop { object_type, .. } => format!("DROP {object_type}"),
        other => {
            // The variant's name in words: `CreateView` → `CREATE VIEW`.
            let debug = format!("{other:?}");
            let variant: String = debug
                .chars()
                .take_while(char::is_ascii_alphanumeric)
                .collect();
            let mut words = String::new();
            let mut previous_lower = false;
            for c in variant.chars() {
                if c.is_ascii_uppercase() && previous_lower {
                    words.push(' ');
                }
                previous_lower = c.is_ascii_lowercase();
                words.push(c.to_ascii_uppercase());
            }
            words
        }
    };
    let first = kind.split(' ').next().unwrap_or_default();
    match first {
        "CREATE" | "ALTER" | "DROP" | "RENAME" | "COMMENT" | "ATTACH" | "DETACH" => {
            Refusal::Ddl(kind)
        }
        "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "TRUNCATE" => Refusal::Dml(kind),
        "COPY" | "UNLOAD" | "EXPORT" | "LOAD" | "LIST" | "REMOVE" => Refusal::Copy(kind),
        "SET" | "RESET" | "USE" => Refusal::Config(kind),
        _ => Refusal::NotAQuery(kind),
    }
}

/// Wakes a [`Bounded`] stream when its time is up, from a thread of its own: the async
/// runtime's timers can fire late when a query keeps every worker thread busy.
struct Watchdog {
    fired: Arc<AtomicBool>,
    waker: Arc<AtomicWaker>,
    /// Dropped with the stream, which ends the thread.
    _stop: mpsc::Sender<()>,
}

impl Watchdog {
    fn start(deadline: Instant) -> Result<Self, SqlError> {
        let (stop, stopped) = mpsc::channel::<()>();
        let fired = Arc::new(AtomicBool::new(false));
        let waker = Arc::new(AtomicWaker::new());
        let (f, w) = (fired.clone(), waker.clone());
        std::thread::Builder::new()
            .name("tally-sql-deadline".to_owned())
            .spawn(move || {
                let wait = deadline.saturating_duration_since(Instant::now());
                if let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(wait) {
                    f.store(true, Ordering::Release);
                    w.wake();
                }
            })
            .map_err(|e| SqlError::Query(DataFusionError::IoError(e)))?;
        Ok(Self {
            fired,
            waker,
            _stop: stop,
        })
    }
}

/// A query's stream under the time limit, with its memory errors named as such.
struct Bounded {
    schema: SchemaRef,
    /// `None` once the stream ended, failed or ran out of time: dropping it aborts the
    /// task running the query, which frees its memory.
    inner: Option<SendableRecordBatchStream>,
    deadline: Instant,
    watchdog: Option<Watchdog>,
    memory_limit: usize,
    time_limit: Duration,
}

impl Stream for Bounded {
    type Item = datafusion::error::Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let (Some(inner), Some(watchdog)) = (this.inner.as_mut(), this.watchdog.as_ref()) else {
            return Poll::Ready(None);
        };
        watchdog.waker.register(cx.waker());
        // The clock is read too: a query whose batches are always ready is polled again
        // before the watchdog's wake-up is seen.
        if watchdog.fired.load(Ordering::Acquire) || Instant::now() >= this.deadline {
            this.inner = None;
            this.watchdog = None;
            let error = SqlError::TimeLimit {
                limit: this.time_limit,
            };
            return Poll::Ready(Some(Err(DataFusionError::External(Box::new(error)))));
        }
        match inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Err(e))) => {
                this.inner = None;
                this.watchdog = None;
                let error = match classify(e, this.memory_limit) {
                    SqlError::Query(e) => e,
                    other => DataFusionError::External(Box::new(other)),
                };
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(None) => {
                this.inner = None;
                this.watchdog = None;
                Poll::Ready(None)
            }
            other => other,
        }
    }
}

impl RecordBatchStream for Bounded {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
}
