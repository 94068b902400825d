//! The app server's counters, rendered at `/metrics`: the relay's and the
//! gateway's ([`AppMetrics`]), the chat service's ([`ChatMetrics`]), the
//! presence service's ([`PresenceMetrics`]) and offline push's
//! ([`OfflineMetrics`]). Counters only: of the app
//! server it uses nothing but the enums its label sets come from
//! ([`crate::codes`]), so every other module may count here.

use crate::codes::{AdminRefusal, AuthFailure, CloseReason, ConnLimit, ErrorCode, Op};
use iim::metrics::{Counter, Family, Gauge, Page, Render};
use std::sync::Arc;

pub use iim_core::link::metrics::REJECT_REASONS;

#[derive(Debug)]
pub struct AppMetrics {
    /// The chat service's own counters.
    pub chat: Arc<ChatMetrics>,
    /// The presence service's own counters.
    pub presence: Arc<PresenceMetrics>,
    /// Read receipts' and typing indicators' counters.
    pub receipts: Arc<ReceiptMetrics>,
    /// The link to the exchange's own counters.
    pub link: Arc<iim_core::link::LinkMetrics>,
    /// Offline push's own counters.
    pub offline: Arc<OfflineMetrics>,
    pub local_deliveries: Counter,
    pub missing_channels: Counter,
    pub connection_overflow: Counter,
    /// Session rows written back for live connections by the audit.
    pub sessions_restored: Counter,
    /// Session rows without a live connection, deleted by the audit.
    pub sessions_removed: Counter,
    /// Audits that could not finish (registry errors); retried.
    pub session_audit_failures: Counter,
    /// Messages of a reserved kind whose body could not be decoded.
    pub malformed_pushes: Counter,
    /// Chat messages whose envelope names another sender than their source.
    pub forged_pushes: Counter,
    pub connections: Gauge,
    pub ws_connections: Gauge,
    /// When this server's certificate expires, Unix seconds (0: unknown);
    /// rendered as the seconds left.
    pub certificate_not_after: Gauge,
    /// The registry's database, for its node metrics (set at start).
    pub database: std::sync::OnceLock<iim::registry::Db>,
    pub auth_failures: Family,
    pub client_errors: Family,
    pub client_ops: Family,
    pub ws_closes: Family,
    pub admin_refusals: Family,
    pub conn_limits: Family,
}

impl Default for AppMetrics {
    fn default() -> Self {
        AppMetrics {
            chat: Default::default(),
            presence: Default::default(),
            receipts: Default::default(),
            link: Default::default(),
            offline: Default::default(),
            local_deliveries: Counter::default(),
            missing_channels: Counter::default(),
            connection_overflow: Counter::default(),
            sessions_restored: Counter::default(),
            sessions_removed: Counter::default(),
            session_audit_failures: Counter::default(),
            malformed_pushes: Counter::default(),
            forged_pushes: Counter::default(),
            connections: Gauge::default(),
            ws_connections: Gauge::default(),
            certificate_not_after: Gauge::default(),
            database: std::sync::OnceLock::new(),
            auth_failures: Family::new("reason", AuthFailure::LABELS),
            client_errors: Family::new("code", ErrorCode::LABELS),
            client_ops: Family::new("op", Op::LABELS),
            ws_closes: Family::new("reason", CloseReason::LABELS),
            admin_refusals: Family::new("reason", AdminRefusal::LABELS),
            conn_limits: Family::new("reason", ConnLimit::LABELS),
        }
    }
}

impl Render for AppMetrics {
    fn render(&self) -> String {
        let mut p = Page::default();
        p.counter(
            "iim_appserver_local_deliveries_total",
            "Messages handed to local connections.",
            &self.local_deliveries,
        )
        .counter(
            "iim_appserver_missing_channels_total",
            "Listed connections that no longer exist here.",
            &self.missing_channels,
        )
        .counter(
            "iim_appserver_connection_overflow_total",
            "Local connections cut for not keeping up.",
            &self.connection_overflow,
        )
        .counter(
            "iim_appserver_sessions_restored_total",
            "Session rows the registry had lost for live connections (e.g. a mark-down while this server was alive), written back by the audit.",
            &self.sessions_restored,
        )
        .counter(
            "iim_appserver_sessions_removed_total",
            "Session rows without a live connection, deleted by the audit.",
            &self.sessions_removed,
        )
        .counter(
            "iim_appserver_session_audit_failures_total",
            "Session audits that failed on a registry error (retried).",
            &self.session_audit_failures,
        )
        .counter(
            "iim_appserver_malformed_pushes_total",
            "Messages of a kind reserved by iim (chat) whose body could not be decoded; not delivered.",
            &self.malformed_pushes,
        )
        .counter(
            "iim_appserver_forged_pushes_total",
            "Chat messages not delivered: their envelope names another sender than the message's source user.",
            &self.forged_pushes,
        )
        .gauge(
            "iim_appserver_connections",
            "Local client connections.",
            &self.connections,
        )
        .gauge(
            "iim_appserver_ws_connections",
            "Open client WebSocket connections, authenticated or not.",
            &self.ws_connections,
        )
        .family(
            "iim_appserver_auth_failures_total",
            "Client WebSocket authentications refused, by reason.",
            &self.auth_failures,
        )
        .family(
            "iim_appserver_client_errors_total",
            "Error frames sent to clients, by code.",
            &self.client_errors,
        )
        .family(
            "iim_appserver_client_ops_total",
            "Client requests handled, by op.",
            &self.client_ops,
        )
        .family(
            "iim_appserver_ws_closes_total",
            "Client connections ended, by reason.",
            &self.ws_closes,
        )
        .family(
            "iim_appserver_admin_refusals_total",
            "Admin API calls refused, by reason.",
            &self.admin_refusals,
        )
        .family(
            "iim_appserver_connections_refused_total",
            "Client connections refused or dropped by the gateway's limits, by reason.",
            &self.conn_limits,
        );
        let not_after = self.certificate_not_after.get();
        if not_after != 0 {
            let left = Gauge::default();
            left.set(not_after - iim::tls::now_unix());
            p.gauge(
                "iim_appserver_certificate_expiry_seconds",
                "Seconds until this server's own certificate expires (negative once expired).",
                &left,
            );
        }
        let mut page = p.finish();
        if let Some(db) = self.database.get() {
            page.push_str(&db.render_metrics("iim_appserver"));
        }
        page.push_str(&self.link.render());
        page.push_str(&self.chat.render());
        page.push_str(&self.presence.render());
        page.push_str(&self.offline.render());
        page.push_str(&self.receipts.render());
        page
    }
}

