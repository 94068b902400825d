//! Identifiers and addresses ([`iim_proto::types`]), and the wall clock the
//! registry's times are read from.

pub use iim_proto::types::*;

/// Current wall-clock time in unix milliseconds (the registry's time unit).
pub fn now_ms() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Current wall-clock time in Unix seconds (token claims are in seconds).
pub fn unix_secs() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
