//! Offline push: telling someone outside iim (an operator's APNs/FCM
//! gateway, or an in-process integration) that a chat message waits for a
//! user who has no live session anywhere.
//!
//! The chat push task offers a [`Notice`] per offline recipient of each
//! newly stored message ([`Offline::offer`]); it never waits for the
//! outside world. The notices wait in a bounded queue (the oldest are
//! dropped when it is full: a notification about the newest message is the
//! one worth showing, and every message is in the inbox anyway), and one
//! dispatch task hands them, in batches, to an [`OfflinePush`] — the
//! built-in [`Webhook`] or a plugin's own — retrying a failed batch with
//! jittered exponential backoff up to a bound. Nothing here is needed for
//! delivery: a lost notice costs a notification, never a message.

use crate::metrics::OfflineMetrics;
use ring::hmac;
use serde::Serialize;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// One notification: a message `id` waits for `user`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Notice {
    /// The recipient, who had no live session when the message was pushed.
    pub user: u64,
    /// The message's server-wide id.
    pub id: u64,
    pub from: u64,
    /// 0: a 1:1 message to `user`; 1: a message to group `to`.
    pub ope: u8,
    pub to: u64,
    /// The message's `type`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The start of the body's text (at most `preview_bytes` bytes, cut at
    /// a character boundary); absent when previews are off or the body has
    /// no text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
    /// When the message was stored, Unix milliseconds.
    pub ts: i64,
}

/// What one delivery carries: the webhook's JSON body.
#[derive(Clone, Debug, Serialize)]
pub struct Batch {
    /// Unique per batch (`<server>-<epoch>-<n>`), the same on every retry
    /// of it: a receiver that saw it already (a retry after a timeout that
    /// in fact got through) can ignore it.
    pub batch: String,
    /// The app server that sends it.
    pub server: u32,
    pub notices: Vec<Notice>,
}

/// Why a delivery failed; the dispatcher retries it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DeliveryError(pub String);

/// The future a delivery returns.
pub type Delivery<'a> = Pin<Box<dyn Future<Output = Result<(), DeliveryError>> + Send + 'a>>;

/// Where offline notices go: the built-in [`Webhook`], or an in-process
/// integration of a plugin's own. `deliver` is called with one batch at a
/// time, never concurrently; an error makes the dispatcher try the same
/// batch again later (up to `max_attempts` in all), so a delivery should be
/// idempotent per [`Batch::batch`]. It should not take long: the dispatcher
/// stops waiting for it on shutdown only.
pub trait OfflinePush: Send + Sync + 'static {
    fn deliver<'a>(&'a self, batch: &'a Batch) -> Delivery<'a>;
}

/// How the dispatcher queues, batches and retries.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Most notices waiting; beyond it the oldest are dropped.
    pub queue: usize,
    /// Most notices in one batch.
    pub batch_max: usize,
    /// How long a batch gathers after its first notice before it leaves
    /// (earlier when it is full).
    pub batch_wait: Duration,
    /// Deliveries of one batch, the first included, before it is dropped.
    pub max_attempts: u32,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Longest body preview, in bytes; 0 for none.
    pub preview_bytes: usize,
}

/// The bounded queue between the chat push task and the dispatcher.
struct Queue {
    items: Mutex<VecDeque<Notice>>,
    bound: usize,
    /// Wakes the dispatcher when notices arrive.
    wake: Notify,
    metrics: Arc<OfflineMetrics>,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Notice>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn take(&self, n: usize) -> Vec<Notice> {
        let mut items = self.lock();
        let n = n.min(items.len());
        let taken: Vec<Notice> = items.drain(..n).collect();
        self.metrics.queue.set(items.len() as i64);
        taken
    }
}

/// The chat service's handle on offline push.
#[derive(Clone)]
pub struct Offline {
    queue: Arc<Queue>,
    preview_bytes: usize,
}

