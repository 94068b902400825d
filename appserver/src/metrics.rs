//! The app server's counters, rendered at `/metrics`.

use iim::metrics::{Counter, Family, Gauge, Page, Render};

pub use iim_core::link::metrics::REJECT_REASONS;

/// Why a WebSocket client failed to authenticate.
pub const AUTH_FAILURE_REASONS: &[&str] = &[
    "invalid",
    "expired",
    "missing",
    "not_first",
    "timeout",
    "unknown_user",
];

/// The `code`s of error frames sent to clients (docs/client-protocol.md).
pub const CLIENT_ERROR_CODES: &[&str] = &[
    "auth_failed",
    "auth_expired",
    "auth_required",
    "invalid_json",
    "unknown_op",
    "binary_not_supported",
    "bad_request",
    "forged_from",
    "too_large",
    "rate_limited",
    "too_slow",
    "unknown_user",
    "unknown_group",
    "not_member",
    "unavailable",
];

/// Client operations counted by `op` (anything else counts as `other`).
/// Why client connections ended.
pub const WS_CLOSE_REASONS: &[&str] = &[
    "client_gone",
    "idle_timeout",
    "going_away",
    "too_slow",
    "authentication_failed",
    "unknown_user",
    "frame_too_large",
    "try_again_later",
];

pub const CLIENT_OPS: &[&str] = &[
    "auth",
    "send",
    "sync",
    "ping",
    "set_status",
    "presence_subscribe",
];

#[derive(Debug)]
pub struct AppMetrics {
    /// The chat service's own counters.
    pub chat: std::sync::Arc<crate::chat::ChatMetrics>,
    /// The presence service's own counters.
    pub presence: std::sync::Arc<crate::presence::PresenceMetrics>,
    /// The link to the exchange's own counters.
    pub link: std::sync::Arc<iim_core::link::LinkMetrics>,
    pub local_deliveries: Counter,
    pub missing_channels: Counter,
    pub connection_overflow: Counter,
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
            link: Default::default(),
            local_deliveries: Counter::default(),
            missing_channels: Counter::default(),
            connection_overflow: Counter::default(),
            connections: Gauge::default(),
            ws_connections: Gauge::default(),
            auth_failures: Family::new("reason", AUTH_FAILURE_REASONS),
            client_errors: Family::new("code", CLIENT_ERROR_CODES),
            client_ops: Family::new("op", CLIENT_OPS),
            ws_closes: Family::new("reason", WS_CLOSE_REASONS),
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
        page.push_str(&self.link.render());
        page.push_str(&self.chat.render());
        page.push_str(&self.presence.render());
        page
    }
}
