//! Presence, the built-in service: who is online, away, busy or offline,
//! shown to contacts on every server (docs/presence.md).
//!
//! The database row is the truth. A change is written first (with the
//! session change that caused it), then announced: coalesced per user over
//! `coalesce_ms`, one `iim::send` of a *hint* to the contacts' connections.
//! A receiving server never trusts a hint: it reads the rows (batched) and
//! hands its local watchers the database's state, counting hints that do not
//! match. Every `repair_ms` a digest of the versions this server has handed
//! out is compared with the database's; buckets that differ are re-read and
//! the newer rows delivered. Lost hints therefore cost at most one repair
//! period.

use crate::connections::Connections;
use crate::metrics::PresenceMetrics;
use crate::push::Push;
pub use crate::push::Update;
use iim::presence::{PresenceRow, PresenceStore, Status};
use iim::registry::Registry;
use iim::types::{ChannelId, ServerId, UserId, now_ms};
use iim::wire::{Message, UserRow};
use iim::{Iim, Outgoing};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Digest buckets for anti-entropy.
const BUCKETS: u32 = 64;
/// Bound of the change and hint queues.
const QUEUE: usize = 8_192;

/// Settings (`[presence]` in the app server config).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// Changes of one user within this window are announced once.
    pub coalesce_ms: u64,
    /// Anti-entropy period: the bound for lost notifications.
    pub repair_ms: u64,
    /// Organisations larger than this do not broadcast colleagues'
    /// presence; clients subscribe instead.
    pub broadcast_org_max: usize,
    /// Most users one connection may subscribe to.
    pub max_subscriptions: usize,
    /// TEST HOOK: fraction of incoming presence hints dropped on purpose
    /// (0 in production). Lets tests prove that repair converges.
    pub test_drop_fraction: f64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            coalesce_ms: 50,
            repair_ms: 1_000,
            broadcast_org_max: 200,
            max_subscriptions: 500,
            test_drop_fraction: 0.0,
        }
    }
}

impl PresenceConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.coalesce_ms == 0 || self.repair_ms < 10 {
            return Err("presence: coalesce_ms must be > 0 and repair_ms >= 10".into());
        }
        if !(0.0..=1.0).contains(&self.test_drop_fraction) {
            return Err("presence.test_drop_fraction must be within 0..=1".into());
        }
        Ok(())
    }
}

/// Who watches whom on this server, and what it has handed out.
/// Why a `presence_subscribe` watched nobody.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// These users are neither friends nor colleagues of the subscriber.
    #[error("not a contact: {0:?}")]
    NotAContact(Vec<UserId>),
    #[error("presence store: {0}")]
    Store(anyhow::Error),
}

#[derive(Default)]
struct Watch {
    /// contact -> the local connections watching it (connection, its user).
    watchers: HashMap<UserId, HashSet<(ChannelId, UserId)>>,
    /// connection -> the contacts it watches.
    by_channel: HashMap<ChannelId, Vec<UserId>>,
    /// contact -> the version last handed to its watchers.
    view: HashMap<UserId, u64>,
}

pub struct Presence {
    server: ServerId,
    store: PresenceStore,
    registry: Registry,
    connections: Arc<Connections>,
    cfg: PresenceConfig,
    watch: Mutex<Watch>,
    changes: mpsc::Sender<UserId>,
    hints: mpsc::Sender<(ServerId, Update)>,
    pub metrics: Arc<PresenceMetrics>,
    /// Deterministic drop decisions for the test hook.
    drop_state: Mutex<u64>,
}

