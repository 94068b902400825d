//! The app server's counters, rendered at `/metrics`: the relay's and the
//! gateway's ([`AppMetrics`]), the chat service's ([`ChatMetrics`]) and the
//! presence service's ([`PresenceMetrics`]). Counters only: of the app
//! server it uses nothing but the enums its label sets come from
//! ([`crate::codes`]), so every other module may count here.

use crate::codes::{AuthFailure, CloseReason, ErrorCode, Op};
use iim::metrics::{Counter, Family, Gauge, Page, Render};
use iim::wire::DeliveryStatus;
use std::sync::Arc;

/// Why an incoming 906 or frame was not delivered.
pub const REJECT_REASONS: &[&str] = &["malformed_message", "forged_id", "protocol"];

#[derive(Debug)]
pub struct AppMetrics {
    /// The chat service's own counters.
    pub chat: Arc<ChatMetrics>,
    /// The presence service's own counters.
    pub presence: Arc<PresenceMetrics>,
    pub forwards_out: Counter,
    pub forwards_resent: Counter,
    pub delivers_in: Counter,
    pub duplicates: Counter,
    pub rejected: Family,
    pub acks_out: Counter,
    pub reports_in: Family,
    pub local_deliveries: Counter,
    pub missing_channels: Counter,
    pub connection_overflow: Counter,
    /// Messages of a reserved kind whose body could not be decoded.
    pub malformed_pushes: Counter,
    pub link_connects: Counter,
    pub link_up: Gauge,
    pub outstanding: Gauge,
    pub connections: Gauge,
    pub ws_connections: Gauge,
    pub auth_failures: Family,
    pub client_errors: Family,
    pub client_ops: Family,
    pub ws_closes: Family,
}

impl Default for AppMetrics {
    fn default() -> Self {
        AppMetrics {
            chat: Default::default(),
            presence: Default::default(),
            forwards_out: Counter::default(),
            forwards_resent: Counter::default(),
            delivers_in: Counter::default(),
            duplicates: Counter::default(),
            rejected: Family::new("reason", REJECT_REASONS),
            acks_out: Counter::default(),
            reports_in: Family::new("status", &DeliveryStatus::LABELS),
            local_deliveries: Counter::default(),
            missing_channels: Counter::default(),
            connection_overflow: Counter::default(),
            malformed_pushes: Counter::default(),
            link_connects: Counter::default(),
            link_up: Gauge::default(),
            outstanding: Gauge::default(),
            connections: Gauge::default(),
            ws_connections: Gauge::default(),
            auth_failures: Family::new("reason", AuthFailure::LABELS),
            client_errors: Family::new("code", ErrorCode::LABELS),
            client_ops: Family::new("op", Op::LABELS),
            ws_closes: Family::new("reason", CloseReason::LABELS),
        }
    }
}

impl Render for AppMetrics {
    fn render(&self) -> String {
        let mut p = Page::default();
        p.counter(
            "iim_appserver_905_out_total",
            "905 forward requests sent (first sends).",
            &self.forwards_out,
        )
        .counter(
            "iim_appserver_905_resent_total",
            "905s sent again after a reconnect.",
            &self.forwards_resent,
        )
        .counter(
            "iim_appserver_906_in_total",
            "906 deliveries received.",
            &self.delivers_in,
        )
        .counter(
            "iim_appserver_906_duplicates_total",
            "906s dropped as already delivered.",
            &self.duplicates,
        )
        .family(
            "iim_appserver_906_rejected_total",
            "906s refused, by reason.",
            &self.rejected,
        )
        .counter(
            "iim_appserver_acks_out_total",
            "Ack frames sent to the exchange.",
            &self.acks_out,
        )
        .family(
            "iim_appserver_reports_total",
            "Delivery report entries received, by status.",
            &self.reports_in,
        )
        .counter(
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
            "iim_appserver_malformed_pushes_total",
            "Messages of a kind reserved by iim (chat) whose body could not be decoded; not delivered.",
            &self.malformed_pushes,
        )
        .counter(
            "iim_appserver_link_connects_total",
            "Successful registrations with an exchange.",
            &self.link_connects,
        )
        .gauge(
            "iim_appserver_link_up",
            "1 while registered with an exchange.",
            &self.link_up,
        )
        .gauge(
            "iim_appserver_outstanding_905",
            "905s awaiting their reports.",
            &self.outstanding,
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
        );
        let mut page = p.finish();
        page.push_str(&self.chat.render());
        page.push_str(&self.presence.render());
        page
    }
}

/// The chat service's counters.
#[derive(Debug, Default)]
pub struct ChatMetrics {
    pub stored: Counter,
    pub duplicates: Counter,
    pub pushes: Counter,
    pub pushes_dropped: Counter,
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
            "Pushes dropped (queue full or sessions unavailable); clients sync.",
            &self.pushes_dropped,
        );
        p.finish()
    }
}

/// The presence service's counters.
#[derive(Debug)]
pub struct PresenceMetrics {
    pub changes: Counter,
    pub announcements: Counter,
    pub hints: Family,
    pub repaired: Counter,
    pub delivered: Counter,
}

impl Default for PresenceMetrics {
    fn default() -> Self {
        PresenceMetrics {
            changes: Counter::default(),
            announcements: Counter::default(),
            hints: Family::new(
                "verdict",
                &["valid", "stale", "forged", "malformed", "dropped"],
            ),
            repaired: Counter::default(),
            delivered: Counter::default(),
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
        );
        p.finish()
    }
}
