//! `iimctl chat`: a terminal client of the client protocol
//! (docs/client-protocol.md). It authenticates, prints recent history,
//! prints pushes live and sends what is typed on stdin.
//!
//! It behaves as the protocol asks of a device: one gap-free cursor per
//! stream (the inbox, each large group's timeline), pushes applied in
//! sequence order, a sync from the cursor when a push leaves a gap, and
//! every send resent with its original `req` until acknowledged, across
//! reconnects. Nothing the server sends can make it panic.

use anyhow::bail;
use clap::Args;
use iim::types::{UserId, now_ms};
use iim_kit::client::{
    ChatClient, ChatMessage, ClientError, Frame, Ope, Request, SyncPage, body_text, ws_url,
};
use serde_json::json;
use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;
use tokio::sync::mpsc::{Receiver, channel};
use tokio::time::{Instant, timeout};

type Input = Receiver<Option<String>>;

const HISTORY: usize = 20;
/// Lines of input read ahead of what is handled.
const INPUT_QUEUE: usize = 64;
const TRIES: u32 = 10;
/// The server answers requests in order: no answer for this long means
/// the connection is dead.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `/quit` or the end of input waits for outstanding acks.
const QUIT_GRACE: Duration = Duration::from_secs(5);
const HELP: &str = "/to USER or /group GROUP, then type a line to send it; \
    /read (mark it read), /typing (tell them you are typing); /sync; /quit";

#[derive(Args, Debug, Default)]
pub(crate) struct ChatArgs {
    /// The app server's client endpoint (its `client_listen`), HOST:PORT,
    /// or a ws:// URL.
    #[arg(long, default_value = "127.0.0.1:8201", value_name = "ADDR")]
    server: String,
    /// The user to chat as.
    #[arg(long, value_name = "ID")]
    user: u64,
    /// Device name, shown in `iimctl sessions`.
    #[arg(long, default_value = "terminal")]
    device: String,
    /// The app servers' `auth.jwt_secret`, to mint tokens (as `iimctl token`).
    #[arg(long, env = "IIM_JWT_SECRET", hide_env_values = true,
          default_value = iim::token::DEV_SECRET)]
    secret: String,
    /// Authenticate with this token instead of minting one.
    #[arg(long)]
    token: Option<String>,
    /// When input ends, wait until every send is acknowledged (reconnecting
    /// and resending as needed) and every request answered, then exit.
    #[arg(long)]
    exit_after_input: bool,
    /// Print what arrives for N seconds after connecting, then exit; the
    /// end of input does not end the session.
    #[arg(long, value_name = "N")]
    wait_secs: Option<u64>,
}

/// Why a connection could not go on: `fatal` ones are not retried.
struct Down {
    why: String,
    fatal: bool,
}

fn lost(why: impl std::fmt::Display) -> Down {
    let (why, fatal) = (why.to_string(), false);
    Down { why, fatal }
}

/// A connection's failure, as the user should read it.
fn down(e: ClientError) -> Down {
    let fatal = e.is_fatal();
    let why = match &e {
        ClientError::Closed {
            code: Some(code),
            reason,
        } => clean(&format!("closed by the server: {code} {reason}")),
        ClientError::Closed { .. } => "closed by the server".to_owned(),
        e => clean(&e.to_string()),
    };
    Down { why, fatal }
}

/// A request of this connection awaiting its answer.
enum Pending {
    Send,
    /// A `read` or `typing`: answered, never resent.
    Mark,
    /// The inbox (`None`) or a large group's timeline.
    Sync(Option<u64>),
}

/// A send not yet acknowledged; `due` is when to (re)send it, `None` while
/// it is in flight.
struct Unacked {
    req: String,
    ope: Ope,
    to: u64,
    text: String,
    due: Option<Instant>,
}

/// One stream's position: `max` is the highest sequence held without a
/// gap; `aside` holds what arrived above a gap (`None`: our own send).
#[derive(Default)]
struct Cursor {
    max: u64,
    aside: BTreeMap<u64, Option<ChatMessage>>,
    syncing: bool,
    /// A gap appeared while syncing: sync again when done.
    again: bool,
}

