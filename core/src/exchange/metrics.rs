//! The exchange's counters, rendered at `/metrics`.

use iim_proto::metrics::{Counter, Family, Gauge, Page, Render};
use iim_proto::wire::DeliveryStatus;
use iim_proto::wire::Frame;

/// Every reason a connection, a registration or a frame is refused.
pub const REJECT_REASONS: &[&str] = &[
    "tls_handshake",
    "handshake_timeout",
    "not_registered",
    "identity_mismatch",
    "stale_epoch",
    "unknown_server",
    "wrong_role",
    "forged_source",
    "wrong_target",
    "malformed_905",
    "malformed_frame",
    "malformed_message",
    "oversized_frame",
    "bad_version",
    "protocol",
    "overloaded",
    "over_share",
    "too_many_links",
    "registry_error",
    "handshake_limit",
];

#[derive(Debug)]
pub struct ExchangeMetrics {
    pub frames_in: Family,
    pub forwards_in: Counter,
    pub delivers_out: Counter,
    pub acks_in: Counter,
    pub retransmits: Counter,
    pub reports_out: Family,
    pub reports_dropped: Counter,
    pub rejections: Family,
    pub links: Gauge,
    pub queued: Gauge,
    pub marked_down: Counter,
    pub repeated_refusals: Counter,
    pub address_retries: Counter,
    pub peer_links: Gauge,
    pub relays_out: Counter,
    pub relays_in: Counter,
    pub relays_not_here: Counter,
    pub relays_moved: Counter,
    pub relay_outcomes_stale: Counter,
    pub relays_held: Counter,
    pub relays_unreachable: Counter,
    pub lookups: Counter,
    pub attachments_learnt: Counter,
    /// App servers attached here, by what they were before:
    /// [`ATTACH_KINDS`].
    pub attachments: Family,
    /// Per peer exchange: relay frames out, relay frames in, link up.
    pub per_peer: std::sync::Mutex<std::collections::BTreeMap<u32, PeerCounts>>,
}

/// The `kind` of `iim_exchange_attachments_total`.
pub const ATTACH_KINDS: &[&str] = &["new", "again", "moved_here"];

/// What one peer exchange's link carried.
#[derive(Clone, Copy, Debug, Default)]
pub struct PeerCounts {
    pub relays_out: u64,
    pub relays_in: u64,
    pub up: bool,
}

impl ExchangeMetrics {
    /// Update the counts of peer exchange `peer`.
    pub fn peer(&self, peer: u32, f: impl FnOnce(&mut PeerCounts)) {
        let mut m = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        f(m.entry(peer).or_default());
    }
}

impl Default for ExchangeMetrics {
    fn default() -> Self {
        ExchangeMetrics {
            frames_in: Family::new("kind", &Frame::KINDS),
            forwards_in: Counter::default(),
            delivers_out: Counter::default(),
            acks_in: Counter::default(),
            retransmits: Counter::default(),
            reports_out: Family::new("status", &DeliveryStatus::LABELS),
            reports_dropped: Counter::default(),
            rejections: Family::new("reason", REJECT_REASONS),
            links: Gauge::default(),
            queued: Gauge::default(),
            marked_down: Counter::default(),
            repeated_refusals: Counter::default(),
            address_retries: Counter::default(),
            peer_links: Gauge::default(),
            relays_out: Counter::default(),
            relays_in: Counter::default(),
            relays_not_here: Counter::default(),
            relays_moved: Counter::default(),
            relay_outcomes_stale: Counter::default(),
            relays_held: Counter::default(),
            relays_unreachable: Counter::default(),
            lookups: Counter::default(),
            per_peer: Default::default(),
            attachments_learnt: Counter::default(),
            attachments: Family::new("kind", ATTACH_KINDS),
        }
    }
}

