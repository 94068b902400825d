//! A WebSocket client of the client gateway, speaking
//! docs/client-protocol.md with the gateway's own frame types ([`frame`]),
//! and [`Device`], a model of a correct device on top of it.
//!
//! Tests, `iimctl chat` and `chat-bench` connect through it. It keeps the
//! pushes that arrive while it waits for an answer, applies presence
//! frames to a view of contacts, and never panics on what a server sends:
//! a frame it cannot read is an error to the caller.

mod device;
pub mod frame;

pub use device::Device;
pub use frame::{ErrorFrame, Frame, Notice, Receipt, Request, StatusSet, Typing, body_text};
pub use iim_appserver::chat::receipts::{MyRead, ReadSet, ReadState, TheirRead};
pub use iim_appserver::chat::{ChatMessage, LargeGroup, Ope, SendAck, SyncPage, Welcome};
pub use iim_appserver::presence::Update;

use futures_util::{SinkExt, StreamExt};
use iim::presence::Status;
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The WebSocket under a [`ChatClient`].
pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a request waits for its answer.
pub const ANSWER_WAIT: Duration = Duration::from_secs(20);
/// The largest sync page asked for.
const PAGE: u32 = 200;
/// How long [`ChatClient::close`] waits for the server's side of the close.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// WebSocket close code of a policy refusal (a bad token): final.
const POLICY: u16 = 1008;

/// Why a connection or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tokio_tungstenite::tungstenite::Error,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("closed by the server{}", close_text(*.code, reason))]
    Closed { code: Option<u16>, reason: String },
    /// An `error` frame where an answer was expected.
    #[error("{}: {}", .0.code, .0.message)]
    Refused(ErrorFrame),
    #[error("expected {expected}, got {got:?}")]
    Unexpected {
        expected: &'static str,
        got: Box<Frame>,
    },
    #[error("unreadable frame ({source}): {text}")]
    Malformed {
        text: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
}

fn close_text(code: Option<u16>, reason: &str) -> String {
    match code {
        Some(c) => format!(": {c} {reason}"),
        None => String::new(),
    }
}

impl ClientError {
    /// The `code` of a refusal.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Refused(e) => Some(&e.code),
            _ => None,
        }
    }

    /// Trying again cannot help: the credentials were refused.
    pub fn is_fatal(&self) -> bool {
        match self {
            ClientError::Refused(e) => e.code.starts_with("auth_"),
            ClientError::Closed { code, .. } => *code == Some(POLICY),
            _ => false,
        }
    }
}

/// `ws://ADDR/ws`.
pub fn ws_url(addr: impl std::fmt::Display) -> String {
    format!("ws://{addr}/ws")
}

pub struct ChatClient {
    ws: Socket,
    pub user: u64,
    /// What the server said on `auth` (`None` before that).
    pub welcome: Option<Welcome>,
    /// Pushes that arrived while waiting for answers.
    pushes: VecDeque<Frame>,
    /// The connection ended (closed or reset).
    pub ended: bool,
    /// Presence of contacts as this client has been told: user -> the
    /// update with the highest version (as the protocol says to apply them).
    pub presence: BTreeMap<u64, Update>,
    /// `presence` frames received.
    pub presence_frames: usize,
}

impl ChatClient {
    /// Connect to `ws://addr/ws` without authenticating.
    pub async fn raw(addr: SocketAddr) -> Result<ChatClient, ClientError> {
        ChatClient::raw_url(&ws_url(addr)).await
    }

    /// Connect to a `ws://` URL without authenticating. Nagle is off: pushes
    /// and answers are small writes that must not wait.
    pub async fn raw_url(url: &str) -> Result<ChatClient, ClientError> {
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
            .await
            .map_err(|source| ClientError::Connect {
                url: url.to_owned(),
                source,
            })?;
        Ok(ChatClient::over(ws))
    }

