//! The plugin-facing API: [`Iim::send`] and the [`Plugin`] trait.
//!
//! `send(msg, user_list)` splits the user list by server: recipients on this
//! server are handed to the local delivery path in-process; all remote
//! recipients go into exactly one 905 for the exchange, whatever the number
//! of target servers. The returned [`SendReport`] says, per target server,
//! what became of the message. This module owns message-id and per-target
//! sequence allocation; the link to the exchange (in the app server) owns
//! retransmission and the reports.
//!
//! A handle is either the app server's own (its built-in services, the
//! admin API, the program embedding it) or a plugin's ([`Iim::for_plugin`],
//! what [`Plugin::start`] receives): a plugin's handle refuses the kinds
//! reserved by iim ([`crate::kinds`]).

use crate::kinds::Reserved;
use crate::registry::{Registry, RegistryError};
use crate::types::{Address, MessageId, ServerId, Session, UserId, now_ms};
use crate::wire::{self, DeliveryStatus, Message, ReportEntry, Timing, UserRow};
use bytes::Bytes;
use iim_core::origin::Origin;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// What a plugin sends; the relay fills in id, source and timing.
#[derive(Clone, Debug, Default)]
pub struct Outgoing {
    pub kind: u16,
    /// The sending user on this server (0 for the server itself).
    pub from: UserId,
    pub body: Bytes,
    pub nested: Vec<Message>,
    pub ordering_key: u64,
}

/// One 905 handed to the link: already encoded, with the servers it names.
#[derive(Debug)]
pub struct Submit {
    pub id: MessageId,
    pub frame: Bytes,
    pub targets: Vec<ServerId>,
    pub reply: oneshot::Sender<Vec<ReportEntry>>,
}

/// Outcome of local (in-process) delivery.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalReport {
    /// Connections that took the message.
    pub delivered: usize,
    /// Listed connections that no longer exist on this server.
    pub missing: usize,
}

/// The app server's in-process delivery path: hands a message to the
/// listed connections of this server and to the plugins.
pub trait LocalDelivery: Send + Sync + 'static {
    fn deliver(&self, msg: &Arc<Message>, rows: &[UserRow]) -> LocalReport;
}

/// What `send` reports: local outcome plus one status per remote server.
///
/// What each status says of whether the target server was handed the
/// message (`docs/protocol.md` §5.5):
/// - `delivered`: yes.
/// - `unknown_server`, `refused`, `overloaded`: no, and it never will be.
/// - `server_down`: not known — the target ended before acknowledging; a
///   copy in flight may have reached it.
/// - `timed_out`: not known — no certain outcome within the deadline (also
///   what an `overloaded` becomes for a 905 sent again after a link loss,
///   whose earlier copy may have been delivered).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendReport {
    pub id: MessageId,
    pub local: LocalReport,
    /// One entry per target server of the 905, ordered by server id.
    pub servers: Vec<(ServerId, DeliveryStatus)>,
}

impl SendReport {
    /// Every remote target acknowledged the 906.
    pub fn all_delivered(&self) -> bool {
        self.servers
            .iter()
            .all(|(_, s)| *s == DeliveryStatus::Delivered)
    }

    pub fn status_of(&self, server: ServerId) -> Option<DeliveryStatus> {
        self.servers
            .iter()
            .find(|(s, _)| *s == server)
            .map(|(_, st)| *st)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    #[error("the app server is shutting down")]
    ShuttingDown,
    #[error("message of {len} bytes exceeds the frame limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// A plugin tried to send a kind reserved by iim (see [`crate::kinds`]).
    #[error("message kind {0} is reserved by iim; plugins send other kinds")]
    ReservedKind(Reserved),
}

/// Server-side features (chat, presence, bots) implement this.
pub trait Plugin: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Called once the app server has its epoch; keep `iim` to send later.
    /// It is a plugin's handle: sending a kind reserved by iim
    /// ([`crate::kinds`]) fails with [`SendError::ReservedKind`].
    fn start(&self, iim: Iim) {
        let _ = iim;
    }

