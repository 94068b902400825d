//! The counters of an app server's link to its exchange, rendered with the
//! app server's other metrics at `/metrics`.

use iim_proto::metrics::{Counter, Family, Gauge, Page, Render};
use iim_proto::wire::DeliveryStatus;

/// Why an incoming 906 or frame was not delivered.
pub const REJECT_REASONS: &[&str] = &["malformed_message", "forged_id", "protocol"];

#[derive(Debug)]
pub struct LinkMetrics {
    pub forwards_out: Counter,
    pub forwards_resent: Counter,
    pub delivers_in: Counter,
    pub duplicates: Counter,
    pub late: Counter,
    pub rejected: Family,
    pub acks_out: Counter,
    pub reports_in: Family,
    /// `overloaded` reports for resent 905s, completed as `timed_out`.
    pub reports_uncertain: Counter,
    pub link_connects: Counter,
    pub link_up: Gauge,
    pub outstanding: Gauge,
}

impl Default for LinkMetrics {
    fn default() -> Self {
        LinkMetrics {
            forwards_out: Counter::default(),
            forwards_resent: Counter::default(),
            delivers_in: Counter::default(),
            duplicates: Counter::default(),
            late: Counter::default(),
            rejected: Family::new("reason", REJECT_REASONS),
            acks_out: Counter::default(),
            reports_in: Family::new("status", &DeliveryStatus::LABELS),
            reports_uncertain: Counter::default(),
            link_connects: Counter::default(),
            link_up: Gauge::default(),
            outstanding: Gauge::default(),
        }
    }
}

impl Render for LinkMetrics {
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
        .counter(
            "iim_appserver_906_late_total",
            "906s delivered after later ones of their origin: sent again across an exchange restart, their first attempt refused or meant for an earlier incarnation of this server.",
            &self.late,
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
            "iim_appserver_reports_uncertain_total",
            "overloaded reports for 905s sent again after a link loss, completed as timed_out: an earlier copy may have been delivered.",
            &self.reports_uncertain,
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
        );
        p.finish()
    }
}