    /// Connect to `ws://addr/ws` from `local` (a source address chosen by
    /// the caller, e.g. one of several 127.0.0.x when one address's
    /// ephemeral ports would not do) with WebSocket settings `config`,
    /// without authenticating. Nagle is off.
    pub async fn raw_from(
        local: std::net::IpAddr,
        addr: SocketAddr,
        config: tokio_tungstenite::tungstenite::protocol::WebSocketConfig,
    ) -> Result<ChatClient, ClientError> {
        let url = ws_url(addr);
        let io = |e: std::io::Error| ClientError::Connect {
            url: url.clone(),
            source: e.into(),
        };
        let socket = match local {
            std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .map_err(io)?;
        socket.bind(SocketAddr::new(local, 0)).map_err(io)?;
        let stream = socket.connect(addr).await.map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        let (ws, _) = tokio_tungstenite::client_async_with_config(
            url.as_str(),
            MaybeTlsStream::Plain(stream),
            Some(config),
        )
        .await
        .map_err(|source| ClientError::Connect {
            url: url.clone(),
            source,
        })?;
        Ok(ChatClient::over(ws))
    }

    /// A client over an open WebSocket that has not authenticated yet.
    fn over(ws: Socket) -> ChatClient {
        ChatClient {
            ws,
            user: 0,
            welcome: None,
            pushes: VecDeque::new(),
            ended: false,
            presence: BTreeMap::new(),
            presence_frames: 0,
        }
    }

    /// Connect and authenticate; fails unless the server welcomes us.
    pub async fn connect(
        addr: SocketAddr,
        token: &str,
        device: &str,
    ) -> Result<ChatClient, ClientError> {
        ChatClient::connect_url(&ws_url(addr), token, device).await
    }

    /// [`ChatClient::connect`] to a `ws://` URL.
    pub async fn connect_url(
        url: &str,
        token: &str,
        device: &str,
    ) -> Result<ChatClient, ClientError> {
        let mut c = ChatClient::raw_url(url).await?;
        c.authenticate(token, device).await?;
        Ok(c)
    }

    /// Send `auth` on a connection opened with [`ChatClient::raw`] or
    /// [`ChatClient::raw_from`]; fails unless the server welcomes us.
    pub async fn authenticate(&mut self, token: &str, device: &str) -> Result<(), ClientError> {
        match self.request(&Request::Auth { token, device }).await? {
            Frame::Welcome(w) => {
                self.user = w.user;
                self.welcome = Some(w);
                Ok(())
            }
            got => Err(ClientError::Unexpected {
                expected: "welcome",
                got: Box::new(got),
            }),
        }
    }

    /// The welcome (panics on a client that never authenticated).
    pub fn welcome(&self) -> &Welcome {
        self.welcome
            .as_ref()
            .expect("an authenticated client (ChatClient::connect)")
    }

    /// The socket, for a caller that reads and writes frames itself from
    /// here on (a benchmark's hot path).
    pub fn into_socket(self) -> Socket {
        self.ws
    }

    /// Write one request.
    pub async fn write(&mut self, r: &Request<'_>) -> Result<(), ClientError> {
        self.send_text_frame(&r.to_json()).await
    }

    /// Write any JSON value as a frame (to send what [`Request`] cannot).
    pub async fn send_json(&mut self, v: &Value) -> Result<(), ClientError> {
        self.send_text_frame(&v.to_string()).await
    }

    /// Write a text frame as is (bad input included).
    pub async fn send_text_frame(&mut self, text: &str) -> Result<(), ClientError> {
        self.ws.send(Ws::Text(text.to_owned().into())).await?;
        Ok(())
    }

    /// The next frame of any kind, waiting as long as it takes; presence
    /// frames are applied to [`ChatClient::presence`] and returned too.
    /// Cancel-safe: nothing is lost when the future is dropped.
    pub async fn recv(&mut self) -> Result<Frame, ClientError> {
        loop {
            let text = match self.ws.next().await {
                Some(Ok(Ws::Text(t))) => t,
                Some(Ok(Ws::Close(f))) => {
                    self.ended = true;
                    return Err(ClientError::Closed {
                        code: f.as_ref().map(|f| u16::from(f.code)),
                        reason: f.map(|f| f.reason.to_string()).unwrap_or_default(),
                    });
                }
                None => {
                    self.ended = true;
                    return Err(ClientError::Closed {
                        code: None,
                        reason: String::new(),
                    });
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    self.ended = true;
                    return Err(e.into());
                }
            };
            let frame = Frame::decode(&text).map_err(|source| ClientError::Malformed {
                text: text.to_string(),
                source,
            })?;
            if let Frame::Presence(contacts) | Frame::Subscribed { contacts, .. } = &frame {
                self.apply_presence(contacts);
            }
            return Ok(frame);
        }
    }

    /// The next frame within `wait`, `None` when the connection closed.
    /// Presence frames are applied and not returned.
    pub async fn next_frame(&mut self, wait: Duration) -> Result<Option<Frame>, ClientError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.recv()).await {
                Err(_) => return Err(ClientError::Timeout(wait)),
                Ok(Ok(Frame::Presence(_))) => {}
                Ok(Ok(f)) => return Ok(Some(f)),
                Ok(Err(ClientError::Closed { .. })) => return Ok(None),
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// The next frame that is not a push (pushes are kept for later); an
    /// `error` frame is [`ClientError::Refused`].
    pub async fn answer(&mut self) -> Result<Frame, ClientError> {
        loop {
            match self.next_frame(ANSWER_WAIT).await? {
                None => {
                    return Err(ClientError::Closed {
                        code: None,
                        reason: "before answering".into(),
                    });
                }
                Some(f) if f.is_push() => self.pushes.push_back(f),
                Some(Frame::Error(e)) => return Err(ClientError::Refused(e)),
                Some(f) => return Ok(f),
            }
        }
    }

    /// Write `r` and wait for its answer.
    pub async fn request(&mut self, r: &Request<'_>) -> Result<Frame, ClientError> {
        self.write(r).await?;
        self.answer().await
    }

    /// Write `r` and take its answer with `pick` (which hands back any
    /// other frame: [`ClientError::Unexpected`]).
    async fn ask<T>(
        &mut self,
        r: &Request<'_>,
        expected: &'static str,
        pick: impl FnOnce(Frame) -> Result<T, Box<Frame>>,
    ) -> Result<T, ClientError> {
        let answer = self.request(r).await?;
        pick(answer).map_err(|got| ClientError::Unexpected { expected, got })
    }

    /// Send a text chat message; its ack (a refusal is an error).
    pub async fn send(
        &mut self,
        req: &str,
        ope: Ope,
        to: u64,
        text: &str,
    ) -> Result<SendAck, ClientError> {
        let body = json!({ "text": text });
        let r = Request::Send {
            req,
            ope,
            to,
            kind: "text",
            body: &body,
        };
        self.ask(&r, "ack", |f| match f {
            Frame::Ack(a) => Ok(a),
            f => Err(Box::new(f)),
        })
        .await
    }

    /// One sync page.
    pub async fn sync_page(
        &mut self,
        group: Option<u64>,
        since: u64,
        limit: u32,
    ) -> Result<SyncPage, ClientError> {
        let r = Request::Sync {
            since,
            limit,
            group,
        };
        self.ask(&r, "sync", |f| match f {
            Frame::Sync(p) => Ok(p),
            f => Err(Box::new(f)),
        })
        .await
    }

    /// Every message above `since`, following pages.
    pub async fn sync_all(
        &mut self,
        group: Option<u64>,
        mut since: u64,
    ) -> Result<Vec<ChatMessage>, ClientError> {
        let mut out = Vec::new();
        loop {
            let page = self.sync_page(group, since, PAGE).await?;
            if let Some(last) = page.messages.last() {
                since = if group.is_some() { last.gseq } else { last.seq }.unwrap_or(since);
            }
            out.extend(page.messages);
            if !page.more {
                return Ok(out);
            }
        }
    }

    /// Mark the conversation `ope`/`to` read up to `seq` (this user's inbox
    /// sequence, or a large group's timeline sequence).
    pub async fn read(&mut self, ope: Ope, to: u64, seq: u64) -> Result<ReadSet, ClientError> {
        self.ask(&Request::Read { ope, to, seq }, "read_set", |f| match f {
            Frame::ReadSet(s) => Ok(s),
            f => Err(Box::new(f)),
        })
        .await
    }

    /// Where this user and the others stand in this user's conversations.
    pub async fn read_state(&mut self) -> Result<ReadState, ClientError> {
        self.ask(&Request::ReadState, "read_state", |f| match f {
            Frame::ReadState(s) => Ok(s),
            f => Err(Box::new(f)),
        })
        .await
    }

    /// Tell the conversation's other members this user is typing.
    pub async fn typing(&mut self, ope: Ope, to: u64) -> Result<(), ClientError> {
        self.ask(&Request::Typing { ope, to }, "typing_sent", |f| match f {
            Frame::TypingSent => Ok(()),
            f => Err(Box::new(f)),
        })
        .await
    }

    /// Set this connection's status.
    pub async fn set_status(
        &mut self,
        status: Status,
        text: &str,
    ) -> Result<StatusSet, ClientError> {
        let r = Request::SetStatus { status, text };
        self.ask(&r, "status_set", |f| match f {
            Frame::StatusSet(s) => Ok(s),
            f => Err(Box::new(f)),
        })
        .await
    }

    /// A push (`msg` or `notice`) already received or arriving within
    /// `wait`.
    pub async fn next_push(&mut self, wait: Duration) -> Option<Frame> {
        if let Some(p) = self.pushes.pop_front() {
            return Some(p);
        }
        match self.next_frame(wait).await {
            Ok(Some(f)) if f.is_push() => Some(f),
            Ok(Some(f)) => {
                // An unsolicited non-push frame (e.g. an error before close).
                self.pushes.push_back(f);
                None
            }
            _ => None,
        }
    }

    /// Take every push received so far (without waiting).
    pub fn take_pushes(&mut self) -> Vec<Frame> {
        self.pushes.drain(..).collect()
    }

    /// Apply a `presence` frame: newer versions win.
    fn apply_presence(&mut self, contacts: &[Update]) {
        self.presence_frames += 1;
        for c in contacts {
            let newer = self
                .presence
                .get(&c.user)
                .is_none_or(|old| old.version < c.version);
            if newer {
                self.presence.insert(c.user, c.clone());
            }
        }
    }

    /// The status this client shows for `user` ("offline" if unknown) and
    /// its version.
    pub fn status_of(&self, user: u64) -> (String, u64) {
        self.presence
            .get(&user)
            .map(|c| (c.status.as_str().to_string(), c.version))
            .unwrap_or_else(|| ("offline".into(), 0))
    }

    /// Read frames (keeping pushes and answers for later) until `pred`
    /// holds for this client's presence view, or `wait` passes.
    pub async fn await_presence(
        &mut self,
        wait: Duration,
        pred: impl Fn(&ChatClient) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        while !pred(self) {
            if self.ended {
                return false;
            }
            match tokio::time::timeout_at(deadline, self.recv()).await {
                Err(_) => return false,
                Ok(Ok(Frame::Presence(_))) => {}
                Ok(Ok(f)) => self.pushes.push_back(f),
                Ok(Err(ClientError::Closed { .. })) => return pred(self),
                Ok(Err(_)) => {}
            }
        }
        true
    }

    /// Close the connection and wait (briefly) for the server's close.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// Each of `senders` connects to `at` and sends `each` text messages to
/// user `to`, all senders at once; the ids of every acknowledged message
/// (a send that is not acknowledged panics).
pub async fn burst(
    at: SocketAddr,
    senders: &[u64],
    to: u64,
    each: usize,
) -> std::collections::BTreeSet<u64> {
    burst_to(at, senders, Ope::Single, to, each).await
}

/// [`burst`] to user or group `to`, as `ope` says.
pub async fn burst_to(
    at: SocketAddr,
    senders: &[u64],
    ope: Ope,
    to: u64,
    each: usize,
) -> std::collections::BTreeSet<u64> {
    let tasks: Vec<_> = senders
        .iter()
        .map(|&u| {
            tokio::spawn(async move {
                let mut c = ChatClient::connect(at, &crate::token(u), "phone")
                    .await
                    .unwrap();
                let mut ids = Vec::new();
                for i in 0..each {
                    let a = c
                        .send(&format!("m{i}"), ope, to, &format!("{u} #{i}"))
                        .await
                        .unwrap_or_else(|e| panic!("not acknowledged: {e}"));
                    ids.push(a.id);
                }
                c.close().await;
                ids
            })
        })
        .collect();
    let mut acked = std::collections::BTreeSet::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    acked
}
