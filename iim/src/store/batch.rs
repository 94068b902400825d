//! Storing several messages in one transaction (group commit): the chat
//! plugin's writer hands over whatever sends queued up while the previous
//! transaction ran, and every one of them is acknowledged when that one
//! transaction commits.
//!
//! The guarantees are those of [`Store::store_message`], message by
//! message: nothing is acknowledged before its commit; inbox and timeline
//! sequences are allocated under the same locks, in the same order (group
//! rows by ascending id, then `user_seq` rows by ascending id), so they stay
//! gap-free and every member of a group sees one order; a `(sender, req)`
//! stored before is returned as it was. Messages of one batch get their
//! sequences in the order they were handed in.
//!
//! What one batch saves is statements and commits: the duplicate check
//! with the directory check (one statement, before the transaction), the
//! locking read of `user_seq`, the inserts into `messages` (returning the
//! new ids where the server has `RETURNING`), `inbox` and `user_seq` are
//! each one statement for the whole batch, and there is one commit (one
//! fsync with group commit off). A batch of 1:1 messages is seven round
//! trips: the check, `BEGIN`, the locking read, three inserts, `COMMIT`.
//!
//! A message that is refused (unknown user or group, not a member) gets its
//! error and takes no part in the writes. Should the batch transaction fail
//! for any other reason (a conflict retried to the limit, a value the
//! database refuses), every message of it is stored again on its own
//! ([`Store::store_message`], with its own retries): one bad message cannot
//! fail the others, and the result of each is exactly what storing it alone
//! would have given.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;

use sqlx::AssertSqlSafe;
use sqlx::any::AnyRow;

use super::messages::{Attempt, settle};
use super::{
    Delivery, ID_CHUNK, NewMessage, OPE_GROUP, OPE_USER, ROW_CHUNK, Store, StoreError,
    StoredMessage, Target, group_param, positive,
};
use crate::db::{
    Backend, Tx, bad_row, bind_all, col, placeholders, rollback, rows, sorted_user_params,
    user_param,
};
use crate::types::UserId;

/// Rows per multi-row `INSERT INTO messages` (eight values each).
const MESSAGE_CHUNK: usize = 100;
/// `(sender, req)` pairs per look-up (two values each).
const PAIR_CHUNK: usize = 200;

/// Where one message of the batch goes, once checked.
enum Plan {
    /// Refused; no write.
    Refused(StoreError),
    /// Write fan-out to these users (sorted, distinct).
    Inboxes(Vec<i64>),
    /// Read fan-out: the timeline of this large group.
    Timeline(u64),
}

/// One result per message of a batch.
type Results = Vec<Result<Delivery, StoreError>>;

/// What [`Store::precheck`] found: the indexes of messages stored before,
/// and the users the directory lacks.
type Checked = (Vec<usize>, BTreeSet<UserId>);

/// What a batch reads before its transaction ([`Store::prepare_batch`]).
/// None of it takes a lock, so it may be read while the previous batch's
/// transaction is still running.
pub struct PreparedBatch {
    /// The duplicate and directory checks ([`Store::precheck`]); `None` for
    /// a batch of one message, which is stored as it would be alone.
    checked: Option<Result<Checked, StoreError>>,
    /// The batch's transaction, begun (MySQL only: on SQLite a begun write
    /// transaction holds the database, or the pool's one connection).
    tx: Option<Tx>,
}

impl PreparedBatch {
    /// Whether the batch's transaction is begun already (MySQL, a batch of
    /// two or more, `BEGIN` answered).
    pub fn begun(&self) -> bool {
        self.tx.is_some()
    }
}

