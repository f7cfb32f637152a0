//! Entitlement checks over NATS request-reply: "may customer C use feature F (quantity q)
//! now?", answered by the worker that owns C's partition, without recording anything.
//!
//! A request goes to `tally.check.<partition>.<customer-token>` (the customer's partition,
//! see [`partition_of`], and its subject token, so that NATS permissions can limit an
//! application to its own customers); every process owning that partition listens in the
//! queue group `tally-check`, so one of them answers. A request whose body names another
//! customer than its subject is refused. The body is a JSON [`CheckRequest`]; the reply a
//! JSON [`CheckReply`], with `error` naming the field when the request is malformed. A
//! check reads the engine as it stands: a definition change is seen once the worker's
//! watch has applied it (normally within a millisecond), without the synchronisation
//! events get.

use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tally_core::partitions::Partitions;
use tally_core::subject::{customer_from_token, partition_of, request_subject, token_matches};
use tally_quota::Usage;
use tokio_util::sync::CancellationToken;

use crate::entitlements::Entitlements;
use crate::{Error, Result};

pub use tally_core::subject::CHECK_PREFIX;
const QUEUE: &str = "tally-check";

/// The subject a check for this customer goes to.
pub fn check_subject(customer: &str, partitions: u16) -> String {
    request_subject(CHECK_PREFIX, customer, partitions)
}

/// "May `customer` use `feature` now?"
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    pub customer: String,
    pub feature: String,
    /// The quantity the app is about to use (default 1).
    #[serde(default = "one")]
    pub quantity: f64,
    /// When (default: now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

fn one() -> f64 {
    1.0
}

/// The answer: the decision an event would get now, and the feature's balance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckReply {
    pub customer: String,
    pub feature: String,
    /// `accepted`, `overage`, `limit_reached`, `not_entitled`, … (see the decisions).
    pub decision: String,
    /// Whether the usage would be allowed (accepted or overage).
    pub has_access: bool,
    /// Quantity counted in the open period.
    pub usage: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<f64>,
    /// What is left of the limit and the usable grants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<f64>,
    /// When the period's counter starts again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<DateTime<Utc>>,
    /// A static feature's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

/// The reply to a request that could not be checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckError {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// A thread that answers checks, with a NATS connection and a single-threaded runtime of
/// its own.
///
/// A check is then read from the socket, decided and answered on one thread: no message
/// crosses from one runtime thread to another on its way (on a small machine those
/// wake-ups are most of a check's latency), and a busy ingest runtime does not delay it.
/// The thread stops when this is dropped.
#[derive(Debug)]
pub struct Responder {
    client: Client,
    runtime: tokio::runtime::Handle,
    /// Dropping it ends the thread's runtime.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Responder {
    /// Starts the thread and connects to NATS from it.
    pub async fn start(url: &str, options: async_nats::ConnectOptions) -> Result<Responder> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (handle_tx, handle_rx) = tokio::sync::oneshot::channel();
        // The runtime is built, run and dropped on the thread (a runtime may not be
        // dropped on an async thread).
        std::thread::Builder::new()
            .name("tally-checks".to_owned())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                let runtime = match runtime {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(runtime.handle().clone()));
                // The runtime runs its tasks while this waits for the stop.
                let _ = runtime.block_on(stopped);
            })
            .map_err(|e| Error::nats("start the checks' thread", e))?;
        let runtime = handle_rx
            .await
            .map_err(|e| Error::nats("start the checks' thread", e))?
            .map_err(|e| Error::nats("start the checks' runtime", e))?;
        // Connected from the thread, so that the connection's tasks run there.
        let urls = tally_core::subject::server_urls(url);
        let client = runtime
            .spawn(async move { options.connect(urls).await })
            .await
            .map_err(|e| Error::nats("connect for the checks", e))?
            .map_err(|e| Error::nats("connect for the checks", e))?;
        Ok(Responder {
            client,
            runtime,
            _stop: stop,
        })
    }
}