#[derive(Default)]
struct Chat {
    a: ChatArgs,
    /// Who we talk to: a user or a group, and its id.
    target: Option<(Ope, u64)>,
    /// `None`: the inbox; `Some(g)`: large group g.
    cursors: BTreeMap<Option<u64>, Cursor>,
    unacked: Vec<Unacked>,
    pending: VecDeque<(Pending, Instant)>,
    /// Lines held back until the first syncs are done: (ts, line).
    history: Option<Vec<(i64, String)>>,
    sends: u64,
    refused: usize,
    want_sync: bool,
    /// `/read` or `/typing` asked for the current target.
    want_read: bool,
    want_typing: bool,
    input_done: bool,
    quit: bool,
    stop_at: Option<Instant>,
    give_up_at: Option<Instant>,
}

fn say(line: &str) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

pub(crate) async fn run(a: ChatArgs) -> anyhow::Result<ExitCode> {
    if a.user == 0 {
        bail!("user 0 is reserved");
    }
    let url = match a.server.contains("://") {
        true => a.server.clone(),
        false => ws_url(&a.server),
    };
    // A plain thread: a pending read of stdin must not hold up the exit.
    // It waits while the queue is full: input is read no faster than sent.
    let (tx, mut rx) = channel(INPUT_QUEUE);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if tx.blocking_send(Some(line)).is_err() {
                return;
            }
        }
        let _ = tx.blocking_send(None);
    });
    let mut c = Chat {
        a,
        history: Some(Vec::new()),
        ..Default::default()
    };
    let (mut tries, mut connected) = (0, false);
    loop {
        let (what, down) = match c.connect(&url).await {
            Ok(mut client) => {
                let since = Instant::now();
                connected = true;
                let Err(down) = c.session(&mut client, &mut rx).await else {
                    client.close().await;
                    return Ok(c.finish());
                };
                if since.elapsed() > Duration::from_secs(30) {
                    tries = 0; // a good while up: count tries afresh
                }
                ("connection lost", down)
            }
            Err(down) => ("cannot reconnect", down),
        };
        if down.fatal || !connected {
            bail!("{}", down.why);
        }
        tries += 1;
        if tries > TRIES {
            bail!("{}; gave up after {TRIES} tries", down.why);
        }
        let delay = Duration::from_millis((250 << tries.min(5)) + now_ms() as u64 % 250);
        say(&format!(
            "{what}: {}; trying again in {:.1} s ({tries} of {TRIES})",
            down.why,
            delay.as_secs_f32()
        ));
        let until = Instant::now() + delay;
        while Instant::now() < until {
            if c.done() {
                return Ok(c.finish());
            }
            let nap = until.min(Instant::now() + Duration::from_millis(200));
            tokio::select! {
                _ = tokio::time::sleep_until(nap) => {}
                i = rx.recv(), if c.reading() => c.input(i.flatten()),
            }
        }
    }
}

impl Chat {
    /// Connects and authenticates, then syncs what is missing and resends
    /// what is unacknowledged.
    async fn connect(&mut self, url: &str) -> Result<ChatClient, Down> {
        let ttl = Duration::from_secs(86_400);
        let mint = || iim::token::mint(self.a.secret.as_bytes(), UserId(self.a.user), ttl);
        let token = self.a.token.clone().unwrap_or_else(mint);
        let connecting = ChatClient::connect_url(url, &token, &self.a.device);
        let mut client = match timeout(ANSWER_TIMEOUT, connecting).await {
            Err(_) => return Err(lost(format!("no welcome from {url} within 10 s"))),
            Ok(Ok(c)) => c,
            Ok(Err(ClientError::Refused(e))) => {
                let fatal = e.code.starts_with("auth_"); // failed, expired, required
                let hint = if fatal {
                    " (check --secret or --token)"
                } else {
                    ""
                };
                let why = format!(
                    "not welcomed: {}: {}{hint}",
                    clean(&e.code),
                    clean(&e.message)
                );
                return Err(Down { why, fatal });
            }
            Ok(Err(e)) => return Err(down(e)),
        };
        let w = client.welcome().clone();
        let mut streams = vec![(None, w.inbox_max)];
        streams.extend(w.large_groups.iter().map(|g| (Some(g.group), g.max)));
        let groups: String = streams[1..]
            .iter()
            .map(|(g, max)| format!("; large group {} (max {max})", g.unwrap_or(0)))
            .collect();
        say(&format!(
            "connected to server {} at {url} as user {}, device {}; inbox_max {}{groups}",
            w.server,
            w.user,
            clean(&w.device),
            w.inbox_max,
        ));
        if let Some(n) = self.a.wait_secs {
            self.stop_at
                .get_or_insert(Instant::now() + Duration::from_secs(n));
        }
        self.pending.clear();
        for c in self.cursors.values_mut() {
            (c.syncing, c.again) = (false, false);
        }
        for (key, max) in streams {
            if max > self.cursors.entry(key).or_default().max {
                self.request_sync(&mut client, key).await?;
            }
        }
        for u in &mut self.unacked {
            u.due = Some(Instant::now());
        }
        self.flush(&mut client).await?;
        self.show_history();
        Ok(client)
    }

