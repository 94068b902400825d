//! Reliable chat, the built-in plugin: a message is stored (with its
//! sequence in every recipient's inbox, or in a large group's timeline)
//! before it is acknowledged or pushed; the push goes through `iim::send`
//! and may be lost harmlessly, because clients sync by the highest sequence
//! they hold.

pub mod types;

pub use types::*;

use crate::metrics::ChatMetrics;

use iim::store::{Delivery, NewMessage, Store, StoreError, StoredMessage, Target};
use iim::types::{ChannelId, ServerId, Session, UserId, now_ms};
use iim::{Iim, Outgoing};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

/// Settings of the chat service.
#[derive(Clone, Copy, Debug)]
pub struct ChatConfig {
    /// Groups with more members than this are read from a group timeline.
    pub large_group_threshold: usize,
    /// Most messages in one sync page.
    pub sync_page_max: u32,
}

/// Bound of the push queue; beyond it pushes are dropped (clients sync).
const PUSH_QUEUE: usize = 4_096;

struct PushJob {
    delivery: Delivery,
    /// The connection that sent it: it has the ack, it gets no push.
    channel: ChannelId,
    members: Vec<UserId>,
}

/// The chat service of one app server.
pub struct Chat {
    store: Store,
    cfg: ChatConfig,
    pushes: mpsc::Sender<PushJob>,
    metrics: Arc<ChatMetrics>,
    server: ServerId,
}

impl Chat {
    /// Start the service; its push task stops with `stop`.
    pub fn new(
        store: Store,
        iim: Iim,
        cfg: ChatConfig,
        metrics: Arc<ChatMetrics>,
        stop: CancellationToken,
        tracker: &TaskTracker,
    ) -> Chat {
        let (tx, rx) = mpsc::channel(PUSH_QUEUE);
        let server = iim.server();
        tracker.spawn(push_loop(iim, rx, metrics.clone(), stop));
        Chat {
            store,
            cfg,
            pushes: tx,
            metrics,
            server,
        }
    }

    /// Store, then push (in order, through the relay), then acknowledge.
    /// `channel` is the sending connection: it gets the ack, not a push.
    pub async fn send(
        &self,
        user: UserId,
        channel: ChannelId,
        req: SendRequest,
    ) -> Result<SendAck, ChatError> {
        let target = match req.ope {
            Ope::Single => Target::User(UserId(req.to)),
            Ope::Group => Target::Group(req.to),
        };
        let new = NewMessage {
            sender: user,
            req: req.req.as_str(),
            target,
            kind: req.kind.as_str(),
            body: req.body.get(),
            ex: req.ex.as_ref().map(|e| e.get()),
            ts_ms: now_ms(),
        };
        let d = self
            .store
            .store_message(&new, self.cfg.large_group_threshold)
            .await
            .map_err(store_error)?;
        // A resend repeats the message exactly; the same req for another
        // target or contents is refused, and nothing is pushed for it.
        if d.duplicate && !same_message(&d.message, &new) {
            return Err(ChatError::ReqReused(req.req.as_str().to_owned()));
        }
        let ack = SendAck {
            req: req.req,
            id: d.message.id,
            seq: d.sender_seq,
            gseq: d.gseq,
            ts: d.message.ts_ms,
            duplicate: d.duplicate,
        };
        if d.duplicate {
            self.metrics.duplicates.inc();
        } else {
            self.metrics.stored.inc();
        }
        // A resend is pushed again too: the first push may never have
        // happened (the server died between storing and pushing); clients
        // ignore what they already hold.
        // Pushed to the stored message's recipients, never the request's.
        let members = match (d.gseq, d.message.target) {
            (Some(_), Target::Group(g)) => match self.store.group(g).await {
                Ok(Some(g)) => g.members,
                _ => Vec::new(),
            },
            _ => d.inbox.iter().map(|(u, _)| *u).collect(),
        };
        let job = PushJob {
            delivery: d,
            channel,
            members,
        };
        if self.pushes.try_send(job).is_err() {
            self.metrics.pushes_dropped.inc();
        }
        Ok(ack)
    }

