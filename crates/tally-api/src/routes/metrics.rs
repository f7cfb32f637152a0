//! The process's metrics for Prometheus, and the middleware that counts HTTP requests.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tally_core::metrics as names;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::error::ApiError;

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(metrics))
}

/// The metrics in the Prometheus text format (names in `tally_core::metrics`). No key:
/// scrape it from inside the deployment's network.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String),
        (status = 404, description = "This process records no metrics", body = crate::Problem),
    ))]
async fn metrics(State(state): State<AppState>) -> Response {
    match state.metrics.get() {
        Some(render) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            )],
            render(),
        )
            .into_response(),
        None => ApiError::not_found("this process records no metrics").into_response(),
    }
}

/// Counts each request by its route template and status, and times it (to the response
/// head). One registry lookup per request; the labels are the router's own templates.
pub(crate) async fn track(path: MatchedPath, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    let route = path.as_str().to_owned();
    metrics::histogram!(names::HTTP_REQUEST_SECONDS, "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!(
        names::HTTP_REQUESTS,
        "route" => route,
        "status" => response.status().as_str().to_owned()
    )
    .increment(1);
    response
}