impl Offline {
    /// Start the dispatcher delivering to `sink`; it stops with `stop`
    /// (what is still queued then is dropped and counted).
    pub fn start(
        sink: Arc<dyn OfflinePush>,
        settings: Settings,
        batch_prefix: String,
        server: u32,
        metrics: Arc<OfflineMetrics>,
        stop: CancellationToken,
        tracker: &TaskTracker,
    ) -> Offline {
        let queue = Arc::new(Queue {
            items: Mutex::new(VecDeque::new()),
            bound: settings.queue.max(1),
            wake: Notify::new(),
            metrics,
        });
        let preview_bytes = settings.preview_bytes;
        tracker.spawn(dispatch(
            sink,
            queue.clone(),
            settings,
            batch_prefix,
            server,
            stop,
        ));
        Offline {
            queue,
            preview_bytes,
        }
    }

    /// Longest body preview a notice may carry, in bytes.
    pub fn preview_bytes(&self) -> usize {
        self.preview_bytes
    }

    /// Count a message whose recipients get no notices.
    pub fn skipped(&self, reason: &str) {
        self.queue.metrics.skipped.inc(reason);
    }

    /// Queue `notices`; never waits. When the queue is full the oldest
    /// notices make room and are counted as dropped.
    pub fn offer(&self, notices: Vec<Notice>) {
        if notices.is_empty() {
            return;
        }
        let m = &self.queue.metrics;
        m.queued.add(notices.len() as u64);
        {
            let mut items = self.queue.lock();
            items.extend(notices);
            let over = items.len().saturating_sub(self.queue.bound);
            if over > 0 {
                items.drain(..over);
                m.dropped.add("queue_full", over as u64);
            }
            m.queue.set(items.len() as i64);
        }
        self.queue.wake.notify_one();
    }
}

/// The start of a message body's text for a preview: the body itself when
/// it is a JSON string, else its `text` field when that is a string; cut to
/// at most `max` bytes at a character boundary. `None` when `max` is 0 or
/// there is no text (a body that is not JSON, too).
pub fn preview(body: &str, max: usize) -> Option<String> {
    if max == 0 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let text = match &v {
        serde_json::Value::String(s) => s.as_str(),
        serde_json::Value::Object(o) => o.get("text")?.as_str()?,
        _ => return None,
    };
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Some(text[..end].to_owned())
}

/// Takes batches off the queue and delivers them, one at a time.
async fn dispatch(
    sink: Arc<dyn OfflinePush>,
    queue: Arc<Queue>,
    s: Settings,
    prefix: String,
    server: u32,
    stop: CancellationToken,
) {
    let batch_max = s.batch_max.max(1);
    let mut n: u64 = 0;
    let stopped = |queue: &Queue| {
        let left = queue.take(usize::MAX).len();
        if left > 0 {
            queue.metrics.dropped.add("shutdown", left as u64);
        }
    };
    loop {
        // The first notice of a batch.
        while queue.len() == 0 {
            tokio::select! {
                _ = stop.cancelled() => return stopped(&queue),
                _ = queue.wake.notified() => {}
            }
        }
        // More, until the batch is full or its time is up.
        let deadline = tokio::time::Instant::now() + s.batch_wait;
        while queue.len() < batch_max {
            tokio::select! {
                _ = stop.cancelled() => return stopped(&queue),
                _ = tokio::time::sleep_until(deadline) => break,
                _ = queue.wake.notified() => {}
            }
        }
        n += 1;
        let batch = Batch {
            batch: format!("{prefix}-{n}"),
            server,
            notices: queue.take(batch_max),
        };
        if !deliver(&*sink, &batch, &s, &queue.metrics, &stop).await {
            queue
                .metrics
                .dropped
                .add("shutdown", batch.notices.len() as u64);
            return stopped(&queue);
        }
    }
}

