//! The SDK's one error type, and what happened to events that could not be delivered.

use std::fmt;
use std::sync::Arc;

use crate::event::Event;

/// `Result` with the SDK's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the SDK can fail with. [`Error::is_retryable`] says whether the same call may
/// succeed later; the others are bad input or a refusal that will not change by itself.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The options cannot work (bad input).
    #[error("invalid options: {0}")]
    Options(String),
    /// An event the server would refuse, caught before it was buffered (bad input).
    #[error("invalid event: {message}")]
    InvalidEvent {
        /// The field at fault, as a dotted path (`data.quantity`), when one is.
        field: Option<String>,
        /// What is wrong, in words.
        message: String,
    },
    /// The buffer holds its capacity of events: `try_record` does not wait (retryable).
    #[error("the buffer is full ({capacity} events waiting to be sent)")]
    BufferFull {
        /// The buffer's capacity.
        capacity: usize,
    },
    /// The client was shut down: it records nothing more.
    #[error("the client is shut down")]
    Closed,
    /// NATS or the HTTP API could not be reached, or did not answer in time (retryable).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The HTTP API refused the request with a 4xx status (bad input, or a key without
    /// the role or the customer).
    #[error("refused with HTTP {status}: {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The problem's detail, or the body.
        message: String,
    },
    /// The worker could not check the request (`{"error", "field"}` reply; bad input).
    #[error("check refused: {message}")]
    Check {
        /// What is wrong with the request.
        message: String,
        /// The field at fault, when one is.
        field: Option<String>,
    },
    /// Events recorded through this client were not delivered since the last `flush`:
    /// refused by the server or given up after retrying. Each batch was also handed to
    /// the failure handler ([`crate::Options::on_failure`]) with its events.
    #[error("{failed} event(s) not delivered; the last reason: {reason}")]
    Undelivered {
        /// How many events.
        failed: u64,
        /// Why the last of them failed.
        reason: String,
    },
    /// An answer that is not what the protocol says (internal).
    #[error("unexpected answer: {0}")]
    Protocol(String),
}

impl Error {
    /// Whether the same call may succeed later (the server may come back, the buffer
    /// drain); `false` for bad input and refusals.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::BufferFull { .. } | Error::Unavailable(_) | Error::Undelivered { .. }
        )
    }
}

/// Events that were not delivered, handed to the failure handler.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The events, with the ids and times they were recorded with: sending them again
    /// later (with [`crate::Client::record_event`]) keeps their ids, so nothing is counted
    /// twice.
    pub events: Vec<Event>,
    /// Why.
    pub kind: FailureKind,
    /// The server's or the transport's words.
    pub reason: String,
}

/// Why events were not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The server refused them (an HTTP 4xx: a bad event, a key without the role). Not
    /// retried: sending them again would be refused again.
    Refused,
    /// Retried for [`crate::Options::retry_timeout`] without an acknowledgement.
    GaveUp,
}

/// The function called with each [`Failure`] (see [`crate::Options::on_failure`]).
#[derive(Clone)]
pub struct FailureHandler(pub(crate) Arc<dyn Fn(&Failure) + Send + Sync>);

impl FailureHandler {
    /// Wraps a function.
    pub fn new(f: impl Fn(&Failure) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
}

impl fmt::Debug for FailureHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FailureHandler(..)")
    }
}

/// An error and its causes, `outer: cause: …`: a `reqwest` error names why a connection
/// failed (a certificate no trusted CA signed, a refused connection) only among its
/// sources.
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut last = text.clone();
    let mut source = e.source();
    while let Some(cause) = source {
        let words = cause.to_string();
        // Wrappers often repeat their inner error's words.
        if !last.contains(&words) {
            text.push_str(": ");
            text.push_str(&words);
        }
        last = words;
        source = cause.source();
    }
    text
}
