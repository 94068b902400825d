//! Local client connections: who is connected to this server, and the
//! queue of [`Push`]es of each.
//!
//! Each connection is a bounded channel of pushes plus a row in the
//! registry's `sessions` table while it lives. The row is the promise that
//! sends reach the connection, so [`Connections::audit`] holds it true
//! whatever happened to the registry meanwhile: after every registration
//! with the exchange (an exchange that restarted may have marked this
//! server down and deleted its rows while it was alive, before it could
//! reconnect) and every `session_audit_ms`, rows missing for live
//! connections are written back and rows without a connection deleted. Delivery never waits: a
//! connection whose queue is full is cut (its client resynchronises after
//! reconnecting), so one slow client cannot hold up anyone else. Channel ids
//! carry the server's epoch in their high bits, so a channel id from an
//! earlier incarnation never reaches a connection of this one. Which
//! messages become pushes is the host's business (`host`), not this
//! module's.

use crate::metrics::AppMetrics;
use crate::push::Push;
use iim::api::LocalReport;
use iim::presence::{PresenceRow, Status};
use iim::registry::{LiveSession, Registry, RegistryError};
use iim::types::{ChannelId, ServerId, Session, UserId, now_ms};
use iim::wire::UserRow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Bits of a channel id below the epoch.
const CHANNEL_COUNTER_BITS: u32 = 40;

struct Conn {
    user: UserId,
    device: String,
    /// The status the connection set last, and when (unix ms, 0 = never):
    /// what an audit writes back if the registry lost the row.
    status: Status,
    text: String,
    status_at_ms: i64,
    /// Its row has been written once (until then `attach` is writing it
    /// and the audit leaves it alone).
    recorded: bool,
    tx: mpsc::Sender<Push>,
}

/// What one [`Connections::audit`] changed in the registry.
#[derive(Debug, Default)]
pub struct Audit {
    /// Live connections whose missing rows were written back.
    pub restored: usize,
    /// Rows of connections that no longer exist, deleted.
    pub removed: usize,
    /// Presence rows that changed by writing back (to announce).
    pub changed: Vec<PresenceRow>,
    /// Users whose rows were deleted (their presence to recompute).
    pub removed_users: Vec<UserId>,
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
    ///
    /// The connection is in the map before its row is written, so a row
    /// never exists for a connection the map has not got (what lets
    /// [`Connections::audit`] delete rows the map does not know).
    pub async fn attach(&self, user: UserId, device: &str) -> Result<Attached, RegistryError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) & ((1 << CHANNEL_COUNTER_BITS) - 1);
        let channel = ChannelId((self.epoch << CHANNEL_COUNTER_BITS) | n);
        let session = Session {
            user,
            device: device.to_string(),
            server: self.server,
            channel,
        };
        let (tx, rx) = mpsc::channel(self.capacity);
        self.map.write().unwrap_or_else(|e| e.into_inner()).insert(
            channel,
            Conn {
                user,
                device: device.to_string(),
                status: Status::Online,
                text: String::new(),
                status_at_ms: 0,
                recorded: false,
                tx,
            },
        );
        self.metrics.connections.add(1);
        if let Err(e) = self
            .registry
            .add_session(&session, self.epoch, now_ms())
            .await
        {
            self.remove(channel);
            return Err(e);
        }
        let live = match self
            .map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&channel)
        {
            Some(c) => {
                c.recorded = true;
                true
            }
            None => false,
        };
        // Detached meanwhile (an overflow cut): its row must not stay.
        if !live {
            let _ = self.registry.remove_session(self.server, channel).await;
        }
        Ok(Attached { session, rx })
    }

    /// Remember the status a connection set (before it is written to the
    /// registry, so an audit never writes back an older one).
    pub fn note_status(&self, channel: ChannelId, status: Status, text: &str, at_ms: i64) {
        if let Some(c) = self
            .map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&channel)
        {
            c.status = status;
            c.text = text.to_string();
            c.status_at_ms = at_ms;
        }
    }

    /// Count an audit that failed (the audit loop retries it).
    pub fn note_audit_failure(&self) {
        self.metrics.session_audit_failures.inc();
    }

    fn contains(&self, channel: ChannelId) -> bool {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&channel)
    }

    /// Make the registry's session rows of this server agree with the live
    /// connections: write back the rows of connections that have none
    /// (with their status), delete rows no connection has.
    ///
    /// The rows are read before the connections are listed. A connection is
    /// in the map before its row is written and leaves the map before its
    /// row is deleted, so a row read here whose channel is not in the later
    /// list belongs to a connection that is gone. A row written back for a
    /// connection that left meanwhile is deleted again at once; its own
    /// detach may delete it too.
    pub async fn audit(&self) -> Result<Audit, RegistryError> {
        let rows = self.registry.session_rows(self.server).await?;
        let have: HashSet<ChannelId> = rows.iter().map(|(c, _)| *c).collect();
        let (missing, live): (Vec<LiveSession>, HashSet<ChannelId>) = {
            let map = self.map.read().unwrap_or_else(|e| e.into_inner());
            let missing = map
                .iter()
                .filter(|(ch, c)| c.recorded && !have.contains(ch))
                .map(|(ch, c)| LiveSession {
                    session: Session {
                        user: c.user,
                        device: c.device.clone(),
                        server: self.server,
                        channel: *ch,
                    },
                    status: c.status,
                    text: c.text.clone(),
                    status_at_ms: c.status_at_ms,
                })
                .collect();
            (missing, map.keys().copied().collect())
        };
        let mut audit = Audit::default();
        if !missing.is_empty() {
            audit.changed = self
                .registry
                .restore_sessions(&missing, self.epoch, now_ms())
                .await?;
            audit.restored = missing.len();
            for s in &missing {
                if !self.contains(s.session.channel) {
                    self.registry
                        .remove_session(self.server, s.session.channel)
                        .await?;
                    audit.removed_users.push(s.session.user);
                }
            }
        }
        for (channel, user) in rows {
            if !live.contains(&channel)
                && self.registry.remove_session(self.server, channel).await?
            {
                audit.removed += 1;
                audit.removed_users.push(user);
            }
        }
        self.metrics.sessions_restored.add(audit.restored as u64);
        self.metrics.sessions_removed.add(audit.removed as u64);
        if audit.restored > 0 || audit.removed > 0 {
            warn!(
                restored = audit.restored,
                removed = audit.removed,
                "session rows did not match the live connections; repaired"
            );
        }
        Ok(audit)
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