    /// A message for users of this server arrived, locally or by 906, and
    /// after it was deduplicated. Runs on the delivery path: must not block.
    fn on_message(&self, msg: &Arc<Message>, recipients: &[UserRow]);
}

struct Inner {
    server: ServerId,
    epoch: u64,
    exchange: ServerId,
    max_frame: Arc<AtomicUsize>,
    link: mpsc::Sender<Submit>,
    /// Message ids and per-target sequences; held while a 905 is numbered
    /// and handed to the link, so the link sees them in sequence order.
    origin: Mutex<Origin>,
    local: Arc<dyn LocalDelivery>,
    closing: CancellationToken,
    registry: Registry,
}

/// Handle to the relay on one app server. Cheap to clone.
#[derive(Clone)]
pub struct Iim {
    inner: Arc<Inner>,
    /// False for a plugin's handle: the kinds reserved by iim are refused.
    may_send_reserved: bool,
}

impl std::fmt::Debug for Iim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iim")
            .field("server", &self.inner.server)
            .field("epoch", &self.inner.epoch)
            .field("may_send_reserved", &self.may_send_reserved)
            .finish()
    }
}

/// Parameters of an [`Iim`] handle, set by the app server at start.
pub struct IimParts {
    pub server: ServerId,
    pub epoch: u64,
    pub exchange: ServerId,
    /// Largest 905 body; shared with the link, which lowers it to what the
    /// exchange announces it accepts.
    pub max_frame: Arc<AtomicUsize>,
    pub link: mpsc::Sender<Submit>,
    pub local: Arc<dyn LocalDelivery>,
    /// Cancelled when the server starts draining: new sends are refused.
    pub closing: CancellationToken,
    pub registry: Registry,
}

impl Iim {
    /// The app server's own handle: it may send every kind, the reserved
    /// ones included (its built-in services use it).
    pub fn new(parts: IimParts) -> Iim {
        Iim {
            inner: Arc::new(Inner {
                server: parts.server,
                epoch: parts.epoch,
                exchange: parts.exchange,
                max_frame: parts.max_frame,
                link: parts.link,
                origin: Mutex::new(Origin::new(parts.server, parts.epoch)),
                local: parts.local,
                closing: parts.closing,
                registry: parts.registry,
            }),
            may_send_reserved: true,
        }
    }

    /// The same relay, as a plugin may use it: sending a kind reserved by
    /// iim fails with [`SendError::ReservedKind`].
    pub fn for_plugin(&self) -> Iim {
        Iim {
            inner: self.inner.clone(),
            may_send_reserved: false,
        }
    }

    /// True for a handle that may send the kinds reserved by iim.
    pub fn may_send_reserved(&self) -> bool {
        self.may_send_reserved
    }

    pub fn server(&self) -> ServerId {
        self.inner.server
    }

    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    /// The user list for `send`: every live connection of these users, on
    /// any server, with its server and channel, in one registry query.
    pub async fn user_list(&self, users: &[UserId]) -> Result<Vec<Session>, RegistryError> {
        self.inner.registry.sessions_of(users).await
    }

    /// Send `msg` to every session in `users` and wait for the report.
    pub async fn send(&self, msg: Outgoing, users: &[Session]) -> Result<SendReport, SendError> {
        Ok(self.submit(msg, users).await?.await)
    }

