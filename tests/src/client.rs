//! A WebSocket chat client for tests, speaking docs/client-protocol.md, and
//! a model of a correct device on top of it: it keeps the inbox it has seen
//! by sequence, applies pushes, and syncs to fill gaps.

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Stream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a test waits for any one answer.
const WAIT: Duration = Duration::from_secs(20);

pub struct ChatClient {
    ws: Stream,
    pub user: u64,
    pub welcome: Value,
    /// `msg` and `notice` frames that arrived while waiting for answers.
    pushes: VecDeque<Value>,
    /// The connection ended (closed or reset).
    pub ended: bool,
    /// Presence of contacts as this client has been told: user -> the
    /// update with the highest version (as the protocol says to apply them).
    pub presence: BTreeMap<u64, Value>,
    /// `presence` frames received.
    pub presence_frames: usize,
}

impl ChatClient {
    /// Connect to `ws://addr/ws` without authenticating.
    pub async fn raw(addr: SocketAddr) -> anyhow::Result<ChatClient> {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await?;
        Ok(ChatClient {
            ws,
            user: 0,
            welcome: Value::Null,
            pushes: VecDeque::new(),
            ended: false,
            presence: BTreeMap::new(),
            presence_frames: 0,
        })
    }

    /// Connect and authenticate; fails unless the server welcomes us.
    pub async fn connect(
        addr: SocketAddr,
        token: &str,
        device: &str,
    ) -> anyhow::Result<ChatClient> {
        let mut c = Self::raw(addr).await?;
        c.send_json(&json!({"op": "auth", "token": token, "device": device}))
            .await?;
        let w = c.answer().await?;
        anyhow::ensure!(w["op"] == "welcome", "not welcomed: {w}");
        c.user = w["user"].as_u64().unwrap_or(0);
        c.welcome = w;
        Ok(c)
    }

    pub async fn send_json(&mut self, v: &Value) -> anyhow::Result<()> {
        self.ws.send(Ws::Text(v.to_string().into())).await?;
        Ok(())
    }

    pub async fn send_text_frame(&mut self, text: &str) -> anyhow::Result<()> {
        self.ws.send(Ws::Text(text.to_string().into())).await?;
        Ok(())
    }

    /// Apply a `presence` frame: newer versions win.
    fn apply_presence(&mut self, f: &Value) {
        self.presence_frames += 1;
        for c in f["contacts"].as_array().into_iter().flatten() {
            let (Some(user), Some(v)) = (c["user"].as_u64(), c["version"].as_u64()) else {
                continue;
            };
            let newer = self
                .presence
                .get(&user)
                .is_none_or(|old| old["version"].as_u64().unwrap_or(0) < v);
            if newer || !self.presence.contains_key(&user) {
                self.presence.insert(user, c.clone());
            }
        }
    }