/// Subscribes to the checks of the owned partitions (the server has the subscriptions
/// when this returns) and answers them on `responder`'s thread until `cancel`.
pub async fn serve(
    responder: &Responder,
    entitlements: Arc<Entitlements>,
    partitions: Vec<u16>,
    counts: &Partitions,
    cancel: CancellationToken,
) -> Result<tokio::task::JoinSet<()>> {
    let client = responder.client.clone();
    let total = counts.current();
    let subscriptions = subscribe(&client, CHECK_PREFIX, QUEUE, &partitions).await?;
    let requests = Requests {
        client: client.clone(),
        prefix: CHECK_PREFIX,
        partitions: counts.clone(),
    };
    Ok(answer_each(
        subscriptions,
        &responder.runtime,
        requests,
        cancel,
        move |p, token, reply_to, payload| {
            let (client, entitlements) = (client.clone(), entitlements.clone());
            async move {
                let body = if is_listing(&payload) {
                    match list(&entitlements, p, total, &token, &payload) {
                        Ok(reply) => serde_json::to_vec(&reply),
                        Err(error) => serde_json::to_vec(&error),
                    }
                } else {
                    match answer(&entitlements, p, total, &token, &payload) {
                        Ok(reply) => serde_json::to_vec(&reply),
                        Err(error) => serde_json::to_vec(&error),
                    }
                }
                .unwrap_or_default();
                if let Err(e) = client.publish(reply_to, body.into()).await {
                    tracing::warn!(partition = p, error = %e, "cannot answer a check");
                }
            }
        },
    ))
}

/// How long a request forwarded to the partition that holds its customer now may wait.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Where requests are answered: their subject prefix (checks or records), the partition
/// counts, and the connection to forward on.
#[derive(Clone)]
pub(crate) struct Requests {
    pub client: Client,
    pub prefix: &'static str,
    pub partitions: Partitions,
}

/// Runs `handle(partition, customer token, reply subject, body)` for each request with a
/// reply subject, one task per subscription on `runtime`, until `cancel`.
///
/// A request sent to the partition a customer had before the count grew (a client still
/// computing partitions with the count before `tally partitions grow`) is forwarded to
/// the customer's partition now and its answer relayed, so clients keep working across a
/// growth and learn the new count when they will. Any other partition is answered here
/// (and refuses a customer it does not hold, naming the subject to ask on).
pub(crate) fn answer_each<F, Fut>(
    subscriptions: Vec<(u16, async_nats::Subscriber)>,
    runtime: &tokio::runtime::Handle,
    requests_of: Requests,
    cancel: CancellationToken,
    handle: F,
) -> tokio::task::JoinSet<()>
where
    F: Fn(u16, String, async_nats::Subject, bytes::Bytes) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let mut tasks = tokio::task::JoinSet::new();
    for (p, mut requests) in subscriptions {
        let (cancel, handle, of) = (cancel.clone(), handle.clone(), requests_of.clone());
        tasks.spawn_on(
            async move {
                loop {
                    let request = tokio::select! {
                        () = cancel.cancelled() => break,
                        r = requests.next() => r,
                    };
                    let Some(request) = request else { break };
                    let Some(reply_to) = request.reply else {
                        continue;
                    };
                    let token = request
                        .subject
                        .rsplit_once('.')
                        .map(|(_, token)| token.to_owned())
                        .unwrap_or_default();
                    let moved = customer_from_token(&token).and_then(|c| {
                        let home = partition_of(&c, of.partitions.current());
                        (home != p && of.partitions.holds(p, &c)).then_some(home)
                    });
                    match moved {
                        Some(home) => {
                            let subject = format!("{}.{home}.{token}", of.prefix);
                            tokio::spawn(forward(
                                of.client.clone(),
                                subject,
                                reply_to,
                                request.payload,
                            ));
                        }
                        _ => handle(p, token, reply_to, request.payload).await,
                    }
                }
            },
            runtime,
        );
    }
    tasks
}

/// Asks `subject` with `body` and relays its answer to `reply_to`.
async fn forward(
    client: Client,
    subject: String,
    reply_to: async_nats::Subject,
    body: bytes::Bytes,
) {
    match ask_owner(
        &client,
        subject.clone(),
        body,
        FORWARD_TIMEOUT,
        "forward a request",
    )
    .await
    {
        Ok(answer) => {
            if let Err(e) = client.publish(reply_to, answer.payload).await {
                tracing::warn!(subject, error = %e, "cannot relay a forwarded answer");
            }
        }
        Err(e) => tracing::warn!(subject, error = %e, "a forwarded request was not answered"),
    }
}

