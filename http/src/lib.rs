//! The daemons' loopback HTTP.
//!
//! Both daemons serve Prometheus metrics at `/metrics` and `/health` on one
//! listener; the app server serves its admin API (`POST /admin/send`,
//! bearer token required) on another. This
//! crate owns what the two sides of that HTTP share: the admin API's
//! request and response types ([`admin`]), the metrics route and the
//! listener (feature `server`, [`server`]) and the client that iimctl and
//! the test kit call it with (feature `client`, [`client`]).
//!
//! It does not own the admin API's handlers (they need the app server's
//! state: `iim_appserver::admin`) nor any metric (each daemon renders its
//! own page). It lives apart from the `iim` library so that plugin authors
//! do not compile an HTTP server or client.

pub mod admin;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
pub mod server;

/// The Prometheus page's path.
pub const METRICS_PATH: &str = "/metrics";
