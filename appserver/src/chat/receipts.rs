//! Read receipts and typing indicators (docs/client-protocol.md §4.6).
//!
//! A `read` moves the reader's position in one conversation forward and
//! stores it (`iim::store`'s read positions) before anyone is told, so a
//! lost receipt push is repaired by `read_state` at the next connect. The
//! position is the reader's own sequence; what the others are told is the
//! last message of the conversation at or below it, as each one's own
//! inbox sequence (its inbox rows, one query): every client shows receipts
//! against the sequences it already holds.
//!
//! Fan-out: a receipt goes to the reader's other connections and, in 1:1
//! conversations and groups of at most [`RECEIPT_GROUP_MAX`] members, to
//! every other member's connections — one relay send per `read`, to all of
//! them. In larger groups each read would reach every member, and a round
//! of everybody reading costs members² frames: there only the reader's own
//! devices are told. Typing follows the same rule and is never stored.
//!
//! Both travel through the relay like presence hints, as their own
//! reserved kinds; the receiving server checks that the envelope names the
//! message's source user ([`crate::push`]) and renders each connection's
//! frame.

use super::{ChatError, Ope, store_error};
use crate::metrics::ReceiptMetrics;
use iim::store::{Store, Target};
use iim::types::{ChannelId, Session, UserId};
use iim::{Iim, Outgoing};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tracing::{debug, warn};

/// Groups with at most this many members get per-reader receipts and
/// typing indicators; larger ones only tell the reader's own devices.
pub const RECEIPT_GROUP_MAX: usize = 32;
/// How long a client shows "typing…" after a `typing` push, unless
/// another one arrives (the `expires_in` of the push).
pub const TYPING_EXPIRES_MS: u64 = 6_000;

/// The body of a receipt on the relay (kind `iim::kinds::RECEIPT`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptEnvelope {
    pub reader: u64,
    pub ope: Ope,
    /// The conversation as the reader sends to it.
    pub to: u64,
    /// The last message the reader has read.
    pub id: u64,
    /// `(user, that user's inbox sequence of message id)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seqs: Vec<(u64, u64)>,
    /// A large group: the reader's timeline position (own devices only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gseq: Option<u64>,
}

/// The body of a typing indicator on the relay (kind `iim::kinds::TYPING`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypingEnvelope {
    pub from: u64,
    pub ope: Ope,
    /// The conversation as the typist sends to it.
    pub to: u64,
}

/// The answer to a `read`: the position now stored (which may be beyond
/// the one asked for, when another device read further).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadSet {
    pub ope: Ope,
    pub to: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gseq: Option<u64>,
    /// False when the position was there or beyond already.
    pub moved: bool,
}

/// One of the user's own positions, in `read_state`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MyRead {
    pub ope: Ope,
    pub to: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gseq: Option<u64>,
}

/// Another member's position in one of the user's conversations, in the
/// user's own inbox sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TheirRead {
    pub reader: u64,
    pub ope: Ope,
    /// The conversation as the user sends to it.
    pub to: u64,
    pub seq: u64,
}

/// The answer to `read_state`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadState {
    pub mine: Vec<MyRead>,
    pub theirs: Vec<TheirRead>,
}

/// A conversation, checked: who is in it and how it is read.
enum Conversation {
    Single(UserId),
    /// A write-fan-out group and its members.
    Small(u64, Vec<UserId>),
    /// A read-fan-out group: positions are timeline sequences.
    Large(u64),
}

impl Conversation {
    fn target(&self) -> Target {
        match self {
            Conversation::Single(u) => Target::User(*u),
            Conversation::Small(g, _) | Conversation::Large(g) => Target::Group(*g),
        }
    }
}

/// Read receipts and typing indicators of one app server.
pub struct Receipts {
    store: Store,
    iim: Iim,
    large_group_threshold: usize,
    metrics: Arc<ReceiptMetrics>,
}

impl Receipts {
    pub fn new(
        store: Store,
        iim: Iim,
        large_group_threshold: usize,
        metrics: Arc<ReceiptMetrics>,
    ) -> Receipts {
        Receipts {
            store,
            iim,
            large_group_threshold,
            metrics,
        }
    }