    /// Runs one connection until the user is done (`Ok`) or it fails.
    async fn session(&mut self, client: &mut ChatClient, rx: &mut Input) -> Result<(), Down> {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        while !self.done() {
            tokio::select! {
                f = client.recv() => match f {
                    Ok(f) => self.frame(client, f).await?,
                    // Nothing the server sends makes us stop: skip it.
                    Err(ClientError::Malformed { .. }) => {}
                    Err(e) => return Err(down(e)),
                },
                i = rx.recv(), if self.reading() => self.input(i.flatten()),
                _ = tick.tick() => {
                    if self.pending.front().is_some_and(|(_, t)| t.elapsed() > ANSWER_TIMEOUT) {
                        return Err(lost("no answer for 10 s"));
                    }
                }
            }
            self.flush(client).await?;
        }
        Ok(())
    }

    /// Input is read once the history is shown, until it ends.
    fn reading(&self) -> bool {
        !self.input_done && self.history.is_none()
    }

    /// Whether to leave: asked to, and nothing is left to wait for (or the
    /// wait took too long, unless `--exit-after-input`).
    fn done(&mut self) -> bool {
        let asked = self.quit
            || match (self.stop_at, self.a.wait_secs) {
                (Some(t), _) => Instant::now() >= t,
                (None, wait) => wait.is_none() && self.input_done,
            };
        if !asked || (self.unacked.is_empty() && self.history.is_none() && self.pending.is_empty())
        {
            return asked;
        }
        let give_up = *self.give_up_at.get_or_insert(Instant::now() + QUIT_GRACE);
        !self.a.exit_after_input && Instant::now() >= give_up
    }

    fn finish(&self) -> ExitCode {
        for u in &self.unacked {
            say(&format!("not acknowledged (perhaps not stored): {}", u.req));
        }
        ExitCode::from(u8::from(!self.unacked.is_empty() || self.refused > 0))
    }