/// Read receipts' and typing indicators' counters.
#[derive(Debug, Default)]
pub struct ReceiptMetrics {
    /// `read` requests that moved a position forward.
    pub moved: Counter,
    /// `read` requests at or below the stored position.
    pub unchanged: Counter,
    /// Receipts handed to the relay, one per connection.
    pub receipts: Counter,
    /// Typing indicators handed to the relay, one per connection.
    pub typing: Counter,
    /// `typing` requests over the connection's typing rate.
    pub typing_limited: Counter,
    /// `read` and `typing` requests refused for a sequence beyond the
    /// latest or a group too large for them.
    pub refused: Counter,
    /// Receipt or typing pushes lost to a failed sessions look-up or the
    /// relay's refusal.
    pub dropped: Counter,
}

impl Render for ReceiptMetrics {
    fn render(&self) -> String {
        let mut p = Page::default();
        p.counter(
            "iim_receipts_reads_moved_total",
            "read requests that moved the reader's position forward.",
            &self.moved,
        )
        .counter(
            "iim_receipts_reads_unchanged_total",
            "read requests at or below the stored position (nothing pushed).",
            &self.unchanged,
        )
        .counter(
            "iim_receipts_pushed_total",
            "Read receipts handed to the relay, one per receiving connection.",
            &self.receipts,
        )
        .counter(
            "iim_receipts_typing_pushed_total",
            "Typing indicators handed to the relay, one per receiving connection.",
            &self.typing,
        )
        .counter(
            "iim_receipts_typing_rate_limited_total",
            "typing requests refused over the connection's typing rate.",
            &self.typing_limited,
        )
        .counter(
            "iim_receipts_refused_total",
            "read and typing requests refused: a sequence beyond the latest, or a group too large.",
            &self.refused,
        )
        .counter(
            "iim_receipts_dropped_total",
            "Receipt or typing pushes lost (sessions look-up failed, relay refused); positions stay stored.",
            &self.dropped,
        );
        p.finish()
    }
}

/// The chat service's counters.
#[derive(Debug, Default)]
pub struct ChatMetrics {
    pub stored: Counter,
    pub duplicates: Counter,
    pub pushes: Counter,
    pub pushes_dropped: Counter,
    /// Transactions of sends (each one batch).
    pub store_batches: Counter,
    /// Sends stored by those transactions.
    pub store_batched: Counter,
    /// Batches stored send by send after their transaction failed.
    pub store_fallbacks: Counter,
    /// `sync_needed` frames sent (one per connection) for dropped pushes.
    pub sync_needed: Counter,
    /// Users owed a `sync_needed` who could not be remembered (too many).
    pub sync_needed_lost: Counter,
}

impl Render for ChatMetrics {
    fn render(&self) -> String {
        let mut p = Page::default();
        p.counter(
            "iim_chat_messages_stored_total",
            "Chat messages stored (first sends).",
            &self.stored,
        )
        .counter(
            "iim_chat_resends_total",
            "Sends recognised as resends of a stored req.",
            &self.duplicates,
        )
        .counter(
            "iim_chat_pushes_total",
            "Chat pushes handed to the relay.",
            &self.pushes,
        )
        .counter(
            "iim_chat_pushes_dropped_total",
            "Pushes dropped (queue full, sessions unavailable, refused by the relay); their recipients are sent sync_needed.",
            &self.pushes_dropped,
        )
        .counter(
            "iim_chat_store_batches_total",
            "Batches of sends stored (one transaction each, unless a batch fell back to one per send).",
            &self.store_batches,
        )
        .counter(
            "iim_chat_store_batch_sends_total",
            "Sends handed to the store in those batches.",
            &self.store_batched,
        )
        .counter(
            "iim_chat_store_batch_fallbacks_total",
            "Batches stored send by send (a transaction each) because their batch transaction or their duplicate check failed.",
            &self.store_fallbacks,
        )
        .counter(
            "iim_chat_sync_needed_total",
            "sync_needed hints submitted to connections whose chat pushes were dropped.",
            &self.sync_needed,
        )
        .counter(
            "iim_chat_sync_needed_lost_total",
            "Users owed a sync_needed beyond the bound of remembered ones.",
            &self.sync_needed_lost,
        );
        p.finish()
    }
}