/// Deliver one batch, retrying with backoff; `false` when stopped first.
/// A batch that fails `max_attempts` times is dropped and counted.
async fn deliver(
    sink: &dyn OfflinePush,
    batch: &Batch,
    s: &Settings,
    metrics: &OfflineMetrics,
    stop: &CancellationToken,
) -> bool {
    let attempts = s.max_attempts.max(1);
    for attempt in 1..=attempts {
        let result = tokio::select! {
            _ = stop.cancelled() => return false,
            r = sink.deliver(batch) => r,
        };
        match result {
            Ok(()) => {
                metrics.sent.add(batch.notices.len() as u64);
                metrics.batches.inc();
                debug!(batch = %batch.batch, notices = batch.notices.len(), attempt, "offline notices delivered");
                return true;
            }
            Err(e) => {
                metrics.failed.inc();
                if attempt == attempts {
                    warn!(batch = %batch.batch, notices = batch.notices.len(), attempts, error = %e,
                        "offline notices dropped: every delivery attempt failed");
                    metrics.dropped.add("gave_up", batch.notices.len() as u64);
                    return true;
                }
                let wait = backoff(attempt, s.backoff_min, s.backoff_max, random_u32());
                warn!(batch = %batch.batch, attempt, retry_in_ms = wait.as_millis() as u64, error = %e,
                    "offline notice delivery failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return false,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    true
}

/// The wait after failed attempt `attempt` (1-based): `min` doubled per
/// earlier failure, capped at `max`, then jittered down by up to half
/// (`jitter` picks where), so servers that failed together do not retry
/// together.
pub fn backoff(attempt: u32, min: Duration, max: Duration, jitter: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(30);
    let full = min.saturating_mul(1u32 << doublings).min(max.max(min));
    let half = full / 2;
    let spread = half.as_nanos() as u64;
    let extra = if spread == 0 {
        0
    } else {
        // Uniform enough over [0, spread] for spreading retries.
        ((spread as u128 * jitter as u128) / u32::MAX as u128) as u64
    };
    half + Duration::from_nanos(extra)
}

fn random_u32() -> u32 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    // A failure of the system's generator leaves the jitter at its
    // minimum: retries still back off.
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    u32::from_le_bytes(b)
}

/// Header carrying `sha256=<hex HMAC-SHA256>` of the signed string.
pub const SIGNATURE_HEADER: &str = "x-iim-signature";
/// Header carrying the Unix seconds the request was signed at.
pub const TIMESTAMP_HEADER: &str = "x-iim-timestamp";
/// Header repeating [`Batch::batch`].
pub const BATCH_HEADER: &str = "x-iim-batch";

/// The signature header's value for `body` sent at `timestamp` (Unix
/// seconds): `sha256=` and the lowercase hex HMAC-SHA256, keyed with the
/// shared secret, of `<timestamp>.<body>` — the timestamp is signed too, so
/// a receiver that refuses old timestamps refuses replays.
pub fn sign(key: &hmac::Key, timestamp: u64, body: &[u8]) -> String {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in tag.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The built-in offline push: an HTTP POST of each batch as JSON to the
/// operator's URL, signed (see [`sign`]).
pub struct Webhook {
    http: reqwest::Client,
    url: reqwest::Url,
    key: hmac::Key,
}

impl Webhook {
    /// A webhook to `url` (already checked by the config) signing with
    /// `secret`; each request gives up after `timeout`. HTTPS trusts the
    /// system's roots and `extra_roots`.
    pub fn new(
        url: reqwest::Url,
        secret: &[u8],
        timeout: Duration,
        extra_roots: Vec<reqwest::Certificate>,
    ) -> Result<Webhook, String> {
        let mut builder = reqwest::Client::builder();
        for root in extra_roots {
            builder = builder.add_root_certificate(root);
        }
        let http = builder
            .timeout(timeout)
            .connect_timeout(timeout)
            // A redirect could lead the signed body anywhere (plain http
            // too); the operator's URL is the only destination.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the offline push HTTP client: {e}"))?;
        Ok(Webhook {
            http,
            url,
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        })
    }
}

impl OfflinePush for Webhook {
    fn deliver<'a>(&'a self, batch: &'a Batch) -> Delivery<'a> {
        Box::pin(async move {
            let body = serde_json::to_vec(batch)
                .map_err(|e| DeliveryError(format!("cannot encode the batch: {e}")))?;
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let signature = sign(&self.key, ts, &body);
            let response = self
                .http
                .post(self.url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(TIMESTAMP_HEADER, ts.to_string())
                .header(SIGNATURE_HEADER, signature)
                .header(BATCH_HEADER, batch.batch.as_str())
                .body(body)
                .send()
                .await
                .map_err(|e| DeliveryError(format!("POST {}: {e}", self.url)))?;
            let status = response.status();
            if status.is_success() {
                Ok(())
            } else {
                Err(DeliveryError(format!("POST {}: HTTP {status}", self.url)))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_bound_and_jitters_down_by_half_at_most() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(1_000));
        let top = |a| backoff(a, min, max, u32::MAX);
        let bottom = |a| backoff(a, min, max, 0);
        assert_eq!(top(1), Duration::from_millis(100));
        assert_eq!(top(2), Duration::from_millis(200));
        assert_eq!(top(3), Duration::from_millis(400));
        assert_eq!(top(4), Duration::from_millis(800));
        assert_eq!(top(5), Duration::from_millis(1_000));
        assert_eq!(top(60), Duration::from_millis(1_000));
        assert_eq!(bottom(1), Duration::from_millis(50));
        assert_eq!(bottom(5), Duration::from_millis(500));
        let mid = backoff(3, min, max, u32::MAX / 2);
        assert!(
            mid > Duration::from_millis(290) && mid < Duration::from_millis(310),
            "{mid:?}"
        );
    }

    #[test]
    fn the_signature_covers_timestamp_and_body() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"0123456789abcdef0123456789abcdef");
        let s = sign(&key, 1_700_000_000, b"{\"a\":1}");
        let hex = s.strip_prefix("sha256=").unwrap();
        assert_eq!(hex.len(), 64);
        // What a receiver does: recompute over "<timestamp>.<body>".
        let tag: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        hmac::verify(&key, b"1700000000.{\"a\":1}", &tag).unwrap();
        assert!(hmac::verify(&key, b"1700000001.{\"a\":1}", &tag).is_err());
        assert_ne!(s, sign(&key, 1_700_000_000, b"{\"a\":2}"));
    }

    #[test]
    fn previews_are_text_cut_at_a_character_boundary() {
        assert_eq!(preview(r#""hello""#, 100).as_deref(), Some("hello"));
        assert_eq!(preview(r#"{"text":"hello"}"#, 3).as_deref(), Some("hel"));
        // "é" is two bytes: a cut inside it goes back before it.
        assert_eq!(preview(r#""aé""#, 2).as_deref(), Some("a"));
        assert_eq!(preview(r#""hello""#, 0), None);
        assert_eq!(preview(r#"{"image":"x.png"}"#, 100), None);
        assert_eq!(preview("[1,2]", 100), None);
        assert_eq!(preview("not json", 100), None);
    }

    fn notice(user: u64) -> Notice {
        Notice {
            user,
            id: user,
            from: 1,
            ope: 0,
            to: user,
            kind: "text".into(),
            preview: None,
            ts: 0,
        }
    }

    /// Reports every delivery attempt (the batch, and whether it was
    /// accepted); refuses the first `fail`.
    struct Recorder {
        fail: std::sync::atomic::AtomicU32,
        tx: tokio::sync::mpsc::UnboundedSender<(Batch, bool)>,
    }

    impl OfflinePush for Recorder {
        fn deliver<'a>(&'a self, batch: &'a Batch) -> Delivery<'a> {
            use std::sync::atomic::Ordering::SeqCst;
            Box::pin(async move {
                let refuse = self
                    .fail
                    .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                let _ = self.tx.send((batch.clone(), !refuse));
                if refuse {
                    Err(DeliveryError("refused".into()))
                } else {
                    Ok(())
                }
            })
        }
    }

    fn settings() -> Settings {
        Settings {
            queue: 4,
            batch_max: 3,
            batch_wait: Duration::from_secs(3_600),
            max_attempts: 3,
            backoff_min: Duration::from_millis(1),
            backoff_max: Duration::from_millis(2),
            preview_bytes: 0,
        }
    }

    type Attempts = tokio::sync::mpsc::UnboundedReceiver<(Batch, bool)>;

    fn start(
        fail: u32,
        s: Settings,
    ) -> (
        Offline,
        Arc<OfflineMetrics>,
        Attempts,
        CancellationToken,
        TaskTracker,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let metrics = Arc::new(OfflineMetrics::default());
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let sink = Arc::new(Recorder {
            fail: fail.into(),
            tx,
        });
        let o = Offline::start(
            sink,
            s,
            "1-7".into(),
            1,
            metrics.clone(),
            stop.clone(),
            &tracker,
        );
        (o, metrics, rx, stop, tracker)
    }

    fn users(b: &Batch) -> Vec<u64> {
        b.notices.iter().map(|n| n.user).collect()
    }

    #[tokio::test]
    async fn a_full_batch_leaves_at_once_and_the_queue_drops_the_oldest() {
        let (o, metrics, mut rx, stop, tracker) = start(0, settings());
        // Six offered at once into a queue of four: 1 and 2 make room.
        o.offer((1..=6).map(notice).collect());
        assert_eq!(metrics.dropped.get("queue_full"), 2);
        assert_eq!(metrics.queued.get(), 6);
        // The batch wait is an hour: only a full batch can have left.
        let (b, ok) = rx.recv().await.unwrap();
        assert!(ok);
        assert_eq!(users(&b), [3, 4, 5]);
        assert_eq!(b.batch, "1-7-1");
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        // 6 was still gathering its batch at shutdown.
        assert_eq!(metrics.dropped.get("shutdown"), 1);
        assert_eq!((metrics.sent.get(), metrics.batches.get()), (3, 1));
        assert_eq!(metrics.queue.get(), 0);
    }

    #[tokio::test]
    async fn a_batch_leaves_when_its_time_is_up_and_failures_are_retried() {
        let s = Settings {
            batch_wait: Duration::from_millis(20),
            ..settings()
        };
        let (o, metrics, mut rx, stop, tracker) = start(2, s);
        o.offer(vec![notice(9)]);
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (b, ok) = rx.recv().await.unwrap();
            seen.push((b.batch.clone(), users(&b), ok));
        }
        let same = |ok| ("1-7-1".to_string(), vec![9], ok);
        assert_eq!(seen, [same(false), same(false), same(true)]);
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        assert_eq!(metrics.failed.get(), 2);
        assert_eq!((metrics.sent.get(), metrics.batches.get()), (1, 1));
        assert_eq!(metrics.dropped.get("gave_up"), 0);
    }

    #[tokio::test]
    async fn a_batch_failing_every_attempt_is_dropped_and_the_next_one_goes() {
        let s = Settings {
            batch_wait: Duration::ZERO,
            ..settings()
        };
        // Three attempts (all there are) fail; then deliveries work.
        let (o, metrics, mut rx, stop, tracker) = start(3, s);
        o.offer(vec![notice(1)]);
        for _ in 0..3 {
            let (b, ok) = rx.recv().await.unwrap();
            assert_eq!((users(&b), ok), (vec![1], false));
        }
        o.offer(vec![notice(2)]);
        let (b, ok) = rx.recv().await.unwrap();
        assert_eq!((users(&b), ok, b.batch.as_str()), (vec![2], true, "1-7-2"));
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        assert_eq!(metrics.failed.get(), 3);
        assert_eq!(metrics.dropped.get("gave_up"), 1);
        assert_eq!(metrics.sent.get(), 1);
    }
}
