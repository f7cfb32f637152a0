//! One error shape for every route: RFC 9457 problem details (`application/problem+json`).
//!
//! A 4xx names what was wrong (and the field, and the event's index in a batch); a 5xx
//! says only that something failed on the server and the request id to find it in the
//! log, where the cause is written.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem (`urn:tally:problem:<code>`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The kind, in words.
    pub title: String,
    pub status: u16,
    /// What was wrong with this request.
    pub detail: String,
    /// The request field at fault, as a dotted path (`data.quantity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The index of the event at fault in a batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// The key's limit a 429 is about: `requests` or `bytes` (per second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
}

/// An error a handler returns; becomes a problem-details response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    detail: String,
    field: Option<String>,
    index: Option<usize>,
    retry_after: Option<u32>,
    limit: Option<&'static str>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            field: None,
            index: None,
            retry_after: None,
            limit: None,
        }
    }

    /// 400: the request is malformed; `field` names what is wrong.
    pub fn bad_request(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", detail).field(field)
    }

    /// 400 with a reason code of its own (an event's `Reason`).
    pub fn invalid(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    /// 401: no key, or one that is not valid.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }

    /// 403: the key is valid but may not do this.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }

    /// 413: the body (or the batch) is larger than the limit.
    pub fn too_large(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", detail)
    }

    pub fn unsupported_media_type(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            detail,
        )
        .field("content-type")
    }

    pub fn not_acceptable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_ACCEPTABLE, "not_acceptable", detail).field("accept")
    }

    /// 429 with `Retry-After` (whole seconds): the key is over its `limit` (`requests` or
    /// `bytes`); the same request passes after that long if the key sends nothing else.
    pub fn rate_limited(
        limit: &'static str,
        retry_after_secs: u32,
        detail: impl Into<String>,
    ) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", detail);
        e.retry_after = Some(retry_after_secs.max(1));
        e.limit = Some(limit);
        e
    }

    /// 503 with `Retry-After`: NATS (or the worker owning a partition) is not reachable
    /// now; the same request may be sent again.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail);
        e.retry_after = Some(1);
        e
    }

    /// 504: the work did not finish within its time limit.
    pub fn timeout(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", detail)
    }

    /// 500: logged with its cause; the response says only that it failed.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        let id = uuid_like();
        tracing::error!(error_id = %id, error = %cause, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the server failed to answer; the log names the cause under error id {id}"),
        )
    }

    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn index(mut self, index: usize) -> Self {
        self.index = Some(index);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The problem body this error is sent as.
    pub fn problem(&self) -> Problem {
        Problem {
            kind: format!("urn:tally:problem:{}", self.code),
            title: self.status.canonical_reason().unwrap_or("Error").to_owned(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            field: self.field.clone(),
            index: self.index,
            limit: self.limit.map(str::to_owned),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<tally_ingest::Error> for ApiError {
    fn from(e: tally_ingest::Error) -> Self {
        use tally_ingest::Error as E;
        match e {
            E::Refused { message, field } => {
                let e = ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message);
                match field {
                    Some(f) => e.field(f),
                    None => e,
                }
            }
            E::Unanswered(what) => ApiError::unavailable(format!(
                "{what}: no worker owns this customer's partition right now, or NATS is unavailable"
            )),
            E::Nats { what, source } => {
                tracing::warn!(what, error = %source, "nats unavailable");
                ApiError::unavailable(format!("NATS is unavailable ({what})"))
            }
            other => ApiError::internal(other),
        }
    }
}

/// A short random id tying a 500 to its log line.
fn uuid_like() -> String {
    format!("{:016x}", rand::random::<u64>())
}
