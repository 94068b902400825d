//! The in-process delivery path of an app server: what becomes of a
//! message for users of this server, whether it arrived by 906 or from a
//! local `iim::send`.
//!
//! Presence hints go to the presence service, never straight to clients
//! (they are checked against the database first). Every other message is
//! decoded once into a [`Push`] that all the listed connections share, then
//! goes to the plugins and the connections; one that cannot be decoded, or
//! a chat envelope whose `from` is not the message's source user, reaches
//! neither (counted). This module owns that routing by kind; it does not
//! own the connections, the presence rules or the client frames.

use crate::connections::Connections;
use crate::metrics::AppMetrics;
use crate::presence::Presence;
use crate::push::Push;
use iim::Plugin;
use iim::api::{LocalDelivery, LocalReport};
use iim::kinds::Reserved;
use iim::wire::{Message, UserRow};
use std::sync::{Arc, OnceLock};
use tracing::warn;

/// Routes each message for this server by its kind.
pub struct Host {
    connections: Arc<Connections>,
    plugins: Vec<Arc<dyn Plugin>>,
    /// Set once the presence service has started; hints before that are
    /// dropped (the presence repair covers them).
    presence: OnceLock<Arc<Presence>>,
    metrics: Arc<AppMetrics>,
}

impl Host {
    pub fn new(
        connections: Arc<Connections>,
        plugins: Vec<Arc<dyn Plugin>>,
        metrics: Arc<AppMetrics>,
    ) -> Host {
        Host {
            connections,
            plugins,
            presence: OnceLock::new(),
            metrics,
        }
    }

    /// Hand presence hints to `presence` from now on.
    pub fn set_presence(&self, presence: Arc<Presence>) {
        let _ = self.presence.set(presence);
    }
}

impl LocalDelivery for Host {
    fn deliver(&self, msg: &Arc<Message>, rows: &[UserRow]) -> LocalReport {
        if Reserved::of(msg.kind) == Some(Reserved::Presence) {
            if let Some(p) = self.presence.get() {
                p.hint(msg.id.origin, msg);
            }
            return LocalReport {
                delivered: rows.len(),
                missing: 0,
            };
        }
        // Decoded (and its sender checked) before anyone sees it: a refused
        // message reaches neither the plugins nor the connections.
        let push = match Push::decode(msg) {
            Ok(push) => push,
            Err(e @ crate::push::DecodeError::ForgedFrom { .. }) => {
                self.metrics.forged_pushes.inc();
                warn!(error = %e, id = %msg.id, origin = msg.id.origin.0, "chat message with a forged sender; not delivered");
                return LocalReport::default();
            }
            Err(e) => {
                self.metrics.malformed_pushes.inc();
                warn!(error = %e, id = %msg.id, kind = msg.kind, "message not decodable; not delivered");
                return LocalReport::default();
            }
        };
        for p in &self.plugins {
            p.on_message(msg, rows);
        }
        self.connections.deliver(&push, rows)
    }
}