    /// The conversation `user` names with `ope` and `to`, if it exists and
    /// `user` is in it.
    async fn conversation(
        &self,
        user: UserId,
        ope: Ope,
        to: u64,
    ) -> Result<Conversation, ChatError> {
        match ope {
            Ope::Single => {
                let peer = UserId(to);
                if self.store.user(peer).await.map_err(store_error)?.is_none() {
                    return Err(ChatError::UnknownUser(to));
                }
                Ok(Conversation::Single(peer))
            }
            Ope::Group => {
                let group = self
                    .store
                    .group(to)
                    .await
                    .map_err(store_error)?
                    .ok_or(ChatError::UnknownGroup(to))?;
                if !group.members.contains(&user) {
                    return Err(ChatError::NotMember(to));
                }
                if group.members.len() > self.large_group_threshold {
                    Ok(Conversation::Large(to))
                } else {
                    Ok(Conversation::Small(to, group.members))
                }
            }
        }
    }

    /// `user` has read the conversation up to `seq` (its inbox sequence, or
    /// the large group's timeline sequence). `channel` is the reading
    /// connection: it has the answer, it gets no receipt.
    pub async fn read(
        &self,
        user: UserId,
        channel: ChannelId,
        ope: Ope,
        to: u64,
        seq: u64,
    ) -> Result<ReadSet, ChatError> {
        let conv = self.conversation(user, ope, to).await?;
        let max = match &conv {
            Conversation::Large(g) => self.store.timeline_max(*g).await,
            _ => self.store.inbox_max(user).await,
        }
        .map_err(store_error)?;
        if seq > max {
            self.metrics.refused.inc();
            return Err(ChatError::BadRequest(format!(
                "seq: {seq} is beyond the latest sequence {max}"
            )));
        }
        let message = match &conv {
            Conversation::Large(g) => self.store.timeline_message(*g, seq).await,
            _ => self
                .store
                .last_in_conversation(user, conv.target(), seq)
                .await
                .map(|m| m.map(|(_, id)| id)),
        }
        .map_err(store_error)?;
        let (pos, moved) = self
            .store
            .mark_read(user, conv.target(), seq, message.unwrap_or(0))
            .await
            .map_err(store_error)?;
        if moved {
            self.metrics.moved.inc();
        } else {
            self.metrics.unchanged.inc();
        }
        if moved
            && let Some(id) = message
            && let Err(e) = self.tell(user, channel, ope, to, &conv, id, seq).await
        {
            // Stored all the same: the answer says so, and `read_state`
            // gives the position to whoever missed the receipt.
            warn!(error = %e, "receipt not pushed");
            self.metrics.dropped.inc();
        }
        let large = matches!(conv, Conversation::Large(_));
        Ok(ReadSet {
            ope,
            to,
            seq: (!large).then_some(pos.seq),
            gseq: large.then_some(pos.seq),
            moved,
        })
    }

    /// Push the receipt for message `id` to the reader's other connections
    /// and, in 1:1 and small groups, to the other members'. A relay that
    /// refuses it is counted, not an error: the position is stored and
    /// `read_state` returns it. An error is a failed look-up of the
    /// message's inboxes.
    #[allow(clippy::too_many_arguments)]
    async fn tell(
        &self,
        user: UserId,
        channel: ChannelId,
        ope: Ope,
        to: u64,
        conv: &Conversation,
        id: u64,
        seq: u64,
    ) -> Result<(), ChatError> {
        let env = match conv {
            Conversation::Large(_) => ReceiptEnvelope {
                reader: user.0,
                ope,
                to,
                id,
                seqs: Vec::new(),
                gseq: Some(seq),
            },
            _ => {
                let mut rows = self.store.inbox_rows_of(id).await.map_err(store_error)?;
                match conv {
                    Conversation::Small(_, members) if members.len() <= RECEIPT_GROUP_MAX => {
                        // Members who left since keep their inbox rows but
                        // are told nothing more.
                        rows.retain(|(u, _)| members.binary_search(u).is_ok());
                    }
                    Conversation::Single(_) => {}
                    _ => rows.retain(|(u, _)| *u == user),
                }
                ReceiptEnvelope {
                    reader: user.0,
                    ope,
                    to,
                    id,
                    seqs: rows.into_iter().map(|(u, s)| (u.0, s)).collect(),
                    gseq: None,
                }
            }
        };
        let users: Vec<UserId> = if env.gseq.is_some() {
            vec![user]
        } else {
            env.seqs.iter().map(|(u, _)| UserId(*u)).collect()
        };
        let body = serde_json::to_vec(&env).map_err(|e| {
            warn!(error = %e, "receipt not encodable");
            ChatError::Unavailable
        })?;
        let n = self
            .submit(iim::kinds::RECEIPT, user, &users, Some(channel), body)
            .await;
        self.metrics.receipts.add(n as u64);
        Ok(())
    }

