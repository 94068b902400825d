//! The app server's counters, rendered at `/metrics`.

use iim::metrics::{Counter, Family, Gauge, Page, Render};
use iim::wire::DeliveryStatus;

/// Why an incoming 906 or frame was not delivered.
pub const REJECT_REASONS: &[&str] = &["malformed_message", "forged_id", "protocol"];

#[derive(Debug)]
pub struct AppMetrics {
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
    pub link_connects: Counter,
    pub link_up: Gauge,
    pub outstanding: Gauge,
    pub connections: Gauge,
}

impl Default for AppMetrics {
    fn default() -> Self {
        AppMetrics {
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
            link_connects: Counter::default(),
            link_up: Gauge::default(),
            outstanding: Gauge::default(),
            connections: Gauge::default(),
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
        );
        p.finish()
    }
}