    /// Hand `msg` to the relay and return as soon as its order is fixed;
    /// the returned future resolves to the report. Successive `submit`s from
    /// one task keep their order end to end. Waits while the link's
    /// outstanding-message bound is reached.
    pub async fn submit(
        &self,
        msg: Outgoing,
        users: &[Session],
    ) -> Result<PendingReport, SendError> {
        let inner = &self.inner;
        if !self.may_send_reserved
            && let Some(kind) = Reserved::of(msg.kind)
        {
            return Err(SendError::ReservedKind(kind));
        }
        if inner.closing.is_cancelled() {
            return Err(SendError::ShuttingDown);
        }
        let mut local_rows = Vec::new();
        let mut remote: Vec<(ServerId, UserRow)> = Vec::with_capacity(users.len());
        for s in users {
            let row = UserRow {
                user: s.user,
                channel: s.channel,
            };
            if s.server == inner.server {
                local_rows.push(row);
            } else {
                remote.push((s.server, row));
            }
        }
        // Grouped by server, ordered by server id; stable, so each server's
        // users keep the caller's order.
        remote.sort_by_key(|(server, _)| *server);
        let mut message = Message {
            id: MessageId {
                origin: inner.server,
                epoch: inner.epoch,
                seq: 0,
            },
            source: Address::new(inner.server, msg.from),
            target: Address::RECEIVER,
            kind: msg.kind,
            timing: Timing {
                sent_at_ms: now_ms(),
                ordering_key: msg.ordering_key,
            },
            body: msg.body,
            nested: msg.nested,
        };
        let pending_rx = if remote.is_empty() {
            message.id = inner
                .origin
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .next_id();
            None
        } else {
            // Room in the link's queue is the usual case: no wait, and no
            // waiter registered on the shutdown token.
            let permit = match inner.link.try_reserve() {
                Ok(permit) => permit,
                Err(mpsc::error::TrySendError::Closed(())) => return Err(SendError::ShuttingDown),
                Err(mpsc::error::TrySendError::Full(())) => tokio::select! {
                    permit = inner.link.reserve() => permit.map_err(|_| SendError::ShuttingDown)?,
                    _ = inner.closing.cancelled() => return Err(SendError::ShuttingDown),
                },
            };
            let (tx, rx) = oneshot::channel();
            let max_frame = inner.max_frame.load(Ordering::Relaxed);
            // Numbering and the hand-off to the link happen under one lock
            // so the link sees messages in sequence order.
            let mut origin = inner.origin.lock().unwrap_or_else(|e| e.into_inner());
            let fwd = origin
                .forward(&mut message, remote, inner.exchange, max_frame)
                .map_err(|e| match e {
                    wire::WireError::Oversized { len, max } => SendError::TooLarge { len, max },
                    _ => SendError::TooLarge {
                        len: usize::MAX,
                        max: max_frame,
                    },
                })?;
            let targets = fwd.targets.clone();
            permit.send(Submit {
                id: fwd.id,
                frame: fwd.frame,
                targets: fwd.targets,
                reply: tx,
            });
            drop(origin);
            Some((rx, targets))
        };
        let id = message.id;
        let local = if local_rows.is_empty() {
            LocalReport::default()
        } else {
            inner.local.deliver(&Arc::new(message), &local_rows)
        };
        Ok(PendingReport {
            id,
            local,
            rx: pending_rx,
        })
    }
}

/// A report still on its way. Resolves when every target server has an
/// outcome; if the app server stops first, the remaining targets read
/// [`DeliveryStatus::TimedOut`].
pub struct PendingReport {
    id: MessageId,
    local: LocalReport,
    rx: Option<(oneshot::Receiver<Vec<ReportEntry>>, Vec<ServerId>)>,
}

impl PendingReport {
    pub fn id(&self) -> MessageId {
        self.id
    }
}

impl Future for PendingReport {
    type Output = SendReport;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SendReport> {
        let (id, local) = (self.id, self.local);
        let servers = match self.rx.as_mut() {
            None => Vec::new(),
            Some((rx, targets)) => match Pin::new(rx).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(entries)) => {
                    let mut v: Vec<_> = entries.into_iter().map(|e| (e.server, e.status)).collect();
                    v.sort_by_key(|(s, _)| *s);
                    v
                }
                // The link dropped the request: it is shutting down.
                Poll::Ready(Err(_)) => targets
                    .iter()
                    .map(|s| (*s, DeliveryStatus::TimedOut))
                    .collect(),
            },
        };
        Poll::Ready(SendReport { id, local, servers })
    }
}