impl Render for ExchangeMetrics {
    fn render(&self) -> String {
        let mut p = Page::default();
        p.family(
            "iim_exchange_frames_in_total",
            "Frames received, by kind.",
            &self.frames_in,
        )
        .counter(
            "iim_exchange_905_in_total",
            "905 forward requests accepted.",
            &self.forwards_in,
        )
        .counter(
            "iim_exchange_906_out_total",
            "906 deliveries written (first sends and retransmits).",
            &self.delivers_out,
        )
        .counter(
            "iim_exchange_906_acked_total",
            "906 deliveries acknowledged by their target.",
            &self.acks_in,
        )
        .counter(
            "iim_exchange_906_retransmits_total",
            "906 deliveries written again after a reconnect.",
            &self.retransmits,
        )
        .family(
            "iim_exchange_reports_total",
            "Delivery report entries sent to origins, by status.",
            &self.reports_out,
        )
        .counter(
            "iim_exchange_reports_dropped_total",
            "Report entries dropped because the origin was not connected.",
            &self.reports_dropped,
        )
        .family(
            "iim_exchange_rejections_total",
            "Refused connections, registrations and frames, by reason.",
            &self.rejections,
        )
        .gauge(
            "iim_exchange_links",
            "App servers connected now.",
            &self.links,
        )
        .gauge(
            "iim_exchange_queued_906",
            "906 deliveries queued and not yet acknowledged.",
            &self.queued,
        )
        .counter(
            "iim_exchange_servers_marked_down_total",
            "App servers marked down (lease expired or clean shutdown).",
            &self.marked_down,
        )
        .counter(
            "iim_exchange_repeated_refusals_total",
            "906s refused again with their first attempt's outcome (the origin sent the 905 again without having heard it).",
            &self.repeated_refusals,
        )
        .counter(
            "iim_exchange_address_retries_total",
            "Connection attempts sent a QUIC Retry to validate their address (many handshakes in progress).",
            &self.address_retries,
        )
        .gauge(
            "iim_exchange_peer_links",
            "Links to other exchanges up now.",
            &self.peer_links,
        )
        .counter(
            "iim_exchange_relays_out_total",
            "906s relayed to the exchange their target is attached to.",
            &self.relays_out,
        )
        .counter(
            "iim_exchange_relays_in_total",
            "905s relayed here by another exchange.",
            &self.relays_in,
        )
        .counter(
            "iim_exchange_relays_not_here_total",
            "Relayed 906s answered with where their target is attached now.",
            &self.relays_not_here,
        )
        .counter(
            "iim_exchange_relays_moved_total",
            "906s moved with their target to the exchange it attached to.",
            &self.relays_moved,
        )
        .counter(
            "iim_exchange_relay_outcomes_stale_total",
            "Outcomes from a peer for relays already answered or moved.",
            &self.relay_outcomes_stale,
        )
        .counter(
            "iim_exchange_relays_held_total",
            "Times a peer answered that a target is not attached to it and the relays for that target were held back until the next sweep.",
            &self.relays_held,
        )
        .counter(
            "iim_exchange_relays_unreachable_total",
            "Relays reported timed_out because their peer exchange had no link for a lease (still sent if it comes back).",
            &self.relays_unreachable,
        )
        .counter(
            "iim_exchange_lookups_total",
            "Servers named by a 905 before this exchange knew them, looked up in the registry at once.",
            &self.lookups,
        )
        .counter(
            "iim_exchange_attachments_learnt_total",
            "App servers learnt to be attached to another exchange.",
            &self.attachments_learnt,
        )
        .family(
            "iim_exchange_attachments_total",
            "App servers attached here: new (a new incarnation, or one not attached anywhere), again (attached here before: a reconnect), moved_here (attached to another exchange before: a re-attachment).",
            &self.attachments,
        );
        let peers: Vec<(u32, PeerCounts)> = self
            .per_peer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        let series = |f: fn(&PeerCounts) -> i64| -> Vec<(u32, i64)> {
            peers.iter().map(|(id, c)| (*id, f(c))).collect()
        };
        p.by_id(
            "iim_exchange_peer_relay_frames_out_total",
            "Relay frames (one per 905, that peer's rows) sent to each peer exchange.",
            "counter",
            "peer",
            &series(|c| c.relays_out as i64),
        )
        .by_id(
            "iim_exchange_peer_relay_frames_in_total",
            "Relay frames received from each peer exchange.",
            "counter",
            "peer",
            &series(|c| c.relays_in as i64),
        )
        .by_id(
            "iim_exchange_peer_link_up",
            "1 while the link to the peer exchange is up.",
            "gauge",
            "peer",
            &series(|c| i64::from(c.up)),
        );
        p.finish()
    }
}
