//! Local client connections: who is connected to this server, and the
//! queue of [`Push`]es of each.
//!
//! Each connection is a bounded channel of pushes plus a row in the
//! registry's `sessions` table while it lives. Delivery never waits: a
//! connection whose queue is full is cut (its client resynchronises after
//! reconnecting), so one slow client cannot hold up anyone else. Channel ids
//! carry the server's epoch in their high bits, so a channel id from an
//! earlier incarnation never reaches a connection of this one. Which
//! messages become pushes is the host's business (`host`), not this
//! module's.

use crate::metrics::AppMetrics;
use crate::push::Push;
use iim::api::LocalReport;
use iim::registry::{Registry, RegistryError};
use iim::types::{ChannelId, ServerId, Session, UserId, now_ms};
use iim::wire::UserRow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Bits of a channel id below the epoch.
const CHANNEL_COUNTER_BITS: u32 = 40;

struct Conn {
    user: UserId,
    tx: mpsc::Sender<Push>,
}

/// A connection as its owner (a gateway task, a test) holds it.
pub struct Attached {
    pub session: Session,
    pub rx: mpsc::Receiver<Push>,
}

pub struct Connections {
    server: ServerId,
    epoch: u64,
    next: AtomicU64,
    map: RwLock<HashMap<ChannelId, Conn>>,
    registry: Registry,
    metrics: Arc<AppMetrics>,
    capacity: usize,
}

impl Connections {
    pub fn new(
        server: ServerId,
        epoch: u64,
        registry: Registry,
        metrics: Arc<AppMetrics>,
        capacity: usize,
    ) -> Self {
        Connections {
            server,
            epoch,
            next: AtomicU64::new(1),
            map: RwLock::new(HashMap::new()),
            registry,
            metrics,
            capacity,
        }
    }

    /// Open a connection for `user` and record its session.
    pub async fn attach(&self, user: UserId, device: &str) -> Result<Attached, RegistryError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) & ((1 << CHANNEL_COUNTER_BITS) - 1);
        let channel = ChannelId((self.epoch << CHANNEL_COUNTER_BITS) | n);
        let session = Session {
            user,
            device: device.to_string(),
            server: self.server,
            channel,
        };
        self.registry
            .add_session(&session, self.epoch, now_ms())
            .await?;
        let (tx, rx) = mpsc::channel(self.capacity);
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(channel, Conn { user, tx });
        self.metrics.connections.add(1);
        Ok(Attached { session, rx })
    }

    /// Close a connection and remove its session.
    pub async fn detach(&self, channel: ChannelId) -> Result<(), RegistryError> {
        if self.remove(channel) {
            self.registry.remove_session(self.server, channel).await?;
        }
        Ok(())
    }

    fn remove(&self, channel: ChannelId) -> bool {
        let removed = self
            .map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&channel)
            .is_some();
        if removed {
            self.metrics.connections.add(-1);
        }
        removed
    }

    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hand `push` to each listed connection that still exists here.
    pub fn deliver(&self, push: &Push, rows: &[UserRow]) -> LocalReport {
        let mut report = LocalReport::default();
        let mut overflowed = Vec::new();
        {
            let map = self.map.read().unwrap_or_else(|e| e.into_inner());
            for row in rows {
                match map.get(&row.channel) {
                    Some(c) if c.user == row.user => match c.tx.try_send(push.clone()) {
                        Ok(()) => report.delivered += 1,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            overflowed.push(row.channel);
                            report.missing += 1;
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            overflowed.push(row.channel);
                            report.missing += 1;
                        }
                    },
                    _ => {
                        debug!(user = row.user.0, channel = %row.channel, "no such connection");
                        report.missing += 1;
                    }
                }
            }
        }
        self.metrics.local_deliveries.add(report.delivered as u64);
        self.metrics.missing_channels.add(report.missing as u64);
        for channel in overflowed {
            if self.remove(channel) {
                self.metrics.connection_overflow.inc();
                warn!(channel = %channel, "connection cut: not keeping up or closed");
                let registry = self.registry.clone();
                let server = self.server;
                tokio::spawn(async move {
                    if let Err(e) = registry.remove_session(server, channel).await {
                        warn!(error = %e, "could not remove the session of a cut connection");
                    }
                });
            }
        }
        report
    }
}