    /// A page of the inbox (or of a large group's timeline) above `since`.
    pub async fn sync(&self, user: UserId, req: SyncRequest) -> Result<SyncPage, ChatError> {
        let limit = req.limit.clamp(1, self.cfg.sync_page_max);
        let page = match req.group {
            None => self.store.inbox_since(user, req.since, limit + 1).await,
            Some(g) => {
                let group = self
                    .store
                    .group(g)
                    .await
                    .map_err(store_error)?
                    .ok_or(ChatError::UnknownGroup(g))?;
                if !group.members.contains(&user) {
                    return Err(ChatError::NotMember(g));
                }
                self.store.timeline_since(g, req.since, limit + 1).await
            }
        }
        .map_err(store_error)?;
        if req.since > page.max {
            return Err(ChatError::BadRequest(format!(
                "since {} is beyond the latest sequence {}",
                req.since, page.max
            )));
        }
        let more = page.items.len() > limit as usize;
        let messages = page
            .items
            .into_iter()
            .take(limit as usize)
            .map(|(seq, m)| {
                let (s, g) = if req.group.is_some() {
                    (None, Some(seq))
                } else {
                    (Some(seq), None)
                };
                to_client(m, s, g)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SyncPage {
            group: req.group,
            messages,
            max: page.max,
            more,
        })
    }

    /// What a freshly authenticated client is told.
    pub async fn welcome(&self, user: UserId, device: &str) -> Result<Welcome, ChatError> {
        // A valid token for someone the directory does not know is refused:
        // they could not send or be sent anything.
        if self.store.user(user).await.map_err(store_error)?.is_none() {
            return Err(ChatError::UnknownUser(user.0));
        }
        let inbox_max = self.store.inbox_max(user).await.map_err(store_error)?;
        let large_groups = self
            .store
            .groups_of(user)
            .await
            .map_err(store_error)?
            .into_iter()
            .filter(|g| g.members as usize > self.cfg.large_group_threshold)
            .map(|g| LargeGroup {
                group: g.id,
                max: g.timeline_max,
            })
            .collect();
        Ok(Welcome {
            user: user.0,
            device: device.to_string(),
            server: self.server.0,
            inbox_max,
            large_groups,
        })
    }
}

fn store_error(e: StoreError) -> ChatError {
    match e {
        StoreError::UnknownUser(u) => ChatError::UnknownUser(u),
        StoreError::UnknownGroup(g) => ChatError::UnknownGroup(g),
        StoreError::NotMember(g) => ChatError::NotMember(g),
        other => {
            warn!(error = %other, "message store error");
            ChatError::Unavailable
        }
    }
}

/// A stored message as clients see it.
fn to_client(
    m: StoredMessage,
    seq: Option<u64>,
    gseq: Option<u64>,
) -> Result<ChatMessage, ChatError> {
    let raw = |s: String| {
        RawValue::from_string(s).map_err(|e| {
            warn!(error = %e, "stored message body is not JSON");
            ChatError::Unavailable
        })
    };
    let (ope, to) = match m.target {
        Target::User(u) => (Ope::Single, u.0),
        Target::Group(g) => (Ope::Group, g),
    };
    Ok(ChatMessage {
        seq,
        gseq,
        id: m.id,
        req: m.req,
        ope,
        from: m.sender.0,
        to,
        kind: m.kind,
        body: raw(m.body)?,
        ex: m.ex.map(raw).transpose()?,
        ts: m.ts_ms,
    })
}

/// Pushes stored messages through the relay, one at a time, in the order
/// they were stored by this server: one `iim::send` per message to every
/// live connection of its recipients (except the sending connection).
/// Most queued pushes whose recipients are looked up in one query.
const PUSH_BATCH: usize = 64;

async fn push_loop(
    iim: Iim,
    mut rx: mpsc::Receiver<PushJob>,
    metrics: Arc<ChatMetrics>,
    stop: CancellationToken,
) {
    let mut jobs = Vec::with_capacity(PUSH_BATCH);
    loop {
        jobs.clear();
        let n = tokio::select! {
            _ = stop.cancelled() => return,
            n = rx.recv_many(&mut jobs, PUSH_BATCH) => n,
        };
        if n == 0 {
            return;
        }
        // One sessions query for everything queued: under load the pushes
        // wait for one round trip, not one each.
        let users: Vec<UserId> = jobs
            .iter()
            .flat_map(|j| j.members.iter().copied())
            .collect();
        let sessions = match iim.user_list(&users).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, pushes = n, "cannot look up sessions for pushes");
                metrics.pushes_dropped.add(n as u64);
                continue;
            }
        };
        let mut by_user: HashMap<UserId, Vec<Session>> = HashMap::new();
        for s in sessions {
            by_user.entry(s.user).or_default().push(s);
        }
        for job in jobs.drain(..) {
            if !push(&iim, &job, &by_user, &metrics).await {
                return;
            }
        }
    }
}

/// Submit one push to the live sessions of its members. `false` when the
/// relay is shutting down.
async fn push(
    iim: &Iim,
    job: &PushJob,
    by_user: &HashMap<UserId, Vec<Session>>,
    metrics: &ChatMetrics,
) -> bool {
    let d = &job.delivery;
    let sessions: Vec<Session> = job
        .members
        .iter()
        .filter_map(|u| by_user.get(u))
        .flatten()
        .filter(|s| !(s.server == iim.server() && s.channel == job.channel))
        .cloned()
        .collect();
    if sessions.is_empty() {
        return true;
    }
    let Ok(m) = to_client(d.message.clone(), None, None) else {
        return true;
    };
    let env = PushEnvelope {
        m,
        seqs: d.inbox.iter().map(|(u, s)| (u.0, *s)).collect(),
        gseq: d.gseq,
    };
    let Ok(body) = serde_json::to_vec(&env) else {
        return true;
    };
    let out = Outgoing {
        kind: iim::kinds::CHAT,
        from: d.message.sender,
        body: body.into(),
        ordering_key: d.message.id,
        ..Default::default()
    };
    // Admission only: the report is not awaited, a lost push is repaired
    // by the recipient's next sync.
    match iim.submit(out, &sessions).await {
        Ok(_) => metrics.pushes.inc(),
        Err(iim::SendError::ShuttingDown) => return false,
        Err(e @ (iim::SendError::TooLarge { .. } | iim::SendError::ReservedKind(_))) => {
            warn!(error = %e, id = d.message.id, "push not accepted by the relay; recipients will sync");
            metrics.pushes_dropped.inc();
        }
    }
    true
}

/// `new` is `stored` sent again: same target, type, body and extensions,
/// byte for byte.
fn same_message(stored: &StoredMessage, new: &NewMessage<'_>) -> bool {
    stored.target == new.target
        && stored.kind == new.kind
        && stored.body == new.body
        && stored.ex.as_deref() == new.ex
}