/// The presence service's counters.
#[derive(Debug)]
pub struct PresenceMetrics {
    pub changes: Counter,
    pub announcements: Counter,
    /// Changes of ours not announced: by the time the row was read another
    /// server had changed it again (that server announces).
    pub superseded: Counter,
    pub hints: Family,
    pub repaired: Counter,
    pub delivered: Counter,
    /// Users a `presence_subscribe` asked for that are not contacts.
    pub not_contacts: Counter,
}

impl Default for PresenceMetrics {
    fn default() -> Self {
        PresenceMetrics {
            changes: Counter::default(),
            announcements: Counter::default(),
            superseded: Counter::default(),
            hints: Family::new(
                "verdict",
                &["valid", "stale", "forged", "malformed", "dropped"],
            ),
            repaired: Counter::default(),
            delivered: Counter::default(),
            not_contacts: Counter::default(),
        }
    }
}

impl Render for PresenceMetrics {
    fn render(&self) -> String {
        let mut p = Page::default();
        p.counter(
            "iim_presence_changes_total",
            "Presence changes written by this server.",
            &self.changes,
        )
        .counter(
            "iim_presence_announcements_total",
            "Presence hints sent (one iim::send each).",
            &self.announcements,
        )
        .counter(
            "iim_presence_announcements_superseded_total",
            "Changes of this server not announced because another server changed the user again first (and announces that).",
            &self.superseded,
        )
        .family(
            "iim_presence_hints_total",
            "Presence hints received, by verdict against the database.",
            &self.hints,
        )
        .counter(
            "iim_presence_repaired_total",
            "Updates delivered by anti-entropy rather than by a hint.",
            &self.repaired,
        )
        .counter(
            "iim_presence_updates_delivered_total",
            "Presence updates handed to local connections.",
            &self.delivered,
        )
        .counter(
            "iim_presence_subscriptions_refused_total",
            "Users a presence_subscribe asked to watch who are neither friends nor colleagues.",
            &self.not_contacts,
        );
        p.finish()
    }
}

/// Why notices were dropped (the `reason` of
/// `iim_offline_push_dropped_total`).
pub const OFFLINE_DROP_REASONS: &[&str] = &["queue_full", "gave_up", "shutdown"];

/// The offline push counters, rendered with the app server's.
#[derive(Debug)]
pub struct OfflineMetrics {
    /// Notices offered to the queue.
    pub queued: Counter,
    /// Notices in batches delivered.
    pub sent: Counter,
    /// Batches delivered.
    pub batches: Counter,
    /// Failed delivery attempts (each retry counts).
    pub failed: Counter,
    /// Notices dropped, by reason.
    pub dropped: Family,
    /// Messages for which no per-member notices were made, by reason
    /// (`large_group`: read fan-out groups; see docs/architecture.md).
    pub skipped: Family,
    /// Notices waiting now.
    pub queue: Gauge,
}

impl Default for OfflineMetrics {
    fn default() -> Self {
        OfflineMetrics {
            queued: Counter::default(),
            sent: Counter::default(),
            batches: Counter::default(),
            failed: Counter::default(),
            dropped: Family::new("reason", OFFLINE_DROP_REASONS),
            skipped: Family::new("reason", &["large_group", "push_queue_full"]),
            queue: Gauge::default(),
        }
    }
}

impl Render for OfflineMetrics {
    fn render(&self) -> String {
        let mut p = Page::default();
        p.counter(
            "iim_offline_push_queued_total",
            "Offline notices queued (one per message per recipient without a live session).",
            &self.queued,
        )
        .counter(
            "iim_offline_push_sent_total",
            "Offline notices delivered (in batches accepted by the receiver).",
            &self.sent,
        )
        .counter(
            "iim_offline_push_batches_total",
            "Batches of offline notices delivered.",
            &self.batches,
        )
        .counter(
            "iim_offline_push_failed_total",
            "Failed delivery attempts of offline notice batches (each retry counts).",
            &self.failed,
        )
        .family(
            "iim_offline_push_dropped_total",
            "Offline notices dropped: queue full (the oldest go), retries exhausted, or left queued at shutdown.",
            &self.dropped,
        )
        .family(
            "iim_offline_push_skipped_total",
            "Messages whose offline recipients got no notices, by reason.",
            &self.skipped,
        )
        .gauge(
            "iim_offline_push_queue",
            "Offline notices waiting to be delivered.",
            &self.queue,
        );
        p.finish()
    }
}
