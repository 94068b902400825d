//! What the benchmark binaries share beyond the test kit (`iim-kit`, which
//! starts processes, deployments and in-process nodes): open-loop load and
//! latency recording, NATS for side-by-side runs, and /proc readings. The
//! multi-node and multi-process tests beside it (`tests/`) use the kit.

pub mod deps;
pub mod load;
pub mod nats;
pub mod procfs;
