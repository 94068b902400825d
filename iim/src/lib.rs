//! iim: many instant-messaging app servers acting as one.
//!
//! This library holds what the exchange and the app servers share: the
//! identifier types, the 905/906 wire protocol, QUIC/mTLS configuration,
//! registry access, metrics rendering, the plugin-facing API
//! ([`Iim::send`], [`Plugin`]) and the message kinds reserved by iim
//! ([`kinds`]). Daemon logic lives in the `iim-exchange`
//! and `iim-appserver` crates.

mod aggregate;
pub mod api;
mod db;
pub mod kinds;
pub mod presence;
pub mod quic;
pub mod registry;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod types;

pub use iim_proto::{metrics, wire};

pub use api::{Iim, Outgoing, PendingReport, Plugin, SendError, SendReport};
pub use types::{Address, ChannelId, MessageId, ServerId, Session, UserId};
pub use wire::{DeliveryStatus, Message};