impl Presence {
    /// Start the service and its three loops (announce, verify, repair);
    /// they stop with `stop`. `link` wakes the repair when the link to the
    /// exchange comes back.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        iim: Iim,
        registry: Registry,
        connections: Arc<Connections>,
        cfg: PresenceConfig,
        metrics: Arc<PresenceMetrics>,
        link: watch::Receiver<crate::LinkState>,
        stop: CancellationToken,
        tracker: &TaskTracker,
    ) -> Arc<Presence> {
        let (changes, changes_rx) = mpsc::channel(QUEUE);
        let (hints, hints_rx) = mpsc::channel(QUEUE);
        let p = Arc::new(Presence {
            server: iim.server(),
            store: PresenceStore::new(&registry),
            registry,
            connections,
            cfg,
            watch: Mutex::new(Watch::default()),
            changes,
            hints,
            metrics,
            drop_state: Mutex::new(0x9e37_79b9_7f4a_7c15),
        });
        tracker.spawn(announce_loop(p.clone(), iim, changes_rx, stop.clone()));
        tracker.spawn(verify_loop(p.clone(), hints_rx, stop.clone()));
        tracker.spawn(repair_loop(p.clone(), link, stop));
        p
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watch> {
        self.watch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A client connected: it starts watching its contacts; its own user's
    /// presence is recomputed. Returns the contacts' current presence.
    pub async fn connected(&self, user: UserId, channel: ChannelId) -> anyhow::Result<Vec<Update>> {
        let contacts = self
            .store
            .contacts(user, self.cfg.broadcast_org_max)
            .await?;
        let snapshot = self.watch_users(user, channel, &contacts).await?;
        if self
            .store
            .recompute(user, self.server, now_ms())
            .await?
            .is_some()
        {
            self.changed(user);
        }
        Ok(snapshot)
    }

    /// A client subscribes to more users (large organisations). Only
    /// friends and colleagues may be watched: if any of `users` is
    /// neither, nothing is watched and they are returned as the error
    /// (counted).
    pub async fn subscribe(
        &self,
        user: UserId,
        channel: ChannelId,
        users: &[UserId],
    ) -> Result<Vec<Update>, SubscribeError> {
        let asked: Vec<UserId> = {
            let mut v: Vec<UserId> = users.iter().copied().filter(|u| *u != user).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let allowed = self
            .store
            .contacts_among(user, &asked)
            .await
            .map_err(|e| SubscribeError::Store(e.into()))?;
        let strangers: Vec<UserId> = asked
            .iter()
            .copied()
            .filter(|u| allowed.binary_search(u).is_err())
            .collect();
        if !strangers.is_empty() {
            self.metrics.not_contacts.add(strangers.len() as u64);
            return Err(SubscribeError::NotAContact(strangers));
        }
        let room = {
            let w = self.lock();
            let have = w.by_channel.get(&channel).map_or(0, |v| v.len());
            self.cfg.max_subscriptions.saturating_sub(have)
        };
        let take: Vec<UserId> = asked.into_iter().take(room).collect();
        self.watch_users(user, channel, &take)
            .await
            .map_err(SubscribeError::Store)
    }

    async fn watch_users(
        &self,
        user: UserId,
        channel: ChannelId,
        contacts: &[UserId],
    ) -> anyhow::Result<Vec<Update>> {
        let rows = self.store.rows(contacts).await?;
        let by_user: HashMap<UserId, &PresenceRow> = rows.iter().map(|r| (r.user, r)).collect();
        let mut w = self.lock();
        let mut snapshot = Vec::with_capacity(contacts.len());
        for c in contacts {
            w.watchers.entry(*c).or_default().insert((channel, user));
            w.by_channel.entry(channel).or_default().push(*c);
            let u = by_user
                .get(c)
                .map(|r| Update::from(*r))
                .unwrap_or_else(|| Update::offline(*c));
            // Only a first watcher sets the view: raising it here would hide
            // the newer version from the watchers already there (repair
            // delivers it to all of them).
            w.view.entry(*c).or_insert(u.version);
            snapshot.push(u);
        }
        Ok(snapshot)
    }

    /// A client disconnected (its session is already removed).
    pub async fn disconnected(&self, user: UserId, channel: ChannelId) {
        {
            let mut w = self.lock();
            if let Some(contacts) = w.by_channel.remove(&channel) {
                for c in contacts {
                    let empty = w.watchers.get_mut(&c).is_some_and(|s| {
                        s.remove(&(channel, user));
                        s.is_empty()
                    });
                    if empty {
                        w.watchers.remove(&c);
                        w.view.remove(&c);
                    }
                }
            }
        }
        match self.store.recompute(user, self.server, now_ms()).await {
            Ok(Some(_)) => self.changed(user),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "presence not recomputed after a disconnect; repair will"),
        }
    }

    /// The session audit wrote rows back (`changed`: the presence rows that
    /// changed by it) and deleted the rows of connections that were gone
    /// (`removed`: their users). Announced like any other change.
    pub async fn sessions_repaired(&self, changed: &[PresenceRow], removed: &[UserId]) {
        for r in changed {
            self.changed(r.user);
        }
        for &user in removed {
            match self.store.recompute(user, self.server, now_ms()).await {
                Ok(Some(_)) => self.changed(user),
                Ok(None) => {}
                Err(e) => warn!(error = %e, "presence not recomputed after an audit; repair will"),
            }
        }
    }

    /// A client set its own status.
    pub async fn set_status(
        &self,
        channel: ChannelId,
        status: Status,
        text: &str,
    ) -> anyhow::Result<()> {
        let now = now_ms();
        // Noted first: an audit must never write back an older status.
        self.connections.note_status(channel, status, text, now);
        let row = self
            .store
            .set_status(self.server, channel, status, text, now)
            .await?;
        if let Some(r) = row {
            self.changed(r.user);
        }
        Ok(())
    }

    fn changed(&self, user: UserId) {
        self.metrics.changes.inc();
        // Full queue: the change is in the database; repair announces it.
        let _ = self.changes.try_send(user);
    }

    /// A hint arrived by 906 (from `origin`). Queued for verification.
    pub fn hint(&self, origin: ServerId, msg: &Message) {
        let update: Update = match serde_json::from_slice(&msg.body) {
            Ok(u) => u,
            Err(_) => {
                self.metrics.hints.inc("malformed");
                return;
            }
        };
        if self.drop_for_test() {
            self.metrics.hints.inc("dropped");
            return;
        }
        if self.hints.try_send((origin, update)).is_err() {
            self.metrics.hints.inc("dropped");
        }
    }

    fn drop_for_test(&self) -> bool {
        let f = self.cfg.test_drop_fraction;
        if f <= 0.0 {
            return false;
        }
        // xorshift64*: deterministic, no dependency.
        let mut s = self.drop_state.lock().unwrap_or_else(|e| e.into_inner());
        *s ^= *s >> 12;
        *s ^= *s << 25;
        *s ^= *s >> 27;
        let r = s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
        (r as f64 / (1u64 << 53) as f64) < f
    }

    /// Hand `rows` to their local watchers where they are newer than what
    /// this server handed out before. Returns how many updates went out.
    fn deliver(&self, rows: &[PresenceRow]) -> usize {
        let mut out = Vec::new();
        {
            let mut w = self.lock();
            for r in rows {
                let Some(watchers) = w.watchers.get(&r.user) else {
                    continue;
                };
                let targets: Vec<UserRow> = watchers
                    .iter()
                    .map(|(channel, user)| UserRow {
                        user: *user,
                        channel: *channel,
                    })
                    .collect();
                let seen = w.view.entry(r.user).or_insert(0);
                if r.version <= *seen {
                    continue;
                }
                *seen = r.version;
                out.push((Update::from(r), targets));
            }
        }
        let n = out.len();
        for (u, targets) in out {
            self.connections.deliver(&Push::presence(u), &targets);
            self.metrics.delivered.inc();
        }
        n
    }

    /// One anti-entropy round: compare digests, fetch the buckets that
    /// differ, deliver what is newer.
    async fn repair(&self) -> anyhow::Result<usize> {
        let (users, local) = {
            let w = self.lock();
            let users: Vec<UserId> = w.watchers.keys().copied().collect();
            let mut local = vec![0u64; BUCKETS as usize];
            for u in &users {
                local[(u.0 % u64::from(BUCKETS)) as usize] += w.view.get(u).copied().unwrap_or(0);
            }
            (users, local)
        };
        if users.is_empty() {
            return Ok(0);
        }
        let remote = self.store.digest(&users, BUCKETS).await?;
        let stale: Vec<UserId> = users
            .into_iter()
            .filter(|u| {
                let b = (u.0 % u64::from(BUCKETS)) as usize;
                remote.get(b) != local.get(b)
            })
            .collect();
        if stale.is_empty() {
            return Ok(0);
        }
        let rows = self.store.rows(&stale).await?;
        let n = self.deliver(&rows);
        self.metrics.repaired.add(n as u64);
        Ok(n)
    }
}

/// Collects changed users for `coalesce_ms`, then announces each once with
/// its latest row: one `iim::send` to its contacts' connections.
async fn announce_loop(
    p: Arc<Presence>,
    iim: Iim,
    mut rx: mpsc::Receiver<UserId>,
    stop: CancellationToken,
) {
    let window = Duration::from_millis(p.cfg.coalesce_ms);
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            u = rx.recv() => match u { Some(u) => u, None => return },
        };
        let mut pending: HashSet<UserId> = HashSet::from([first]);
        let deadline = tokio::time::Instant::now() + window;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(deadline) => break,
                u = rx.recv() => match u { Some(u) => { pending.insert(u); } None => return },
            }
        }
        let users: Vec<UserId> = pending.into_iter().collect();
        let rows = match p.store.rows(&users).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "presence rows unavailable; repair will announce");
                continue;
            }
        };
        // Local watchers get it directly; remote ones through the relay.
        p.deliver(&rows);
        for r in rows {
            // A hint names its sender as the changer, and receivers check
            // that against the row. A row another server (or the registry)
            // changed since is not ours to announce: that server announces
            // it, and repair covers the registry's.
            if r.server != p.server {
                p.metrics.superseded.inc();
                debug!(
                    user = r.user.0,
                    changer = r.server.0,
                    "presence change superseded by another server's; not announced"
                );
                continue;
            }
            if let Err(e) = announce(&p, &iim, &r).await {
                debug!(error = %e, user = r.user.0, "announcement failed; repair will cover it");
            }
        }
    }
}

