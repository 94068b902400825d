//! The one retry of the database layer: which errors are worth running a
//! whole transaction again for, how long to wait before the next attempt,
//! and how many attempts a call gets.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::time::Duration;

use sqlx::error::{DatabaseError, ErrorKind};
use sqlx::migrate::MigrateError;
use sqlx::mysql::MySqlDatabaseError;
use sqlx::sqlite::SqliteError;

/// InnoDB lock wait timeout (it arrives with the generic SQLSTATE HY000).
const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;
/// InnoDB deadlock; also how Galera reports a certification failure.
const ER_LOCK_DEADLOCK: u16 = 1213;
/// SQLite primary result codes (the low byte of an extended code:
/// `SQLITE_BUSY_SNAPSHOT`, `SQLITE_LOCKED_SHAREDCACHE` ... are variants).
const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;

/// How many attempts [`retry`] makes and how its pauses grow.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Policy {
    pub attempts: u32,
    /// The pause after attempt `n` is `n * step` plus up to one `step` of
    /// jitter, so racing processes drift apart.
    pub step: Duration,
}

/// Every write transaction of the registry, the store and presence: ten
/// attempts pause about a quarter of a second in all, well within a
/// client's patience, and enough for eight writers racing on one row.
pub(crate) const TRANSACTION: Policy = Policy {
    attempts: 10,
    step: Duration::from_millis(5),
};

/// Migrations at start: several processes starting on a fresh database race
/// to apply them — SQLite's migrations take no lock, and the lock sqlx takes
/// on MySQL (`GET_LOCK` with a timeout of -1) is no lock on MariaDB, which
/// answers NULL. The loser finds them applied on a later attempt. Slower
/// steps: a migration takes longer than a transaction, and nobody waits on
/// a start but the operator.
pub(crate) const MIGRATION: Policy = Policy {
    attempts: 6,
    step: Duration::from_millis(100),
};

/// An error that may be a conflict worth another attempt.
pub(crate) trait Conflict: fmt::Debug {
    /// Whether this failure is worth running the whole attempt again.
    fn is_conflict(&self) -> bool;
}

impl Conflict for sqlx::Error {
    fn is_conflict(&self) -> bool {
        is_retryable(self)
    }
}

/// What a racing process applying the same migrations causes: a statement
/// the database refused ("table already exists", a duplicate version, a
/// busy database), or on MySQL a migration marked as partly applied because
/// the other process is applying it now. Anything else — a missing or
/// modified migration, a broken connection — is final; so is a migration
/// left partly applied by a crash, once the attempts run out.
impl Conflict for MigrateError {
    fn is_conflict(&self) -> bool {
        matches!(
            self,
            MigrateError::Execute(sqlx::Error::Database(_))
                | MigrateError::ExecuteMigration(sqlx::Error::Database(_), _)
                | MigrateError::Dirty(_)
        )
    }
}

/// Conflicts worth retrying a whole transaction for: a duplicate key (an
/// insert race, or a racing resend), an InnoDB deadlock or lock wait
/// timeout, or SQLite still busy or locked after its busy timeout. Decided
/// by the error's kind and number, never by its message.
pub(crate) fn is_retryable(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    if db.kind() == ErrorKind::UniqueViolation {
        return true;
    }
    if let Some(my) = db.try_downcast_ref::<MySqlDatabaseError>() {
        return matches!(my.number(), ER_LOCK_WAIT_TIMEOUT | ER_LOCK_DEADLOCK);
    }
    if let Some(lite) = db.try_downcast_ref::<SqliteError>() {
        // sqlx reports SQLite's extended result code only in decimal.
        let code = lite.code().and_then(|c| c.parse::<i32>().ok());
        return code.is_some_and(|c| matches!(c & 0xff, SQLITE_BUSY | SQLITE_LOCKED));
    }
    false
}

/// The pause after attempt `attempt` (from 1).
pub(crate) fn backoff(policy: Policy, attempt: u32) -> Duration {
    let step = u64::try_from(policy.step.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    let jitter = RandomState::new().hash_one(attempt) % step;
    policy.step * attempt + Duration::from_micros(jitter)
}

/// Runs `attempt_fn` — one whole transaction, begun and committed (or
/// rolled back) inside it — and runs it again after [`backoff`] while it
/// fails with a [`Conflict`], at most `policy.attempts` times in all. The
/// last failure is returned as it is.
pub(crate) async fn retry<T, E, F, Fut>(
    what: &'static str,
    policy: Policy,
    mut attempt_fn: F,
) -> Result<T, E>
where
    E: Conflict,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 1;
    loop {
        match attempt_fn().await {
            Err(e) if attempt < policy.attempts && e.is_conflict() => {
                tracing::debug!(what, attempt, error = ?e, "database conflict, retrying");
                tokio::time::sleep(backoff(policy, attempt)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_grows_with_jitter_below_5ms() {
        assert!(backoff(TRANSACTION, 1) < Duration::from_millis(10));
        assert!(backoff(TRANSACTION, 4) >= Duration::from_millis(20));
        assert!(backoff(TRANSACTION, 4) < Duration::from_millis(25));
    }

    #[test]
    fn only_database_conflicts_are_retryable() {
        assert!(!is_retryable(&sqlx::Error::RowNotFound));
        assert!(!is_retryable(&sqlx::Error::PoolTimedOut));
        assert!(!MigrateError::VersionMismatch(3).is_conflict());
        assert!(!MigrateError::Execute(sqlx::Error::PoolTimedOut).is_conflict());
        assert!(MigrateError::Dirty(2).is_conflict());
    }

    /// A conflict for the first `fail` attempts, then success.
    struct Flaky {
        calls: AtomicU32,
        fail: u32,
    }

    #[derive(Debug)]
    enum TestError {
        Conflict,
        Final,
    }

    impl Conflict for TestError {
        fn is_conflict(&self) -> bool {
            matches!(self, TestError::Conflict)
        }
    }

    impl Flaky {
        async fn run(&self, final_error: bool) -> Result<u32, TestError> {
            let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
            match n <= self.fail {
                true if final_error => Err(TestError::Final),
                true => Err(TestError::Conflict),
                false => Ok(n),
            }
        }
    }

    fn flaky(fail: u32) -> Flaky {
        Flaky {
            calls: AtomicU32::new(0),
            fail,
        }
    }

    /// [`TRANSACTION`]'s attempts with pauses of microseconds.
    const QUICK: Policy = Policy {
        attempts: TRANSACTION.attempts,
        step: Duration::from_micros(1),
    };

    #[tokio::test]
    async fn conflicts_are_retried_up_to_the_attempt_limit() {
        let f = flaky(QUICK.attempts - 1);
        let got = retry("test", QUICK, || f.run(false)).await;
        assert_eq!(got.ok(), Some(QUICK.attempts));

        let f = flaky(QUICK.attempts);
        let got = retry("test", QUICK, || f.run(false)).await;
        assert!(matches!(got, Err(TestError::Conflict)), "{got:?}");
        assert_eq!(f.calls.load(Ordering::Relaxed), QUICK.attempts);
    }

    #[tokio::test]
    async fn other_errors_are_returned_at_once() {
        let f = flaky(1);
        let got = retry("test", QUICK, || f.run(true)).await;
        assert!(matches!(got, Err(TestError::Final)), "{got:?}");
        assert_eq!(f.calls.load(Ordering::Relaxed), 1);
    }
}
