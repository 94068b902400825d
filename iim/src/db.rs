//! Helpers shared by the registry, the message store and presence: which
//! database errors are worth retrying a whole transaction for, and how long
//! to wait before the next attempt. Crate-internal.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::time::Duration;

use sqlx::error::ErrorKind;

/// Conflicts worth retrying a whole transaction for: a duplicate key (an
/// insert race, or a racing resend), an InnoDB deadlock (1213) or lock wait
/// timeout (1205, which arrives with the generic SQLSTATE HY000), a
/// serialization failure (40001), or SQLite still busy or locked after its
/// timeout.
pub(crate) fn is_retryable(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    if db.kind() == ErrorKind::UniqueViolation {
        return true;
    }
    if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return matches!(my.number(), 1205 | 1213);
    }
    matches!(
        db.code().as_deref(),
        Some("40001") | Some("5") | Some("6") | Some("261") | Some("517")
    )
}

/// 5, 10, 15 ... ms plus up to 4 ms of jitter, so racing processes drift
/// apart.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let jitter = RandomState::new().hash_one(attempt) % 5;
    Duration::from_millis(5 * u64::from(attempt) + jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_below_5ms() {
        assert!(backoff(1) < Duration::from_millis(10));
        assert!(backoff(4) >= Duration::from_millis(20));
        assert!(backoff(4) < Duration::from_millis(25));
    }

    #[test]
    fn only_database_conflicts_are_retryable() {
        assert!(!is_retryable(&sqlx::Error::RowNotFound));
        assert!(!is_retryable(&sqlx::Error::PoolTimedOut));
    }
}
