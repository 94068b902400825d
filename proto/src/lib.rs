//! iim's vocabulary, shared by every part of the system: server, user and
//! channel ids and addresses (`types`), the 905/906 frames and the message
//! codec (`wire`), building one write out of many frames (`coalesce`), and
//! the counters a node renders as Prometheus metrics (`metrics`).
//!
//! Pure by construction: this crate depends on no runtime, socket, database
//! or clock, so the sans-IO protocol cores (`iim-core`) built on it cannot
//! reach one either. The `iim` library re-exports these modules under their
//! old paths (`iim::wire`, `iim::types`, `iim::metrics`).

pub mod coalesce;
pub mod metrics;
pub mod types;
pub mod wire;