/// Subscribes to `<prefix>.<partition>.*` in a queue group for each partition, and returns
/// once the server has the subscriptions, so that a request sent next is answered.
pub(crate) async fn subscribe(
    client: &Client,
    prefix: &str,
    queue: &str,
    partitions: &[u16],
) -> Result<Vec<(u16, async_nats::Subscriber)>> {
    let mut subscriptions = Vec::new();
    for &p in partitions {
        let requests = client
            .queue_subscribe(format!("{prefix}.{p}.*"), queue.to_owned())
            .await
            .map_err(|e| Error::nats("subscribe to requests", e))?;
        subscriptions.push((p, requests));
    }
    client
        .flush()
        .await
        .map_err(|e| Error::nats("subscribe to requests", e))?;
    Ok(subscriptions)
}

fn answer(
    entitlements: &Entitlements,
    partition: u16,
    total: u16,
    token: &str,
    payload: &[u8],
) -> std::result::Result<CheckReply, CheckError> {
    let request = parse(payload)?;
    sent_for(token, &request.customer)?;
    answer_request(entitlements, partition, total, request)
}

/// Refuses a request whose customer is not the one its subject names (the one NATS let
/// the sender ask about).
pub(crate) fn sent_for(token: &str, customer: &str) -> std::result::Result<(), CheckError> {
    if token_matches(token, customer) {
        Ok(())
    } else {
        Err(CheckError {
            error: format!(
                "customer {customer:?} is not the customer this request was sent for (subject token {token:?})"
            ),
            field: Some("customer".to_owned()),
        })
    }
}

fn answer_request(
    entitlements: &Entitlements,
    partition: u16,
    total: u16,
    request: CheckRequest,
) -> std::result::Result<CheckReply, CheckError> {
    if !request.quantity.is_finite() || request.quantity < 0.0 {
        return Err(CheckError {
            error: format!(
                "quantity must be a finite number ≥ 0, not {}",
                request.quantity
            ),
            field: Some("quantity".to_owned()),
        });
    }
    let owner = partition_of(&request.customer, total);
    if owner != partition {
        return Err(CheckError {
            error: format!(
                "customer {:?} belongs to partition {owner}; ask on {}",
                request.customer,
                request_subject(CHECK_PREFIX, &request.customer, total)
            ),
            field: Some("customer".to_owned()),
        });
    }
    let Some(mut engine) = entitlements.engine(partition) else {
        return Err(CheckError {
            error: format!("partition {partition} is not owned here"),
            field: None,
        });
    };
    let time = request.time.unwrap_or_else(Utc::now).timestamp_micros();
    let check = engine.check(&Usage {
        customer: &request.customer,
        feature: &request.feature,
        quantity: request.quantity,
        time,
        region: request.region.as_deref(),
        user: request.user.as_deref(),
    });
    Ok(CheckReply {
        decision: check.decision.as_str().to_owned(),
        has_access: check.decision.is_billable(),
        usage: check.usage,
        limit: check.limit,
        remaining: check.remaining,
        resets_at: check.resets_at.and_then(DateTime::from_timestamp_micros),
        value: check.value,
        customer: request.customer,
        feature: request.feature,
    })
}

/// Every feature of a customer, checked at once: `{"customer": C, "all": true}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListRequest {
    pub customer: String,
    /// Always `true`: what tells this request from a check of one feature.
    pub all: bool,
    /// When (default: now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<DateTime<Utc>>,
}

/// The answer to a [`ListRequest`]: one check of quantity 1 per feature the customer's
/// plan and add-ons name. An unknown customer has no features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListReply {
    pub customer: String,
    /// Whether the customer is known at all.
    pub known: bool,
    pub features: Vec<CheckReply>,
}

/// Whether a request asks for every feature (`"all": true`).
fn is_listing(payload: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(default)]
        all: bool,
    }
    serde_json::from_slice::<Probe>(payload).is_ok_and(|p| p.all)
}