    /// Submit `body` of `kind` from `user` to every live connection of
    /// `users` but `skip`; how many connections it went to (0 when the
    /// relay refused it, counted).
    async fn submit(
        &self,
        kind: u16,
        user: UserId,
        users: &[UserId],
        skip: Option<ChannelId>,
        body: Vec<u8>,
    ) -> usize {
        let sessions: Vec<Session> = match self.iim.user_list(users).await {
            Ok(s) => s
                .into_iter()
                .filter(|s| !(s.server == self.iim.server() && Some(s.channel) == skip))
                .collect(),
            Err(e) => {
                warn!(error = %e, "cannot look up sessions for a receipt or typing push");
                self.metrics.dropped.inc();
                return 0;
            }
        };
        if sessions.is_empty() {
            return 0;
        }
        let out = Outgoing {
            kind,
            from: user,
            body: body.into(),
            ordering_key: user.0,
            ..Default::default()
        };
        match self.iim.submit(out, &sessions).await {
            Ok(_) => sessions.len(),
            Err(e) => {
                debug!(error = %e, "receipt or typing push not accepted by the relay");
                self.metrics.dropped.inc();
                0
            }
        }
    }

    /// `user` is typing in a conversation: its other members' connections
    /// are told (never stored). Large groups, and groups of more than
    /// [`RECEIPT_GROUP_MAX`] members, are refused.
    pub async fn typing(&self, user: UserId, ope: Ope, to: u64) -> Result<(), ChatError> {
        let others: Vec<UserId> = match self.conversation(user, ope, to).await? {
            Conversation::Single(peer) if peer == user => Vec::new(),
            Conversation::Single(peer) => vec![peer],
            Conversation::Small(_, members) if members.len() <= RECEIPT_GROUP_MAX => {
                members.into_iter().filter(|m| *m != user).collect()
            }
            _ => {
                self.metrics.refused.inc();
                return Err(ChatError::BadRequest(format!(
                    "to: typing is shown in groups of at most {RECEIPT_GROUP_MAX} members"
                )));
            }
        };
        let env = TypingEnvelope {
            from: user.0,
            ope,
            to,
        };
        let body = serde_json::to_vec(&env).map_err(|_| ChatError::Unavailable)?;
        let n = self
            .submit(iim::kinds::TYPING, user, &others, None, body)
            .await;
        self.metrics.typing.add(n as u64);
        Ok(())
    }

    /// Where `user` stands in its conversations, and where the others stand
    /// in them (1:1 and groups of at most [`RECEIPT_GROUP_MAX`] members),
    /// in `user`'s own sequences.
    pub async fn read_state(&self, user: UserId) -> Result<ReadState, ChatError> {
        let groups = self.store.groups_of(user).await.map_err(store_error)?;
        let large: Vec<u64> = groups
            .iter()
            .filter(|g| g.members as usize > self.large_group_threshold)
            .map(|g| g.id)
            .collect();
        let small: Vec<u64> = groups
            .iter()
            .filter(|g| {
                g.members as usize <= self.large_group_threshold
                    && g.members as usize <= RECEIPT_GROUP_MAX
            })
            .map(|g| g.id)
            .collect();
        let mine = self
            .store
            .read_positions(user)
            .await
            .map_err(store_error)?
            .into_iter()
            .map(|p| match p.conversation {
                Target::User(u) => MyRead {
                    ope: Ope::Single,
                    to: u.0,
                    seq: Some(p.seq),
                    gseq: None,
                },
                Target::Group(g) => {
                    let is_large = large.contains(&g);
                    MyRead {
                        ope: Ope::Group,
                        to: g,
                        seq: (!is_large).then_some(p.seq),
                        gseq: is_large.then_some(p.seq),
                    }
                }
            })
            .collect();
        let theirs = self
            .store
            .others_reads(user, &small)
            .await
            .map_err(store_error)?
            .into_iter()
            .map(|r| match r.conversation {
                // The reader's conversation with `user` is, for `user`,
                // the one with the reader.
                Target::User(_) => TheirRead {
                    reader: r.reader.0,
                    ope: Ope::Single,
                    to: r.reader.0,
                    seq: r.seq,
                },
                Target::Group(g) => TheirRead {
                    reader: r.reader.0,
                    ope: Ope::Group,
                    to: g,
                    seq: r.seq,
                },
            })
            .collect();
        Ok(ReadState { mine, theirs })
    }
}