    /// A line of input (`None`: the end of it).
    fn input(&mut self, line: Option<String>) {
        let Some(line) = line else {
            self.input_done = true;
            return;
        };
        let line = line.trim();
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
            match (name, arg.trim().parse::<u64>()) {
                ("to" | "group", Ok(id)) if id > 0 => {
                    let ope = if name == "group" {
                        Ope::Group
                    } else {
                        Ope::Single
                    };
                    self.target = Some((ope, id));
                    let kind = if name == "to" { "user" } else { "group" };
                    say(&format!("talking to {kind} {id}"));
                }
                ("to" | "group", _) => say("usage: /to USER or /group GROUP (a positive id)"),
                ("sync", _) => self.want_sync = true,
                ("read" | "typing", _) if self.target.is_none() => {
                    say("no one to talk to yet: /to USER or /group GROUP first")
                }
                ("read", _) => self.want_read = true,
                ("typing", _) => self.want_typing = true,
                ("quit", _) => (self.quit, self.input_done) = (true, true),
                _ => say(HELP),
            }
        } else if let (false, Some((ope, to))) = (line.is_empty(), self.target) {
            self.sends += 1;
            let device: String = self.a.device.chars().take(32).collect();
            let req = format!("{device}-{}-{}", now_ms(), self.sends);
            self.unacked.push(Unacked {
                req,
                ope,
                to,
                text: line.to_owned(),
                due: Some(Instant::now()),
            });
        } else if !line.is_empty() {
            say("no one to send to yet: /to USER or /group GROUP first");
        }
    }

    /// Sends what is due and starts the syncs asked for with `/sync`.
    async fn flush(&mut self, client: &mut ChatClient) -> Result<(), Down> {
        // One send in flight at a time, the oldest first: typed order is
        // kept, even across a rate limit or a reconnect.
        let now = Instant::now();
        if let Some(u) = self.unacked.first_mut()
            && u.due.is_some_and(|t| t <= now)
        {
            u.due = None;
            let body = json!({ "text": u.text });
            let send = Request::Send {
                req: &u.req,
                ope: u.ope,
                to: u.to,
                kind: "text",
                body: &body,
            };
            client.write(&send).await.map_err(down)?;
            self.pending.push_back((Pending::Send, now));
        }
        if let Some((ope, to)) = self.target {
            if std::mem::take(&mut self.want_read) {
                // Everything held so far: the inbox, or this large group's
                // timeline when it is one.
                let key =
                    Some(to).filter(|g| ope == Ope::Group && self.cursors.contains_key(&Some(*g)));
                let seq = self.cursors.get(&key).map_or(0, |c| c.max);
                if seq == 0 {
                    say("nothing to mark read yet");
                } else {
                    client
                        .write(&Request::Read { ope, to, seq })
                        .await
                        .map_err(down)?;
                    self.pending.push_back((Pending::Mark, now));
                }
            }
            if std::mem::take(&mut self.want_typing) {
                client
                    .write(&Request::Typing { ope, to })
                    .await
                    .map_err(down)?;
                self.pending.push_back((Pending::Mark, now));
            }
        }
        if std::mem::take(&mut self.want_sync) {
            let max = self.cursors.get(&None).map_or(0, |c| c.max);
            say(&format!("syncing from seq {max}"));
            let keys: Vec<_> = std::iter::once(None)
                .chain(self.cursors.keys().copied())
                .collect();
            for key in keys {
                self.request_sync(client, key).await?;
            }
        }
        Ok(())
    }

    async fn request_sync(
        &mut self,
        client: &mut ChatClient,
        key: Option<u64>,
    ) -> Result<(), Down> {
        let c = self.cursors.entry(key).or_default();
        c.again |= c.syncing;
        if !std::mem::replace(&mut c.syncing, true) {
            let sync = Request::Sync {
                since: c.max,
                limit: 200,
                group: key,
            };
            client.write(&sync).await.map_err(down)?;
            self.pending.push_back((Pending::Sync(key), Instant::now()));
        }
        Ok(())
    }

    /// A frame from the server: a push, or the answer to the oldest
    /// pending request (the server answers in order).
    async fn frame(&mut self, client: &mut ChatClient, f: Frame) -> Result<(), Down> {
        let gap = match f {
            Frame::Notice(n) => {
                say(&format!("[notice from {}] {}", n.from, clean(&n.text)));
                None
            }
            Frame::SyncNeeded => {
                // Pushes for us were dropped: catch up on every stream.
                let keys: Vec<_> = std::iter::once(None)
                    .chain(self.cursors.keys().copied())
                    .collect();
                for key in keys {
                    self.request_sync(client, key).await?;
                }
                None
            }
            Frame::Msg(m) => match (m.gseq, m.seq) {
                (Some(g), _) => Some((Some(m.to), g, Some(m))),
                (None, Some(s)) => Some((None, s, Some(m))),
                _ => None,
            },
            Frame::Receipt(r) => {
                let at = match (r.seq, r.gseq) {
                    (_, Some(g)) => format!("gseq {g}"),
                    (s, None) => format!("seq {}", s.unwrap_or(0)),
                };
                let line = match (r.reader == self.a.user, r.ope) {
                    (true, Ope::Group) => {
                        format!("you read group {} up to {at} (another device)", r.to)
                    }
                    (true, Ope::Single) => {
                        format!(
                            "you read the chat with {} up to {at} (another device)",
                            r.to
                        )
                    }
                    (false, Ope::Group) => {
                        format!("user {} read group {} up to {at}", r.reader, r.to)
                    }
                    (false, Ope::Single) => format!("user {} read your chat up to {at}", r.reader),
                };
                say(&format!("[read] {line}"));
                None
            }
            Frame::Typing(t) => {
                let place = match t.ope {
                    Ope::Group => format!(" in group {}", t.to),
                    Ope::Single => String::new(),
                };
                say(&format!("[typing] user {} is typing{place}…", t.from));
                None
            }
            Frame::Ack(_)
            | Frame::Sync(_)
            | Frame::Error(_)
            | Frame::Pong
            | Frame::ReadSet(_)
            | Frame::TypingSent => {
                let req = match &f {
                    Frame::Ack(a) => Some(a.req.as_str()),
                    Frame::Error(e) => e.req.as_deref(),
                    _ => None,
                };
                let i = req.and_then(|r| self.unacked.iter().position(|u| u.req == r));
                match (self.pending.pop_front().map(|p| p.0), f, i) {
                    (Some(Pending::Sync(key)), Frame::Sync(page), _) => {
                        return self.synced(client, key, page).await;
                    }
                    (Some(Pending::Sync(key)), f, _) => {
                        let why = match f {
                            Frame::Error(e) => format!("{}: {}", clean(&e.code), clean(&e.message)),
                            f => format!("unexpected {}", f.op()),
                        };
                        say(&format!("sync failed: {why}"));
                        self.cursors.entry(key).or_default().syncing = false;
                        self.show_history();
                        None
                    }
                    (_, Frame::ReadSet(r), _) => {
                        let at = match (r.seq, r.gseq) {
                            (_, Some(g)) => format!("gseq {g}"),
                            (s, None) => format!("seq {}", s.unwrap_or(0)),
                        };
                        say(&format!("marked read up to {at}"));
                        None
                    }
                    (_, Frame::Ack(a), Some(i)) => {
                        let u = self.unacked.remove(i);
                        let again = if a.duplicate { " (a resend)" } else { "" };
                        let (key, seq, what) = match (a.gseq, a.seq) {
                            (Some(g), _) => (Some(u.to), g, "gseq"),
                            (None, s) => (None, s.unwrap_or(0), "seq"),
                        };
                        say(&format!("sent, {what} {seq}{again}"));
                        (seq > 0).then_some((key, seq, None))
                    }
                    (_, Frame::Error(e), Some(i))
                        if matches!(e.code.as_str(), "unavailable" | "rate_limited") =>
                    {
                        say(&format!("{}: resending in 1 s", e.code));
                        self.unacked[i].due = Some(Instant::now() + Duration::from_secs(1));
                        None
                    }
                    (_, Frame::Error(e), i) => {
                        let what = if let Some(i) = i {
                            self.refused += 1;
                            self.unacked.remove(i);
                            "not sent"
                        } else {
                            "error"
                        };
                        say(&format!(
                            "{what}: {}: {}",
                            clean(&e.code),
                            clean(&e.message)
                        ));
                        None
                    }
                    _ => None, // a duplicate ack of a resend, or a pong
                }
            }
            _ => None, // presence, and unknown ops, are ignored, as the protocol allows
        };
        if let Some((key, seq, m)) = gap
            && self.apply(key, seq, m)
        {
            self.request_sync(client, key).await?;
        }
        Ok(())
    }

    /// A sync page: apply it, then fetch the next page or close a new gap.
    async fn synced(
        &mut self,
        client: &mut ChatClient,
        key: Option<u64>,
        page: SyncPage,
    ) -> Result<(), Down> {
        let before = self.cursors.entry(key).or_default().max;
        for m in page.messages {
            let seq = if key.is_some() { m.gseq } else { m.seq };
            if let Some(seq) = seq {
                self.apply(key, seq, Some(m));
            }
        }
        let c = self.cursors.entry(key).or_default();
        c.syncing = false;
        // Only pages that advanced: a server skipping a sequence cannot loop us.
        let more = page.more && c.max > before;
        if more || std::mem::take(&mut c.again) && !c.aside.is_empty() {
            self.request_sync(client, key).await?;
        }
        self.show_history();
        Ok(())
    }

    /// Files a message at `seq`, shows what is now in order; true on a gap.
    fn apply(&mut self, key: Option<u64>, seq: u64, m: Option<ChatMessage>) -> bool {
        let c = self.cursors.entry(key).or_default();
        if seq <= c.max || c.aside.contains_key(&seq) {
            return false;
        }
        c.aside.insert(seq, m);
        let mut ready = Vec::new();
        while let Some(m) = c.aside.remove(&(c.max + 1)) {
            c.max += 1;
            ready.extend(m);
        }
        let gap = !c.aside.is_empty();
        for m in ready {
            let line = self.describe(&m);
            match &mut self.history {
                Some(h) => h.push((m.ts, line)),
                None => say(&line),
            }
        }
        gap
    }

    /// Prints the last messages, once the first syncs are done.
    fn show_history(&mut self) {
        if self.cursors.values().any(|c| c.syncing) {
            return;
        }
        let Some(mut h) = self.history.take() else {
            return;
        };
        h.sort_by_key(|(ts, _)| *ts);
        say(&match h.len() {
            0 => "history: no messages yet".to_owned(),
            n if n > HISTORY => format!("history: the last {HISTORY} of {n} messages"),
            n => format!("history: {n} messages"),
        });
        for (_, line) in &h[h.len().saturating_sub(HISTORY)..] {
            say(&format!("  {line}"));
        }
        say(&format!("ready: {HELP}"));
    }

    fn describe(&self, m: &ChatMessage) -> String {
        let who = |u: u64| match u {
            u if u == self.a.user => "you".to_owned(),
            u => u.to_string(),
        };
        let (from, to) = (who(m.from), m.to);
        let body = match (m.kind.as_str(), body_text(m)) {
            ("text", Some(t)) => clean(&t),
            _ => format!("({}) {}", clean(&m.kind), clean(m.body.get())),
        };
        match (m.gseq, m.seq, m.ope) {
            (Some(g), _, _) => format!("[group {to}, gseq {g}] {from}: {body}"),
            (_, Some(s), Ope::Group) => format!("[group {to}, seq {s}] {from}: {body}"),
            (_, s, _) => format!("[seq {}] {from} → {}: {body}", s.unwrap_or(0), who(to)),
        }
    }
}

