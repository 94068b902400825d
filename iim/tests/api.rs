//! The plugin API's guard on the kinds reserved by iim: a plugin's handle
//! refuses them, the app server's own handle (its chat and presence
//! services) still sends them, locally and through the link.

use bytes::Bytes;
use iim::api::{IimParts, LocalDelivery, LocalReport, Submit};
use iim::kinds::{self, Reserved};
use iim::registry::Registry;
use iim::types::{ChannelId, ServerId, Session, UserId};
use iim::wire::{Message, UserRow};
use iim::{Iim, Outgoing, SendError};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const HERE: ServerId = ServerId(1);
const THERE: ServerId = ServerId(2);

/// Records what reaches this server's connections.
#[derive(Default)]
struct Recorder(Mutex<Vec<u16>>);

impl LocalDelivery for Recorder {
    fn deliver(&self, msg: &Arc<Message>, rows: &[UserRow]) -> LocalReport {
        self.0.lock().unwrap().push(msg.kind);
        LocalReport {
            delivered: rows.len(),
            missing: 0,
        }
    }
}

struct Relay {
    iim: Iim,
    local: Arc<Recorder>,
    link: mpsc::Receiver<Submit>,
    _dir: tempfile::TempDir,
}

async fn relay() -> Relay {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("registry.db").display());
    let registry = Registry::connect(&url).await.unwrap();
    let (tx, link) = mpsc::channel(16);
    let local = Arc::new(Recorder::default());
    let iim = Iim::new(IimParts {
        server: HERE,
        epoch: 1,
        exchange: ServerId(100),
        max_frame: Arc::new(AtomicUsize::new(1 << 20)),
        link: tx,
        local: local.clone(),
        closing: CancellationToken::new(),
        registry,
    });
    Relay {
        iim,
        local,
        link,
        _dir: dir,
    }
}

fn session(server: ServerId, user: u64) -> Session {
    Session {
        user: UserId(user),
        device: "phone".into(),
        server,
        channel: ChannelId(user),
    }
}

fn out(kind: u16) -> Outgoing {
    Outgoing {
        kind,
        from: UserId(7),
        body: Bytes::from_static(b"{}"),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_plugin_is_refused_the_reserved_kinds_and_the_services_still_send_them() {
    let mut r = relay().await;
    let plugin = r.iim.for_plugin();
    assert!(r.iim.may_send_reserved() && !plugin.may_send_reserved());
    let users = [session(HERE, 11), session(THERE, 21)];

    for kind in Reserved::ALL {
        let err = plugin.send(out(kind.kind()), &users).await.unwrap_err();
        assert_eq!(err, SendError::ReservedKind(kind));
        assert!(err.to_string().contains("reserved"), "{err}");
    }
    assert!(r.local.0.lock().unwrap().is_empty(), "nothing delivered");
    assert!(r.link.try_recv().is_err(), "no 905 handed to the link");

    // Any other kind is the plugin's to use.
    let p = plugin.submit(out(9), &users).await.unwrap();
    assert_eq!(p.id().seq, 1, "refusals took no message id");
    assert_eq!(r.link.try_recv().unwrap().targets, vec![THERE]);

    // The app server's own handle: chat and presence go out, locally and
    // through the link.
    for kind in [kinds::CHAT, kinds::PRESENCE, kinds::NOTICE] {
        let p = r.iim.submit(out(kind), &users).await.unwrap();
        assert_eq!(r.link.try_recv().unwrap().id, p.id());
    }
    assert_eq!(
        *r.local.0.lock().unwrap(),
        vec![9, kinds::CHAT, kinds::PRESENCE, kinds::NOTICE]
    );
}
