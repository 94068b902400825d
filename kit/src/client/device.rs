//! A device that behaves as docs/client-protocol.md asks: it keeps its
//! inbox by sequence, counts every copy it is given, and syncs from the
//! highest sequence it holds.

use super::{ChatClient, ChatMessage, ClientError, Frame};
use std::collections::BTreeMap;
use std::time::Duration;

/// How long one wait for a push lasts before the caller's deadline is
/// checked again.
const PUSH_WAIT: Duration = Duration::from_millis(200);

pub struct Device {
    pub client: ChatClient,
    /// seq -> message
    pub inbox: BTreeMap<u64, ChatMessage>,
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

    /// The inbox holds exactly a burst of `n` text messages whose texts
    /// were `0`, `1`, … in send order: sequences 1..=n, gap-free, nothing
    /// more, each once, in order. Panics otherwise.
    pub fn assert_holds_burst(&self, n: usize) {
        let seqs: Vec<u64> = self.inbox.keys().copied().collect();
        assert_eq!(
            seqs,
            (1..=n as u64).collect::<Vec<_>>(),
            "gap-free, nothing more"
        );
        let texts: Vec<String> = self
            .inbox
            .values()
            .map(|m| super::body_text(m).unwrap_or_default())
            .collect();
        assert_eq!(
            texts,
            (0..n).map(|i| i.to_string()).collect::<Vec<_>>(),
            "in order, once each"
        );
    }

    fn apply(&mut self, m: ChatMessage) {
        if let Some(seq) = m.seq
            && !self.inbox.contains_key(&seq)
        {
            *self.copies.entry(m.id).or_default() += 1;
            self.inbox.insert(seq, m);
        }
    }

    fn pushed(&mut self, p: Frame) {
        if let Frame::Msg(m) = p {
            self.pushed.push(m.id);
            self.apply(m);
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
        self.await_until(wait, |d| d.pushed.len() >= n).await
    }

    /// Wait for pushes until `n` inbox entries are held or `wait` passes.
    pub async fn await_inbox(&mut self, n: usize, wait: Duration) {
        self.await_until(wait, |d| d.inbox.len() >= n).await
    }

    async fn await_until(&mut self, wait: Duration, done: impl Fn(&Device) -> bool) {
        let deadline = tokio::time::Instant::now() + wait;
        self.drain_pushes();
        while !done(self) && !self.client.ended && tokio::time::Instant::now() < deadline {
            if let Some(p) = self.client.next_push(PUSH_WAIT).await {
                self.pushed(p);
            }
        }
    }

    /// Sync from the cursor to the end.
    pub async fn sync(&mut self) -> Result<(), ClientError> {
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
        self.inbox.values().map(|m| m.id).collect()
    }
}
