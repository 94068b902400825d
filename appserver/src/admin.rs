//! The loopback HTTP API: `/metrics`, and `POST /admin/send`, which sends a
//! text message from a user to users wherever they are connected (the demo
//! and operators' smoke tests use it). Bind it to loopback only.
//!
//! The request and response JSON are `iim_http::admin`'s, shared with the
//! API's clients; this module owns the handlers.

use crate::metrics::AppMetrics;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use iim::types::UserId;
use iim::{Iim, Outgoing};
use iim_http::admin::{
    HEALTH_PATH, MAX_RECIPIENTS, SEND_PATH, SendRequest, SendResponse, ServerOutcome,
};
use std::sync::Arc;

/// Message kind of text sent through the admin API: a notice, reserved
/// by iim (`iim::kinds`).
pub const KIND_ADMIN_TEXT: u16 = iim::kinds::NOTICE;

#[derive(Clone)]
struct AdminState {
    iim: Iim,
}

pub fn router(iim: Iim, metrics: Arc<AppMetrics>) -> Router {
    let admin = Router::new()
        .route(SEND_PATH, post(send))
        .route(HEALTH_PATH, get(|| async { "ok" }))
        .with_state(AdminState { iim });
    iim_http::server::metrics_router(metrics).merge(admin)
}

async fn send(
    State(st): State<AdminState>,
    Json(req): Json<SendRequest>,
) -> Result<Json<SendResponse>, (StatusCode, String)> {
    if req.to.len() > MAX_RECIPIENTS {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("at most {MAX_RECIPIENTS} recipients"),
        ));
    }
    let users: Vec<UserId> = req.to.iter().map(|u| UserId(*u)).collect();
    let sessions = st
        .iim
        .user_list(&users)
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("registry: {e}")))?;
    let msg = Outgoing {
        kind: KIND_ADMIN_TEXT,
        from: UserId(req.from),
        body: Bytes::from(req.text.into_bytes()),
        ..Default::default()
    };
    let report = st
        .iim
        .send(msg, &sessions)
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(Json(SendResponse {
        id: report.id.to_string(),
        sessions: sessions.len(),
        local_delivered: report.local.delivered,
        local_missing: report.local.missing,
        servers: report
            .servers
            .iter()
            .map(|(s, st)| ServerOutcome {
                server: s.0,
                status: st.as_str().to_string(),
            })
            .collect(),
    }))
}