async fn announce(p: &Presence, iim: &Iim, row: &PresenceRow) -> anyhow::Result<()> {
    let contacts = p.store.contacts(row.user, p.cfg.broadcast_org_max).await?;
    let sessions: Vec<_> = p
        .registry
        .sessions_of(&contacts)
        .await?
        .into_iter()
        .filter(|s| s.server != p.server)
        .collect();
    if sessions.is_empty() {
        return Ok(());
    }
    let body = serde_json::to_vec(&Update::from(row))?;
    let out = Outgoing {
        kind: iim::kinds::PRESENCE,
        from: row.user,
        body: body.into(),
        ordering_key: row.user.0,
        ..Default::default()
    };
    iim.submit(out, &sessions).await?;
    p.metrics.announcements.inc();
    Ok(())
}

/// Verifies received hints against the database, in batches, and delivers
/// the database's state.
async fn verify_loop(
    p: Arc<Presence>,
    mut rx: mpsc::Receiver<(ServerId, Update)>,
    stop: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            h = rx.recv() => match h { Some(h) => h, None => return },
        };
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(h) => batch.push(h),
                Err(_) => break,
            }
        }
        let users: Vec<UserId> = batch.iter().map(|(_, u)| UserId(u.user)).collect();
        let rows = match p.store.rows(&users).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot verify presence hints; repair will cover them");
                continue;
            }
        };
        let by_user: HashMap<UserId, &PresenceRow> = rows.iter().map(|r| (r.user, r)).collect();
        let mut truth = Vec::new();
        for (origin, hint) in &batch {
            let db = by_user.get(&UserId(hint.user));
            let verdict = match db {
                Some(r)
                    if r.version == hint.version
                        && r.server == *origin
                        && r.status == hint.status
                        && r.text == hint.text =>
                {
                    "valid"
                }
                Some(r) if r.version > hint.version => "stale",
                _ => "forged",
            };
            p.metrics.hints.inc(verdict);
            if verdict == "forged" {
                warn!(
                    origin = origin.0,
                    user = hint.user,
                    version = hint.version,
                    "presence hint does not match the database; refused"
                );
                continue;
            }
            if let Some(r) = db {
                truth.push((*r).clone());
            }
        }
        p.deliver(&truth);
    }
}

/// Every `repair_ms`, and at once when the link to the exchange returns.
async fn repair_loop(
    p: Arc<Presence>,
    mut link: watch::Receiver<crate::LinkState>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(p.cfg.repair_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut linked = link.borrow().exchange.is_some();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            r = link.changed() => {
                if r.is_err() {
                    return;
                }
                let now = link.borrow().exchange.is_some();
                let back = now && !linked;
                linked = now;
                if !back {
                    continue;
                }
            }
        }
        match p.repair().await {
            Ok(0) => {}
            Ok(n) => debug!(updates = n, "presence repaired"),
            Err(e) => warn!(error = %e, "presence repair failed"),
        }
    }
}
