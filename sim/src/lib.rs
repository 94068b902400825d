//! Deterministic simulation of iim's relay: the real protocol cores
//! (`iim-core`) — one to three exchanges and two to five app servers'
//! links — run on a virtual clock through a seeded schedule of sends and
//! faults: links cut and restored, frames delayed and split, an exchange
//! crashing or draining (its queues lost), two exchanges cut off from each
//! other, app servers crashing or draining and coming back with a new
//! epoch (and attaching to whichever exchange the registry offers), the
//! registry answering slowly, with errors, from a stale copy, or not at
//! all, leases running out. With several exchanges, 905 rows for targets
//! attached elsewhere are relayed between exchanges, and move with their
//! target when it re-attaches.
//!
//! After every step the simulator checks the bounds (every queue within its
//! limit, gauges equal to what they count); the [`oracle`] checks every
//! delivery and every finished send as it happens; at the end, with the
//! faults healed, every live server must be registered, every earlier send
//! finished, every exchange linked to every other and holding nothing for a
//! server that is gone or relayed and unanswered, and a last round of sends
//! must be delivered everywhere.
//!
//! A run is a function of its seed: [`run`] it again and it does the same
//! thing, step for step (`SEED=n SIM_TRACE=1` prints every step).

pub mod oracle;
pub mod rng;
pub mod world;

pub use world::{FEDERATED, Params, Stats, Violation, World};

/// Run the simulation for `seed`; `trace` prints every step.
pub fn run(seed: u64, trace: bool) -> Result<Stats, Violation> {
    World::new(seed, trace).run()
}