/// Control characters (terminal escapes) shown as `\u{..}`.
fn clean(s: &str) -> String {
    let esc = |c: char| c.escape_unicode().to_string();
    s.chars()
        .map(|c| if c.is_control() { esc(c) } else { c.into() })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64, from: u64, text: &str) -> Option<ChatMessage> {
        let m = json!({"seq": seq, "id": seq, "req": "r", "ope": 0, "from": from, "to": 1001, "type": "text", "body": {"text": text}, "ts": seq});
        Some(serde_json::from_str(&m.to_string()).unwrap())
    }

    #[test]
    fn pushes_apply_in_order_without_duplicates() {
        let a = ChatArgs {
            user: 1001,
            ..Default::default()
        };
        let mut c = Chat {
            a,
            history: Some(Vec::new()),
            ..Default::default()
        };
        assert!(c.apply(None, 2, msg(2, 2001, "second")), "a gap below 2");
        assert!(!c.apply(None, 1, msg(1, 2001, "first")));
        assert!(!c.apply(None, 2, msg(2, 2001, "second")), "already held");
        assert!(!c.apply(None, 3, None), "our own send, acknowledged");
        assert!(!c.apply(None, 4, msg(4, 1001, "\u{1b}[2J")));
        let lines: Vec<String> = c.history.unwrap().into_iter().map(|(_, l)| l).collect();
        assert_eq!(
            lines,
            [
                "[seq 1] 2001 → you: first",
                "[seq 2] 2001 → you: second",
                "[seq 4] you → you: \\u{1b}[2J"
            ]
        );
        assert_eq!(c.cursors[&None].max, 4);
    }
}