fn list(
    entitlements: &Entitlements,
    partition: u16,
    total: u16,
    token: &str,
    payload: &[u8],
) -> std::result::Result<ListReply, CheckError> {
    let request: ListRequest = serde_json::from_slice(payload).map_err(|e| CheckError {
        error: format!("not a listing request: {e}"),
        field: None,
    })?;
    sent_for(token, &request.customer)?;
    list_request(entitlements, partition, total, request)
}

fn list_request(
    entitlements: &Entitlements,
    partition: u16,
    total: u16,
    request: ListRequest,
) -> std::result::Result<ListReply, CheckError> {
    let features = {
        let engine = entitlements.engine(partition).ok_or_else(|| CheckError {
            error: format!("partition {partition} is not owned here"),
            field: None,
        })?;
        engine.features_of(&request.customer)
    };
    let mut replies = Vec::with_capacity(features.len());
    for feature in features {
        let one = CheckRequest {
            customer: request.customer.clone(),
            feature,
            quantity: 1.0,
            time: request.time,
            region: None,
            user: None,
        };
        replies.push(answer_request(entitlements, partition, total, one)?);
    }
    let known = entitlements
        .engine(partition)
        .is_some_and(|e| e.customer(&request.customer).is_some());
    Ok(ListReply {
        customer: request.customer,
        known,
        features: replies,
    })
}

/// Reads a request, naming the field of the first flaw.
fn parse(payload: &[u8]) -> std::result::Result<CheckRequest, CheckError> {
    let flaw = |field: &str, error: String| CheckError {
        error,
        field: Some(field.to_owned()),
    };
    let value: Value = serde_json::from_slice(payload).map_err(|e| CheckError {
        error: format!("not JSON: {e}"),
        field: None,
    })?;
    let Value::Object(object) = value else {
        return Err(CheckError {
            error: "a check request is a JSON object".to_owned(),
            field: None,
        });
    };
    let text = |name: &str, required: bool| -> std::result::Result<Option<String>, CheckError> {
        match object.get(name) {
            None | Some(Value::Null) if required => {
                Err(flaw(name, format!("`{name}` is required")))
            }
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if required && s.is_empty() => {
                Err(flaw(name, format!("`{name}` must not be empty")))
            }
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(flaw(
                name,
                format!("`{name}` must be a string, not {other}"),
            )),
        }
    };
    if let Some(unknown) = object.keys().find(|k| {
        !["customer", "feature", "quantity", "time", "region", "user"].contains(&k.as_str())
    }) {
        return Err(flaw(unknown, format!("unknown field `{unknown}`")));
    }
    let quantity = match object.get("quantity") {
        None | Some(Value::Null) => 1.0,
        Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        Some(other) => {
            return Err(flaw(
                "quantity",
                format!("`quantity` must be a number, not {other}"),
            ));
        }
    };
    let time = text("time", false)?
        .map(|t| {
            DateTime::parse_from_rfc3339(&t)
                .map(|t| t.to_utc())
                .map_err(|e| flaw("time", format!("`time` is not RFC 3339: {e}")))
        })
        .transpose()?;
    Ok(CheckRequest {
        customer: text("customer", true)?.unwrap_or_default(),
        feature: text("feature", true)?.unwrap_or_default(),
        quantity,
        time,
        region: text("region", false)?,
        user: text("user", false)?,
    })
}

/// Asks the owning worker; `Err` when no worker answers in time or the request was refused.
pub async fn check(
    client: &Client,
    partitions: u16,
    request: &CheckRequest,
    timeout: Duration,
) -> Result<CheckReply> {
    ask(client, partitions, &request.customer, request, timeout).await
}

/// Checks answered in the process that owns the customer's partition, without a round
/// trip through NATS: what an API server running beside the worker (`tally serve`) asks
/// first. A partition counts as owned here from the moment its requests are subscribed
/// to until its task ends — when NATS would route the request here too. When the worker
/// starts its partitions again on a new partition count, it puts that generation's
/// partitions in the same `LocalChecks` ([`LocalChecks::replace`]).
#[derive(Clone)]
pub struct LocalChecks {
    current: Arc<std::sync::RwLock<Arc<LocalPartitions>>>,
}

/// The partitions of one worker generation answering in-process.
pub(crate) struct LocalPartitions {
    entitlements: Arc<Entitlements>,
    answering: Arc<[std::sync::atomic::AtomicBool]>,
    total: u16,
}