    /// The status this client shows for `user` ("offline" if unknown).
    pub fn status_of(&self, user: u64) -> (String, u64) {
        self.presence
            .get(&user)
            .map(|c| {
                (
                    c["status"].as_str().unwrap_or("?").to_string(),
                    c["version"].as_u64().unwrap_or(0),
                )
            })
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
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || self.ended {
                return false;
            }
            match self.next_frame(left.min(Duration::from_millis(100))).await {
                Ok(Some(f)) => self.pushes.push_back(f),
                Ok(None) => return pred(self),
                Err(_) => {}
            }
        }
        true
    }

    /// The next frame of any kind; `None` when the connection closed.
    /// `presence` frames are applied to the presence view and not returned.
    pub async fn next_frame(&mut self, wait: Duration) -> anyhow::Result<Option<Value>> {
        loop {
            let f = tokio::time::timeout(wait, self.ws.next())
                .await
                .map_err(|_| anyhow::anyhow!("no frame within {wait:?}"))?;
            match f {
                None | Some(Ok(Ws::Close(_))) => {
                    self.ended = true;
                    return Ok(None);
                }
                Some(Ok(Ws::Text(t))) => {
                    let v: Value = serde_json::from_str(&t)?;
                    if v["op"] == "presence" {
                        self.apply_presence(&v);
                        continue;
                    }
                    return Ok(Some(v));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    self.ended = true;
                    return Err(e.into());
                }
            }
        }
    }

    /// The next frame that is not a push (pushes are kept for later).
    pub async fn answer(&mut self) -> anyhow::Result<Value> {
        loop {
            let f = self
                .next_frame(WAIT)
                .await?
                .ok_or_else(|| anyhow::anyhow!("connection closed"))?;
            if f["op"] == "msg" || f["op"] == "notice" {
                self.pushes.push_back(f);
            } else {
                return Ok(f);
            }
        }
    }

    /// Send a chat message; returns the server's answer (ack or error).
    pub async fn send(&mut self, req: &str, ope: u8, to: u64, text: &str) -> anyhow::Result<Value> {
        self.send_json(&json!({"op": "send", "req": req, "ope": ope, "to": to, "type": "text", "body": {"text": text}}))
            .await?;
        self.answer().await
    }

    /// One sync page.
    pub async fn sync_page(
        &mut self,
        group: Option<u64>,
        since: u64,
        limit: u32,
    ) -> anyhow::Result<Value> {
        let mut f = json!({"op": "sync", "since": since, "limit": limit});
        if let Some(g) = group {
            f["group"] = json!(g);
        }
        self.send_json(&f).await?;
        self.answer().await
    }

    /// Every message above `since`, following pages.
    pub async fn sync_all(
        &mut self,
        group: Option<u64>,
        mut since: u64,
    ) -> anyhow::Result<Vec<Value>> {
        let key = if group.is_some() { "gseq" } else { "seq" };
        let mut out = Vec::new();
        loop {
            let page = self.sync_page(group, since, 200).await?;
            anyhow::ensure!(page["op"] == "sync", "sync failed: {page}");
            let msgs = page["messages"].as_array().cloned().unwrap_or_default();
            if let Some(last) = msgs.last() {
                since = last[key].as_u64().unwrap_or(since);
            }
            out.extend(msgs);
            if page["more"] != true {
                return Ok(out);
            }
        }
    }

    /// A push already received or arriving within `wait`.
    pub async fn next_push(&mut self, wait: Duration) -> Option<Value> {
        if let Some(p) = self.pushes.pop_front() {
            return Some(p);
        }
        match self.next_frame(wait).await {
            Ok(Some(f)) if f["op"] == "msg" || f["op"] == "notice" => Some(f),
            Ok(Some(f)) => {
                // An unsolicited non-push frame (e.g. an error before close).
                self.pushes.push_back(f);
                None
            }
            _ => None,
        }
    }

    /// Take every push received so far (without waiting).
    pub fn take_pushes(&mut self) -> Vec<Value> {
        self.pushes.drain(..).collect()
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// A device that behaves as docs/client-protocol.md asks: it keeps its
/// inbox by sequence, counts every copy it is given, and syncs from the
/// highest sequence it holds.
pub struct Device {
    pub client: ChatClient,
    /// seq -> message
    pub inbox: BTreeMap<u64, Value>,
    /// How many times each message id was handed to this device (push or
    /// sync), to prove nothing arrives twice as a *new* message.
    pub copies: BTreeMap<u64, u32>,
    /// Ids of every `msg` push received, in arrival order (inbox and
    /// timeline messages alike).
    pub pushed: Vec<u64>,
}

impl Device {
    pub fn new(client: ChatClient) -> Device {
        Device {
            client,
            inbox: BTreeMap::new(),
            copies: BTreeMap::new(),
            pushed: Vec::new(),
        }
    }

    /// The highest sequence held without a gap below it.
    pub fn cursor(&self) -> u64 {
        let mut c = 0;
        for s in self.inbox.keys() {
            if *s == c + 1 {
                c = *s;
            } else {
                break;
            }
        }
        c
    }

    fn apply(&mut self, m: Value) {
        if let Some(seq) = m["seq"].as_u64()
            && !self.inbox.contains_key(&seq)
        {
            *self
                .copies
                .entry(m["id"].as_u64().unwrap_or(0))
                .or_default() += 1;
            self.inbox.insert(seq, m);
        }
    }

    fn pushed(&mut self, p: Value) {
        if p["op"] == "msg" {
            self.pushed.push(p["id"].as_u64().unwrap_or(0));
            self.apply(p);
        }
    }

    /// Apply the pushes received so far.
    pub fn drain_pushes(&mut self) {
        for p in self.client.take_pushes() {
            self.pushed(p);
        }
    }

    /// Wait until `n` pushes were received in all, or `wait` passes.
    pub async fn await_pushes(&mut self, n: usize, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        self.drain_pushes();
        while self.pushed.len() < n && !self.client.ended && tokio::time::Instant::now() < deadline
        {
            if let Some(p) = self.client.next_push(Duration::from_millis(200)).await {
                self.pushed(p);
            }
        }
    }

    /// Wait for pushes until `n` inbox entries are held or `wait` passes.
    pub async fn await_inbox(&mut self, n: usize, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        self.drain_pushes();
        while self.inbox.len() < n && !self.client.ended && tokio::time::Instant::now() < deadline {
            if let Some(p) = self.client.next_push(Duration::from_millis(200)).await {
                self.pushed(p);
            }
        }
    }

    /// Sync from the cursor to the end.
    pub async fn sync(&mut self) -> anyhow::Result<()> {
        self.drain_pushes();
        let since = self.cursor();
        for m in self.client.sync_all(None, since).await? {
            self.apply(m);
        }
        self.drain_pushes();
        Ok(())
    }

    /// Message ids in inbox order.
    pub fn ids(&self) -> Vec<u64> {
        self.inbox
            .values()
            .map(|m| m["id"].as_u64().unwrap_or(0))
            .collect()
    }
}
