//! Liveness and readiness.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use tally_ingest::ownership::{LEASES_BUCKET, lease_key};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
}

/// The process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// What readiness found.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    pub nats: bool,
    /// Partitions with a live owner, of `partitions`.
    pub partitions_owned: u16,
    pub partitions: u16,
    /// What is missing, in words.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// Ready to serve: NATS reachable, and every partition owned by a live worker (so checks
/// and events are answered).
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    use async_nats::connection::State as Connection;
    let mut problems = Vec::new();
    let nats = state.client.connection_state() == Connection::Connected;
    if !nats {
        problems.push("NATS is not connected".to_owned());
    }
    let mut owned = 0;
    let partitions = state.partitions();
    if nats {
        match state.js.get_key_value(LEASES_BUCKET).await {
            Ok(leases) => {
                for p in 0..partitions {
                    if let Ok(Some(_)) = leases.get(lease_key(p)).await {
                        owned += 1;
                    }
                }
            }
            Err(e) => problems.push(format!("cannot read the partition leases: {e}")),
        }
        if owned < partitions {
            problems.push(format!(
                "{} of {} partitions have no live worker (tally serve or tally worker)",
                partitions - owned,
                partitions
            ));
        }
    }
    let ready = problems.is_empty();
    (
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(Readiness {
            status: if ready { "ready" } else { "not_ready" },
            nats,
            partitions_owned: owned,
            partitions,
            problems,
        }),
    )
}