impl Store {
    /// Stores `msgs` as [`Store::store_message`] would store each, in one
    /// transaction where it can (see the module documentation). The
    /// results are in the order of `msgs`.
    pub async fn store_messages(
        &self,
        msgs: &[NewMessage<'_>],
        large_group_threshold: usize,
    ) -> Vec<Result<Delivery, StoreError>> {
        let prepared = self.prepare_batch(msgs).await;
        self.store_prepared(msgs, prepared, large_group_threshold, &|| {})
            .await
    }

    /// The first part of [`Store::store_messages`]: the duplicate and
    /// directory checks, and (on MySQL) `BEGIN`, in one round trip (two
    /// connections at once). Nothing is locked or written, so a writer may
    /// prepare its next batch while the previous one commits; the batches
    /// must then be stored ([`Store::store_prepared`]) one after the
    /// other, in the order of their sends.
    pub async fn prepare_batch(&self, msgs: &[NewMessage<'_>]) -> PreparedBatch {
        if msgs.len() < 2 {
            return PreparedBatch {
                checked: None,
                tx: None,
            };
        }
        let (fresh, _) = firsts(msgs);
        let (checked, tx) = match self.backend() {
            Backend::MySql => {
                let (checked, tx) =
                    tokio::join!(self.precheck(msgs, &fresh), self.db.begin_write());
                // A failed BEGIN is tried again by the batch itself.
                (checked, tx.ok())
            }
            Backend::Sqlite => (self.precheck(msgs, &fresh).await, None),
        };
        PreparedBatch {
            checked: Some(checked),
            tx,
        }
    }

    /// The rest of [`Store::store_messages`] for a batch `prepared` from
    /// the same `msgs`. `committing` is called when the batch transaction
    /// is about to send its `COMMIT`: a writer may gather and prepare its
    /// next batch from then on. Should the commit fail, the batch is still
    /// stored message by message before this returns, so the next batch,
    /// stored after this returns, still comes after it.
    pub async fn store_prepared(
        &self,
        msgs: &[NewMessage<'_>],
        prepared: PreparedBatch,
        large_group_threshold: usize,
        committing: &(dyn Fn() + Sync),
    ) -> Vec<Result<Delivery, StoreError>> {
        let PreparedBatch { checked, mut tx } = prepared;
        if let [m] = msgs {
            return vec![self.store_message(m, large_group_threshold).await];
        }
        // A `(sender, req)` twice in one batch: the first is stored, the
        // later ones are resends of it, answered once it is.
        let (mut fresh, repeats) = firsts(msgs);
        let checked = match checked {
            Some(checked) => checked,
            // Prepared for fewer messages than given: checked now.
            None => self.precheck(msgs, &fresh).await,
        };
        let mut out: Vec<Option<Result<Delivery, StoreError>>> =
            (0..msgs.len()).map(|_| None).collect();
        // Resends of messages stored earlier: answered as `store_message`
        // answers them. The users the directory lacks come with them.
        let missing = match checked {
            Ok((found, missing)) => {
                for i in found {
                    out[i] = Some(self.store_message(&msgs[i], large_group_threshold).await);
                }
                fresh.retain(|&i| out[i].is_none());
                missing
            }
            Err(e) => {
                tracing::debug!(error = %e, "batch duplicate check failed; storing one by one");
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                if let Some(tx) = tx.take() {
                    rollback(tx).await;
                }
                for &i in &fresh {
                    out[i] = Some(self.store_message(&msgs[i], large_group_threshold).await);
                }
                fresh.clear();
                BTreeSet::new()
            }
        };
        if !fresh.is_empty() {
            let batch: Vec<NewMessage<'_>> = fresh.iter().map(|&i| msgs[i]).collect();
            match self
                .store_batch(&batch, &missing, tx, large_group_threshold, committing)
                .await
            {
                Ok(results) => {
                    for (&i, r) in fresh.iter().zip(results) {
                        out[i] = Some(r);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, messages = batch.len(), "batch transaction failed; storing one by one");
                    self.fallbacks.fetch_add(1, Ordering::Relaxed);
                    for &i in &fresh {
                        out[i] = Some(self.store_message(&msgs[i], large_group_threshold).await);
                    }
                }
            }
        } else if let Some(tx) = tx {
            rollback(tx).await;
        }
        for i in repeats {
            out[i] = Some(self.store_message(&msgs[i], large_group_threshold).await);
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(bad_row("batch result missing").into())))
            .collect()
    }

    /// Before the transaction, in one statement per chunk: the indexes (of
    /// `idx` into `msgs`) whose `(sender, req)` is stored, and which of
    /// their senders and 1:1 targets the directory lacks. Both are plain
    /// reads (at `READ COMMITTED`, as the directory check inside the
    /// transaction was), so reading them first gives the same verdicts in
    /// one round trip instead of two.
    async fn precheck(
        &self,
        msgs: &[NewMessage<'_>],
        idx: &[usize],
    ) -> Result<Checked, StoreError> {
        let mut people: Vec<UserId> = Vec::with_capacity(idx.len() * 2);
        for &i in idx {
            people.push(msgs[i].sender);
            if let Target::User(to) = msgs[i].target {
                people.push(to);
            }
        }
        let ids = sorted_user_params(&people);
        let pairs: Vec<&[usize]> = idx.chunks(PAIR_CHUNK).collect();
        let users: Vec<&[i64]> = ids.chunks(ID_CHUNK).collect();
        let mut stored = BTreeSet::new();
        let mut known = HashSet::with_capacity(ids.len());
        for n in 0..pairs.len().max(users.len()) {
            let (pairs, users) = (pairs.get(n).copied(), users.get(n).copied());
            // A stored `(sender, req)` as `(a, b)`; a known user as its id
            // in `a` and no `b`.
            let mut parts = Vec::with_capacity(2);
            if let Some(chunk) = pairs {
                let cond = vec!["(sender = ? AND req = ?)"; chunk.len()].join(" OR ");
                parts.push(format!(
                    "SELECT sender AS a, req AS b FROM messages WHERE {cond}"
                ));
            }
            if let Some(chunk) = users {
                parts.push(format!(
                    "SELECT id AS a, NULL AS b FROM users WHERE id IN ({})",
                    placeholders(chunk.len())
                ));
            }
            let mut query = sqlx::query(AssertSqlSafe(parts.join(" UNION ALL ")));
            for &i in pairs.unwrap_or_default() {
                query = query.bind(user_param(msgs[i].sender)).bind(msgs[i].req);
            }
            query = bind_all(query, users.unwrap_or_default());
            for row in query.fetch_all(self.db.pool()).await? {
                let a = col::<i64>(&row, "a")?;
                match col::<Option<String>>(&row, "b")? {
                    Some(req) => {
                        stored.insert((a, req));
                    }
                    None => {
                        known.insert(a);
                    }
                }
            }
        }
        let found = idx
            .iter()
            .copied()
            .filter(|&i| stored.contains(&(user_param(msgs[i].sender), msgs[i].req.to_owned())))
            .collect();
        let missing = people
            .into_iter()
            .filter(|&u| !known.contains(&user_param(u)))
            .collect();
        Ok((found, missing))
    }

    /// The batch transaction, run again after creating missing `user_seq`
    /// rows (as [`Store::store_message`] does, for the same reason). Not
    /// retried: on any failure the caller stores the messages one by one,
    /// each with its own retries (a racing twin of one message, which fails
    /// the batch on the unique key, is then found as the original).
    async fn store_batch(
        &self,
        msgs: &[NewMessage<'_>],
        missing: &BTreeSet<UserId>,
        tx: Option<Tx>,
        threshold: usize,
        committing: &(dyn Fn() + Sync),
    ) -> Result<Results, StoreError> {
        let users = match self
            .try_batch(msgs, missing, tx, threshold, committing)
            .await?
        {
            Attempt::Stored(results) => return Ok(results),
            Attempt::NeedSeqRows(users) => users,
        };
        self.create_seq_rows(&users).await?;
        match self
            .try_batch(msgs, missing, None, threshold, committing)
            .await?
        {
            Attempt::Stored(results) => Ok(results),
            Attempt::NeedSeqRows(_) => {
                Err(bad_row("user_seq rows missing after creating them").into())
            }
        }
    }

    /// One go of the batch transaction, in `tx` when it is begun already.
    async fn try_batch(
        &self,
        msgs: &[NewMessage<'_>],
        missing: &BTreeSet<UserId>,
        tx: Option<Tx>,
        threshold: usize,
        committing: &(dyn Fn() + Sync),
    ) -> Result<Attempt<Results>, StoreError> {
        let mut tx = match tx {
            Some(tx) => tx,
            None => self.db.begin_write().await?,
        };
        let attempt = self.batch_in(&mut tx, msgs, missing, threshold).await;
        if let Ok(Attempt::Stored(_)) = attempt {
            committing();
        }
        settle(tx, attempt).await
    }

    async fn batch_in(
        &self,
        tx: &mut Tx,
        msgs: &[NewMessage<'_>],
        missing: &BTreeSet<UserId>,
        threshold: usize,
    ) -> Result<Attempt<Results>, StoreError> {
        let (mut plans, mut timelines) = self.plan(tx, msgs, missing, threshold).await?;

        // Lock every inbox's `user_seq` row, ascending, after the groups.
        let fan: BTreeSet<i64> = plans
            .iter()
            .filter_map(|p| match p {
                Plan::Inboxes(users) => Some(users.iter().copied()),
                _ => None,
            })
            .flatten()
            .collect();
        let fan: Vec<i64> = fan.into_iter().collect();
        let mut last = match self.lock_seq_rows(tx, &fan).await? {
            Ok(last) => last,
            Err(missing) => return Ok(Attempt::NeedSeqRows(missing)),
        };

        // The messages themselves, then their ids by `(sender, req)`.
        let written: Vec<usize> = (0..msgs.len())
            .filter(|&i| !matches!(plans[i], Plan::Refused(_)))
            .collect();
        let ids = self.insert_messages(tx, msgs, &written).await?;

        // Sequences, in the order of the batch.
        let mut inbox_rows: Vec<(i64, i64, i64)> = Vec::new();
        let mut timeline_rows: Vec<(u64, i64, i64)> = Vec::new();
        let mut results: Vec<Result<Delivery, StoreError>> = Vec::with_capacity(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            let plan = std::mem::replace(&mut plans[i], Plan::Timeline(0));
            let id = match &plan {
                Plan::Refused(_) => 0,
                _ => ids[i],
            };
            let delivery = match plan {
                Plan::Refused(e) => {
                    results.push(Err(e));
                    continue;
                }
                Plan::Inboxes(users) => {
                    let sender = user_param(m.sender);
                    let mut inbox = Vec::with_capacity(users.len());
                    let mut sender_seq = None;
                    for u in users {
                        let slot = last
                            .get_mut(&u)
                            .ok_or_else(|| bad_row("user_seq row not locked"))?;
                        *slot = slot.checked_add(1).ok_or_else(|| {
                            bad_row(format!("user {}: inbox sequence overflow", u as u64))
                        })?;
                        inbox_rows.push((u, *slot, id));
                        let seq = positive(*slot, "inbox.seq")?;
                        if u == sender {
                            sender_seq = Some(seq);
                        }
                        inbox.push((UserId(u as u64), seq));
                    }
                    inbox.sort_unstable();
                    Delivery {
                        message: stored(m, id)?,
                        sender_seq,
                        gseq: None,
                        inbox,
                        duplicate: false,
                    }
                }
                Plan::Timeline(g) => {
                    let slot = timelines
                        .get_mut(&g)
                        .ok_or_else(|| bad_row("group row not locked"))?;
                    *slot = slot
                        .checked_add(1)
                        .ok_or_else(|| bad_row(format!("group {g}: timeline sequence overflow")))?;
                    timeline_rows.push((g, *slot, id));
                    Delivery {
                        message: stored(m, id)?,
                        sender_seq: None,
                        gseq: Some(positive(*slot, "group_timeline.seq")?),
                        inbox: Vec::new(),
                        duplicate: false,
                    }
                }
            };
            results.push(Ok(delivery));
        }

        for chunk in inbox_rows.chunks(ROW_CHUNK) {
            let sql = format!(
                "INSERT INTO inbox (user_id, seq, message_id) VALUES {}",
                rows(chunk.len(), 3)
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for &(u, seq, id) in chunk {
                query = query.bind(u).bind(seq).bind(id);
            }
            query.execute(&mut **tx).await?;
        }
        let touched: Vec<(i64, i64)> = fan.iter().map(|u| (*u, last[u])).collect();
        for chunk in touched.chunks(ROW_CHUNK) {
            // An upsert by primary key, as in `store_message`.
            let sql = format!(
                "INSERT INTO user_seq (user_id, last_seq) VALUES {} {}",
                rows(chunk.len(), 2),
                self.backend().upsert_columns("user_id", &["last_seq"])
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for &(u, seq) in chunk {
                query = query.bind(u).bind(seq);
            }
            query.execute(&mut **tx).await?;
        }
        for chunk in timeline_rows.chunks(ROW_CHUNK) {
            let sql = format!(
                "INSERT INTO group_timeline (group_id, seq, message_id) VALUES {}",
                rows(chunk.len(), 3)
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for &(g, seq, id) in chunk {
                query = query.bind(group_param(g)).bind(seq).bind(id);
            }
            query.execute(&mut **tx).await?;
        }
        for (g, seq) in timelines {
            sqlx::query("UPDATE chat_groups SET timeline_seq = ? WHERE id = ?")
                .bind(seq)
                .bind(group_param(g))
                .execute(&mut **tx)
                .await?;
        }
        Ok(Attempt::Stored(results))
    }

    /// Checks every message and locks its groups (ascending): where each
    /// goes, or why it is refused — the same verdicts, in the same order of
    /// checks, as [`Store::store_message`]. `missing`: the senders and 1:1
    /// targets the directory lacks ([`Store::precheck`]).
    async fn plan(
        &self,
        tx: &mut Tx,
        msgs: &[NewMessage<'_>],
        missing: &BTreeSet<UserId>,
        threshold: usize,
    ) -> Result<(Vec<Plan>, BTreeMap<u64, i64>), StoreError> {
        // Groups: locked in ascending order, members read under the lock.
        let groups: BTreeSet<u64> = msgs
            .iter()
            .filter_map(|m| match m.target {
                Target::Group(g) => Some(g),
                Target::User(_) => None,
            })
            .collect();
        // Per group: `None` unknown, else its members (sorted) when small,
        // or an empty list and `large`.
        let mut members: HashMap<u64, Option<(bool, Vec<i64>)>> = HashMap::new();
        // Large groups' timeline sequences, read under their lock.
        let mut timelines = BTreeMap::new();
        let limit = i64::try_from(threshold.saturating_add(1)).unwrap_or(i64::MAX);
        for g in groups {
            let Some(timeline) = self.lock_group(tx, g).await? else {
                members.insert(g, None);
                continue;
            };
            let rows = sqlx::query("SELECT user_id FROM group_members WHERE group_id = ? LIMIT ?")
                .bind(group_param(g))
                .bind(limit)
                .fetch_all(&mut **tx)
                .await?;
            let mut list = rows
                .iter()
                .map(|r| col::<i64>(r, "user_id"))
                .collect::<Result<Vec<_>, _>>()?;
            list.sort_unstable();
            let large = list.len() > threshold;
            if large {
                timelines.insert(g, timeline);
            }
            members.insert(g, Some((large, if large { Vec::new() } else { list })));
        }

        let mut plans = Vec::with_capacity(msgs.len());
        for m in msgs {
            let sender = user_param(m.sender);
            let plan = match m.target {
                Target::User(to) => {
                    if missing.contains(&m.sender) {
                        Plan::Refused(StoreError::UnknownUser(m.sender.0))
                    } else if missing.contains(&to) {
                        Plan::Refused(StoreError::UnknownUser(to.0))
                    } else {
                        let mut users = vec![sender, user_param(to)];
                        users.sort_unstable();
                        users.dedup();
                        Plan::Inboxes(users)
                    }
                }
                Target::Group(g) => match members.get(&g) {
                    Some(Some((false, list))) => {
                        if list.binary_search(&sender).is_ok() {
                            Plan::Inboxes(list.clone())
                        } else {
                            Plan::Refused(StoreError::NotMember(g))
                        }
                    }
                    Some(Some((true, _))) => {
                        let member = sqlx::query(
                            "SELECT user_id FROM group_members WHERE group_id = ? AND user_id = ?",
                        )
                        .bind(group_param(g))
                        .bind(sender)
                        .fetch_optional(&mut **tx)
                        .await?;
                        if member.is_some() {
                            Plan::Timeline(g)
                        } else {
                            Plan::Refused(StoreError::NotMember(g))
                        }
                    }
                    _ => Plan::Refused(StoreError::UnknownGroup(g)),
                },
            };
            plans.push(plan);
        }
        Ok((plans, timelines))
    }

    /// Inserts the messages at `idx` and returns every message's id by its
    /// index in `msgs` (0 for those not inserted). Ids are matched by the
    /// unique `(sender, req)`: the ids one multi-row insert generates are
    /// not consecutive on every configuration (Galera's interleaved
    /// auto-increment). The insert returns them where the server has
    /// `RETURNING` (SQLite, MariaDB); on MySQL they are read back.
    async fn insert_messages(
        &self,
        tx: &mut Tx,
        msgs: &[NewMessage<'_>],
        idx: &[usize],
    ) -> Result<Vec<i64>, StoreError> {
        let mut ids = vec![0_i64; msgs.len()];
        let returning = self.db.returning();
        for chunk in idx.chunks(MESSAGE_CHUNK) {
            let sql = format!(
                "INSERT INTO messages (sender, req, ope, target, kind, body, ex, ts) VALUES {}{}",
                rows(chunk.len(), 8),
                if returning {
                    " RETURNING id, sender, req"
                } else {
                    ""
                }
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for &i in chunk {
                let m = &msgs[i];
                let (ope, target) = match m.target {
                    Target::User(u) => (OPE_USER, user_param(u)),
                    Target::Group(g) => (OPE_GROUP, group_param(g)),
                };
                query = query
                    .bind(user_param(m.sender))
                    .bind(m.req)
                    .bind(ope)
                    .bind(target)
                    .bind(m.kind)
                    .bind(m.body)
                    .bind(m.ex)
                    .bind(m.ts_ms);
            }
            if returning {
                let rows = query.fetch_all(&mut **tx).await?;
                set_ids(&mut ids, msgs, chunk, &rows)?;
            } else {
                query.execute(&mut **tx).await?;
            }
        }
        if returning {
            return Ok(ids);
        }
        for chunk in idx.chunks(PAIR_CHUNK) {
            let cond = vec!["(sender = ? AND req = ?)"; chunk.len()].join(" OR ");
            let sql = format!("SELECT id, sender, req FROM messages WHERE {cond}");
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for &i in chunk {
                query = query.bind(user_param(msgs[i].sender)).bind(msgs[i].req);
            }
            let rows = query.fetch_all(&mut **tx).await?;
            set_ids(&mut ids, msgs, chunk, &rows)?;
        }
        Ok(ids)
    }
}

/// The indexes of `msgs` whose `(sender, req)` comes first in the batch,
/// and those repeating an earlier one.
fn firsts(msgs: &[NewMessage<'_>]) -> (Vec<usize>, Vec<usize>) {
    let mut first: HashSet<(UserId, &str)> = HashSet::with_capacity(msgs.len());
    let mut fresh = Vec::with_capacity(msgs.len());
    let mut repeats = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        if first.insert((m.sender, m.req)) {
            fresh.push(i);
        } else {
            repeats.push(i);
        }
    }
    (fresh, repeats)
}

/// `ids[i]` for each `i` of `chunk`, from `rows` of `(id, sender, req)`.
fn set_ids(
    ids: &mut [i64],
    msgs: &[NewMessage<'_>],
    chunk: &[usize],
    rows: &[AnyRow],
) -> Result<(), StoreError> {
    let mut by_key: HashMap<(i64, String), i64> = HashMap::with_capacity(chunk.len());
    for row in rows {
        by_key.insert((col(row, "sender")?, col(row, "req")?), col(row, "id")?);
    }
    for &i in chunk {
        let key = (user_param(msgs[i].sender), msgs[i].req.to_owned());
        ids[i] = *by_key
            .get(&key)
            .ok_or_else(|| bad_row("inserted message not found by (sender, req)"))?;
    }
    Ok(())
}

fn stored(m: &NewMessage<'_>, id: i64) -> Result<StoredMessage, StoreError> {
    Ok(super::messages::stored(m, id)?)
}