impl std::fmt::Debug for LocalChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalChecks").finish_non_exhaustive()
    }
}

impl LocalPartitions {
    pub(crate) fn new(entitlements: Arc<Entitlements>, total: u16) -> Arc<Self> {
        Arc::new(Self {
            entitlements,
            answering: (0..total)
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
            total,
        })
    }

    /// Marks a partition as answered here (or no longer).
    pub(crate) fn set_answering(&self, partition: u16, answering: bool) {
        if let Some(flag) = self.answering.get(usize::from(partition)) {
            flag.store(answering, std::sync::atomic::Ordering::Release);
        }
    }

    fn owner(&self, customer: &str) -> Option<u16> {
        let partition = partition_of(customer, self.total);
        self.answering
            .get(usize::from(partition))?
            .load(std::sync::atomic::Ordering::Acquire)
            .then_some(partition)
    }
}

impl LocalChecks {
    pub(crate) fn new(partitions: Arc<LocalPartitions>) -> Self {
        Self {
            current: Arc::new(std::sync::RwLock::new(partitions)),
        }
    }

    /// Answers from `partitions` from now on.
    pub(crate) fn replace(&self, partitions: Arc<LocalPartitions>) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = partitions;
    }

    fn current(&self) -> Arc<LocalPartitions> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The answer, if this process owns the customer's partition; `None` otherwise.
    pub fn check(&self, request: &CheckRequest) -> Option<Result<CheckReply>> {
        let local = self.current();
        let partition = local.owner(&request.customer)?;
        Some(
            answer_request(&local.entitlements, partition, local.total, request.clone())
                .map_err(refused),
        )
    }

    /// Every feature, if this process owns the customer's partition; `None` otherwise.
    pub fn check_all(&self, request: &ListRequest) -> Option<Result<ListReply>> {
        let local = self.current();
        let partition = local.owner(&request.customer)?;
        Some(
            list_request(&local.entitlements, partition, local.total, request.clone())
                .map_err(refused),
        )
    }
}

fn refused(error: CheckError) -> Error {
    Error::Refused {
        message: error.error,
        field: error.field,
    }
}

/// Checks every feature of a customer with the owning worker.
pub async fn check_all(
    client: &Client,
    partitions: u16,
    request: &ListRequest,
    timeout: Duration,
) -> Result<ListReply> {
    ask(client, partitions, &request.customer, request, timeout).await
}

/// Sends a check request to `customer`'s partition: its answer, or the refusal.
async fn ask<R: DeserializeOwned>(
    client: &Client,
    partitions: u16,
    customer: &str,
    request: &impl Serialize,
    timeout: Duration,
) -> Result<R> {
    let body = serde_json::to_vec(request).map_err(|e| Error::Check(e.to_string()))?;
    let subject = check_subject(customer, partitions);
    let reply = ask_owner(client, subject, body.into(), timeout, "check").await?;
    if let Ok(answer) = serde_json::from_slice::<R>(&reply.payload) {
        return Ok(answer);
    }
    let error: CheckError = serde_json::from_slice(&reply.payload)
        .map_err(|e| Error::Check(format!("unreadable check reply: {e}")))?;
    Err(refused(error))
}

/// Sends a request to the worker owning a partition and waits up to `timeout` for its
/// answer. While a partition changes hands (a worker starting, stopping or taking over)
/// nobody may be subscribed for a moment: "no responders" is retried until the deadline.
pub(crate) async fn ask_owner(
    client: &Client,
    subject: String,
    body: bytes::Bytes,
    timeout: Duration,
    what: &'static str,
) -> Result<async_nats::Message> {
    use async_nats::client::RequestErrorKind;
    let deadline = tokio::time::Instant::now() + timeout;
    let late = || Error::Unanswered(format!("no worker answered within {timeout:?}"));
    let mut pause = Duration::from_millis(10);
    loop {
        let request = client.request(subject.clone(), body.clone());
        match tokio::time::timeout_at(deadline, request).await {
            Err(_) => return Err(late()),
            Ok(Ok(reply)) => return Ok(reply),
            Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => {
                if tokio::time::Instant::now() + pause >= deadline {
                    return Err(late());
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            Ok(Err(e)) => return Err(Error::nats(what, e)),
        }
    }
}
