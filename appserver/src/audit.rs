//! The session audit: every live client connection has its row in the
//! registry's `sessions` table, which is how senders find it.
//!
//! A row can go missing while its connection lives: an exchange that
//! restarted gives the servers it served one lease to come back, and marks
//! down (deleting their rows) a server that reaches it a moment too late,
//! although that server and its connections never stopped. So after every
//! registration with the exchange, and every `session_audit_ms`,
//! [`Connections::audit`] writes the missing rows back (with each
//! connection's status) and deletes rows no connection has; the presence
//! of the users concerned is recomputed and announced like any other
//! change. A failed audit is retried after a second.

use crate::LinkState;
use crate::connections::Connections;
use crate::presence::Presence;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How soon a failed audit is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// Runs until `stop`.
pub async fn audit_loop(
    connections: Arc<Connections>,
    presence: Arc<Presence>,
    mut link: watch::Receiver<LinkState>,
    period: Duration,
    stop: CancellationToken,
) {
    let mut seen = link.borrow().registrations;
    let mut next = tokio::time::Instant::now() + period;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
            r = link.changed() => {
                if r.is_err() {
                    return;
                }
                let now = link.borrow_and_update().registrations;
                if now == seen {
                    continue;
                }
                seen = now;
            }
        }
        next = match connections.audit().await {
            Ok(audit) => {
                debug!(
                    restored = audit.restored,
                    removed = audit.removed,
                    "sessions audited"
                );
                presence
                    .sessions_repaired(&audit.changed, &audit.removed_users)
                    .await;
                tokio::time::Instant::now() + period
            }
            Err(e) => {
                connections.note_audit_failure();
                warn!(error = %e, "session audit failed; retrying");
                tokio::time::Instant::now() + RETRY.min(period)
            }
        };
    }
}
