//! The background task behind a [`crate::Client`]: it takes recorded events from the
//! bounded buffer, sends them every `flush_interval` or at `batch_size`, and retries a
//! failed send with backoff, the same events with the same ids, until it is acknowledged
//! or `retry_timeout` passes. While it sends, it takes nothing from the buffer: a buffer
//! that fills makes `record` wait (backpressure).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};

use crate::error::{Error, Failure, FailureHandler, FailureKind, Result};
use crate::event::Stamped;
use crate::transport::{Http, Nats, Posted, Transport};

/// What the client asks of the task, in order. Nearly every command is a `Record`, so
/// boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Command {
    Record(Stamped),
    /// Send everything recorded before it; answer with the failures since the last answer.
    Flush(oneshot::Sender<Result<()>>),
    /// Send everything, answer, and stop.
    Shutdown(oneshot::Sender<Result<()>>),
}

/// Counters shared with the client.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) recorded: AtomicU64,
    pub(crate) sent: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retries: AtomicU64,
}

/// How the task sends.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub(crate) batch_size: usize,
    pub(crate) flush_interval: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) retry_initial: Duration,
    pub(crate) retry_max: Duration,
    pub(crate) retry_timeout: Duration,
    pub(crate) on_failure: Option<FailureHandler>,
}

pub(crate) struct Flusher {
    pub(crate) rx: mpsc::Receiver<Command>,
    pub(crate) transport: Arc<Transport>,
    pub(crate) policy: Policy,
    pub(crate) counters: Arc<Counters>,
    pub(crate) pending: Vec<Stamped>,
    failed_since: u64,
    last_reason: Option<String>,
}

impl Flusher {
    pub(crate) fn new(
        rx: mpsc::Receiver<Command>,
        transport: Arc<Transport>,
        policy: Policy,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            rx,
            transport,
            policy,
            counters,
            pending: Vec::new(),
            failed_since: 0,
            last_reason: None,
        }
    }

    pub(crate) async fn run(mut self) {
        let every = self.policy.flush_interval;
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = self.rx.recv() => match command {
                    Some(Command::Record(event)) => {
                        self.pending.push(event);
                        if self.pending.len() >= self.policy.batch_size {
                            self.send().await;
                        }
                    }
                    Some(Command::Flush(done)) => {
                        self.send().await;
                        let _ = done.send(self.outcome());
                    }
                    Some(Command::Shutdown(done)) => {
                        // Whatever was recorded before the channel closed is sent too.
                        self.rx.close();
                        while let Some(command) = self.rx.recv().await {
                            self.take(command);
                        }
                        self.send().await;
                        let _ = done.send(self.outcome());
                        return;
                    }
                    // The client was dropped: the best-effort final flush.
                    None => {
                        self.send().await;
                        return;
                    }
                },
                _ = tick.tick() => {
                    if !self.pending.is_empty() {
                        self.send().await;
                    }
                }
            }
        }
    }

    /// A command that arrived after `Shutdown`: its events are sent, its caller told.
    fn take(&mut self, command: Command) {
        match command {
            Command::Record(event) => self.pending.push(event),
            Command::Flush(done) | Command::Shutdown(done) => {
                let _ = done.send(Err(Error::Closed));
            }
        }
    }

    /// The failures since the last answer, reset.
    fn outcome(&mut self) -> Result<()> {
        let failed = std::mem::take(&mut self.failed_since);
        match (failed, self.last_reason.take()) {
            (0, _) => Ok(()),
            (failed, reason) => Err(Error::Undelivered {
                failed,
                reason: reason.unwrap_or_default(),
            }),
        }
    }

    async fn send(&mut self) {
        let events = std::mem::take(&mut self.pending);
        if events.is_empty() {
            return;
        }
        let transport = self.transport.clone();
        match &*transport {
            Transport::Nats(nats) => self.send_nats(nats, events).await,
            Transport::Http(http) => {
                for request in Http::requests(events) {
                    self.send_http(http, request).await;
                }
            }
        }
    }

    async fn send_nats(&mut self, nats: &Nats, events: Vec<Stamped>) {
        let mut messages = nats.messages(events);
        let mut backoff = Backoff::new(&self.policy);
        loop {
            let outcomes = nats.publish(&messages, self.policy.request_timeout).await;
            let mut unsent = Vec::new();
            let mut reason = String::new();
            for (message, outcome) in messages.into_iter().zip(outcomes) {
                match outcome {
                    Ok(()) => self.delivered(message.events.len()),
                    Err(e) => {
                        reason = e;
                        unsent.push(message);
                    }
                }
            }
            if unsent.is_empty() {
                return;
            }
            messages = unsent;
            if !self.wait(&mut backoff, &reason).await {
                let events = messages.into_iter().flat_map(|m| m.events).collect();
                self.fail(FailureKind::GaveUp, events, reason);
                return;
            }
        }
    }

    async fn send_http(&mut self, http: &Http, mut events: Vec<Stamped>) {
        let mut backoff = Backoff::new(&self.policy);
        while !events.is_empty() {
            let posted = http.post(&events, self.policy.request_timeout).await;
            match posted {
                Ok(Posted::Accepted) => {
                    self.delivered(events.len());
                    return;
                }
                // Nothing was stored: the bad event is reported, the rest sent again.
                Ok(Posted::BadEvent { index, reason }) if index < events.len() => {
                    let bad = events.remove(index);
                    self.fail(FailureKind::Refused, vec![bad], reason);
                }
                Ok(Posted::BadEvent { reason, .. } | Posted::Refused(reason)) => {
                    self.fail(FailureKind::Refused, events, reason);
                    return;
                }
                Err(e) => {
                    self.fail(FailureKind::Refused, events, e.to_string());
                    return;
                }
                Ok(Posted::Transient(reason)) => {
                    if !self.wait(&mut backoff, &reason).await {
                        self.fail(FailureKind::GaveUp, events, reason);
                        return;
                    }
                }
            }
        }
    }

    /// Sleeps before the next attempt; `false` once `retry_timeout` would be passed.
    async fn wait(&self, backoff: &mut Backoff, reason: &str) -> bool {
        let Some(delay) = backoff.next() else {
            return false;
        };
        self.counters.retries.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            reason,
            retry_in_ms = delay.as_millis() as u64,
            "events not acknowledged; retrying"
        );
        tokio::time::sleep(delay).await;
        true
    }

    fn delivered(&self, events: usize) {
        self.counters
            .sent
            .fetch_add(events as u64, Ordering::Relaxed);
    }

    fn fail(&mut self, kind: FailureKind, events: Vec<Stamped>, reason: String) {
        let n = events.len() as u64;
        self.counters.failed.fetch_add(n, Ordering::Relaxed);
        self.failed_since += n;
        tracing::error!(events = n, ?kind, reason = %reason, "events not delivered");
        if let Some(handler) = &self.policy.on_failure {
            (handler.0)(&Failure {
                events: events.into_iter().map(|s| s.event).collect(),
                kind,
                reason: reason.clone(),
            });
        }
        self.last_reason = Some(reason);
    }
}

/// Delays doubling from `retry_initial` to `retry_max`, until `retry_timeout` has passed.
struct Backoff {
    next: Duration,
    max: Duration,
    deadline: Instant,
}

impl Backoff {
    fn new(policy: &Policy) -> Self {
        Self {
            next: policy.retry_initial,
            max: policy.retry_max,
            deadline: Instant::now() + policy.retry_timeout,
        }
    }

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        if Instant::now() + delay > self.deadline {
            return None;
        }
        self.next = (delay * 2).min(self.max);
        Some(delay)
    }
}
