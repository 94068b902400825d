//! Chat store and directory integration tests. Every test body runs against
//! SQLite (a file in a temporary directory) and against MySQL/MariaDB when
//! `IIM_TEST_MYSQL_URL` names a server (no database: each run creates
//! `iim_t_<random>` and drops it). With `CI=true` a missing
//! `IIM_TEST_MYSQL_URL` fails the MySQL half.
//!
//! The concurrency tests open one `Registry` per task: separate pools, as
//! separate app servers would have.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;

use anyhow::{Context, bail, ensure};
use iim::registry::Registry;
use iim::store::{
    Delivery, Group, GroupSummary, NewMessage, Store, StoreError, StoredMessage, Target, User,
};
use iim::types::{ChannelId, ServerId, Session, UserId};
use sqlx::{AssertSqlSafe, Connection, Executor};

/// What a test body gets: a store, and the url it was opened with (to open
/// more handles or poke at the tables directly).
struct Ctx {
    store: Store,
    url: String,
}

/// Runs `body` once per available backend (see `common`).
async fn each_backend<F, Fut>(body: F)
where
    F: Fn(Ctx) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    common::each_backend(|reg, url| {
        body(Ctx {
            store: Store::new(&reg),
            url,
        })
    })
    .await
}

const T0: i64 = 1_700_000_000_000;

fn user(id: u64, name: &str, org: &str) -> User {
    User {
        id: UserId(id),
        name: name.to_owned(),
        org: org.to_owned(),
    }
}

/// Users `ids`, named `u<id>`, all in `org`.
async fn add_users(
    store: &Store,
    ids: impl IntoIterator<Item = u64>,
    org: &str,
) -> anyhow::Result<()> {
    let users: Vec<User> = ids
        .into_iter()
        .map(|id| user(id, &format!("u{id}"), org))
        .collect();
    store.add_users(&users).await?;
    Ok(())
}

fn msg<'a>(sender: u64, req: &'a str, target: Target, body: &'a str) -> NewMessage<'a> {
    NewMessage {
        sender: UserId(sender),
        req,
        target,
        kind: "text",
        body,
        ex: None,
        ts_ms: T0,
    }
}

fn to_user(id: u64) -> Target {
    Target::User(UserId(id))
}

async fn send(store: &Store, sender: u64, req: &str, target: Target) -> anyhow::Result<Delivery> {
    let body = format!(r#"{{"text":"{req}"}}"#);
    Ok(store
        .store_message(&msg(sender, req, target, &body), 10)
        .await?)
}

/// Message ids of the user's whole inbox, checking the sequence is exactly
/// 1..=n and agrees with `max`.
async fn whole_inbox(store: &Store, u: u64) -> anyhow::Result<Vec<StoredMessage>> {
    let page = store.inbox_since(UserId(u), 0, 100_000).await?;
    let seqs: Vec<u64> = page.items.iter().map(|(s, _)| *s).collect();
    let want: Vec<u64> = (1..=seqs.len() as u64).collect();
    ensure!(seqs == want, "user {u}: inbox sequences {seqs:?}");
    ensure!(
        page.max == seqs.len() as u64,
        "user {u}: max {} for {} items",
        page.max,
        seqs.len()
    );
    Ok(page.items.into_iter().map(|(_, m)| m).collect())
}

async fn store_at(url: &str) -> anyhow::Result<Store> {
    let reg = Registry::connect(url).await?;
    Ok(Store::new(&reg))
}

async fn raw_execute(url: &str, sql: &str) -> anyhow::Result<()> {
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url).await?;
    conn.execute(AssertSqlSafe(sql.to_owned())).await?;
    conn.close().await?;
    Ok(())
}

#[tokio::test]
async fn directory_round_trips() {
    each_backend(|Ctx { store, .. }| async move {
        ensure!(store.users().await?.is_empty());
        ensure!(store.user(UserId(1)).await?.is_none());
        let big = u64::MAX - 1;
        store.add_user(&user(big, "Big", "acme")).await?;
        store.add_user(&user(2, "Bob", "acme")).await?;
        store.add_user(&user(1, "Alice", "acme")).await?;
        ensure!(store.user(UserId(1)).await? == Some(user(1, "Alice", "acme")));
        // Upsert: name and org change, nothing is duplicated.
        store.add_user(&user(1, "Alice B.", "globex")).await?;
        ensure!(store.user(UserId(1)).await? == Some(user(1, "Alice B.", "globex")));
        // Ids above i64::MAX keep their bits and sort as u64.
        let ids: Vec<u64> = store.users().await?.iter().map(|u| u.id.0).collect();
        ensure!(ids == vec![1, 2, big], "{ids:?}");
        ensure!(store.user(UserId(big)).await? == Some(user(big, "Big", "acme")));

        // 128 characters (not bytes) fit in a name, 129 do not, anywhere.
        let long = "é".repeat(128);
        store.add_user(&user(3, &long, "acme")).await?;
        ensure!(store.user(UserId(3)).await?.context("user 3")?.name == long);
        let res = store.add_user(&user(4, &"x".repeat(129), "acme")).await;
        ensure!(matches!(res, Err(StoreError::Database(_))), "{res:?}");
        ensure!(store.user(UserId(4)).await?.is_none());
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn friendships_both_ways_and_colleagues_by_org() {
    each_backend(|Ctx { store, .. }| async move {
        store
            .add_users(&[
                user(1001, "Alice", "acme"),
                user(1002, "Bob", "acme"),
                user(2002, "Dave", "acme"),
                user(3001, "Erin", "globex"),
                user(u64::MAX, "Max", "acme"),
            ])
            .await?;
        store.add_friendship(UserId(1001), UserId(3001)).await?;
        store.add_friendship(UserId(3001), UserId(1001)).await?;
        store.add_friendship(UserId(1001), UserId(3001)).await?;
        store.add_friendship(UserId(u64::MAX), UserId(3001)).await?;
        ensure!(store.friends_of(UserId(1001)).await? == vec![UserId(3001)]);
        ensure!(store.friends_of(UserId(3001)).await? == vec![UserId(1001), UserId(u64::MAX)]);
        ensure!(store.friends_of(UserId(1002)).await?.is_empty());
        ensure!(store.friends_of(UserId(9)).await?.is_empty());

        let res = store.add_friendship(UserId(1001), UserId(9)).await;
        ensure!(matches!(res, Err(StoreError::UnknownUser(9))), "{res:?}");
        let res = store.add_friendship(UserId(8), UserId(1001)).await;
        ensure!(matches!(res, Err(StoreError::UnknownUser(8))), "{res:?}");
        ensure!(store.friends_of(UserId(1001)).await? == vec![UserId(3001)]);

        let acme = store.colleagues_of(UserId(1002)).await?;
        ensure!(
            acme == vec![UserId(1001), UserId(2002), UserId(u64::MAX)],
            "{acme:?}"
        );
        ensure!(store.colleagues_of(UserId(3001)).await?.is_empty());
        ensure!(store.colleagues_of(UserId(9)).await?.is_empty());
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn groups_and_membership() {
    each_backend(|Ctx { store, .. }| async move {
        add_users(&store, [1, 2, 3, 4], "acme").await?;
        let g = store
            .create_group("team", &[UserId(3), UserId(1), UserId(3), UserId(2)])
            .await?;
        let want = Group {
            id: g,
            name: "team".to_owned(),
            members: vec![UserId(1), UserId(2), UserId(3)],
        };
        ensure!(store.group(g).await? == Some(want));
        ensure!(store.group(g + 100).await?.is_none());

        store.add_member(g, UserId(4)).await?;
        store.add_member(g, UserId(4)).await?;
        ensure!(store.group(g).await?.context("group")?.members.len() == 4);
        ensure!(store.remove_member(g, UserId(2)).await?);
        ensure!(!store.remove_member(g, UserId(2)).await?);
        let members = store.group(g).await?.context("group")?.members;
        ensure!(
            members == vec![UserId(1), UserId(3), UserId(4)],
            "{members:?}"
        );

        let res = store.add_member(g, UserId(99)).await;
        ensure!(matches!(res, Err(StoreError::UnknownUser(99))), "{res:?}");
        let res = store.add_member(g + 100, UserId(1)).await;
        ensure!(
            matches!(res, Err(StoreError::UnknownGroup(x)) if x == g + 100),
            "{res:?}"
        );
        let res = store.remove_member(g + 100, UserId(1)).await;
        ensure!(matches!(res, Err(StoreError::UnknownGroup(_))), "{res:?}");
        // A group with an unknown member is not created at all.
        let res = store.create_group("bad", &[UserId(1), UserId(77)]).await;
        ensure!(matches!(res, Err(StoreError::UnknownUser(77))), "{res:?}");

        let h = store.create_group("pair", &[UserId(1), UserId(2)]).await?;
        ensure!(h > g);
        let summary = |id, name: &str, members| GroupSummary {
            id,
            name: name.to_owned(),
            members,
            timeline_max: 0,
        };
        ensure!(
            store.groups_of(UserId(1)).await? == vec![summary(g, "team", 3), summary(h, "pair", 2)]
        );
        ensure!(store.groups_of(UserId(2)).await? == vec![summary(h, "pair", 2)]);
        ensure!(store.groups_of(UserId(9)).await?.is_empty());
        ensure!(store.groups().await? == vec![summary(g, "team", 3), summary(h, "pair", 2)]);
        Ok(())
    })
    .await;
}

/// A large group's push asks for its members' sessions in one join: the
/// same sessions `user_list` gives for the members, nobody else's.
#[tokio::test]
async fn a_groups_sessions_are_those_of_its_members_online() {
    each_backend(|Ctx { store, url }| async move {
        let reg = Registry::connect(&url).await?;
        add_users(&store, [1, 2, 3, 4, 5], "acme").await?;
        let g = store
            .create_group("team", &[UserId(1), UserId(2), UserId(3)])
            .await?;
        let other = store.create_group("other", &[UserId(4), UserId(5)]).await?;
        ensure!(store.group_sessions(g).await?.is_empty());
        let s = |server, user, channel, device: &str| Session {
            server: ServerId(server),
            user: UserId(user),
            channel: ChannelId(channel),
            device: device.to_owned(),
        };
        // Member 1 on two servers, member 3 on one, member 2 offline; 4 is
        // online but not a member.
        for x in [
            s(2, 1, 10, "phone"),
            s(1, 1, 11, "desk"),
            s(1, 3, 12, "phone"),
            s(1, 4, 13, "phone"),
        ] {
            reg.add_session(&x, 1, T0).await?;
        }
        let got = store.group_sessions(g).await?;
        let members = [UserId(1), UserId(2), UserId(3)];
        ensure!(got == reg.sessions_of(&members).await?, "{got:?}");
        ensure!(
            got == vec![
                s(1, 1, 11, "desk"),
                s(1, 3, 12, "phone"),
                s(2, 1, 10, "phone")
            ],
            "{got:?}"
        );
        ensure!(store.group_sessions(other).await? == vec![s(1, 4, 13, "phone")]);
        ensure!(store.group_sessions(g + 100).await?.is_empty());
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn one_to_one_writes_both_inboxes_with_consecutive_seqs() {
    each_backend(|Ctx { store, .. }| async move {
        add_users(&store, [1, 2], "acme").await?;
        let body = r#"{"text": "héllo", "n": [1, 2.50]}"#;
        let mut m = msg(1, "r1", to_user(2), body);
        m.ex = Some(r#"{"reply_to": 7}"#);
        let d = store.store_message(&m, 10).await?;
        ensure!(
            !d.duplicate && d.gseq.is_none() && d.sender_seq == Some(1),
            "{d:?}"
        );
        ensure!(d.inbox == vec![(UserId(1), 1), (UserId(2), 1)], "{d:?}");
        let stored = &d.message;
        ensure!(stored.sender == UserId(1) && stored.req == "r1" && stored.target == to_user(2));
        ensure!(stored.body == body && stored.kind == "text" && stored.ts_ms == T0);
        ensure!(stored.ex.as_deref() == Some(r#"{"reply_to": 7}"#));

        let d2 = send(&store, 1, "r2", to_user(2)).await?;
        ensure!(d2.inbox == vec![(UserId(1), 2), (UserId(2), 2)] && d2.message.id > stored.id);
        let d3 = send(&store, 2, "r1", to_user(1)).await?;
        ensure!(d3.sender_seq == Some(3) && d3.inbox == vec![(UserId(1), 3), (UserId(2), 3)]);
        // To oneself: one inbox entry.
        let d4 = send(&store, 1, "note", to_user(1)).await?;
        ensure!(
            d4.sender_seq == Some(4) && d4.inbox == vec![(UserId(1), 4)],
            "{d4:?}"
        );

        let inbox1 = whole_inbox(&store, 1).await?;
        ensure!(inbox1.len() == 4 && inbox1[0] == d.message, "{inbox1:?}");
        let ids: Vec<u64> = inbox1.iter().map(|m| m.id).collect();
        ensure!(ids == vec![d.message.id, d2.message.id, d3.message.id, d4.message.id]);
        let inbox2 = whole_inbox(&store, 2).await?;
        ensure!(inbox2 == vec![d.message, d2.message, d3.message]);
        ensure!(store.inbox_max(UserId(1)).await? == 4 && store.inbox_max(UserId(2)).await? == 3);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn idempotent_resend_returns_the_original_allocation() {
    each_backend(|Ctx { store, .. }| async move {
        add_users(&store, [1, 2, 3], "acme").await?;
        let first = send(&store, 1, "same", to_user(2)).await?;
        send(&store, 3, "other", to_user(2)).await?;
        // A resend, even with another body or target, is the original.
        let again = store
            .store_message(&msg(1, "same", to_user(3), "{}"), 10)
            .await?;
        ensure!(again.duplicate, "{again:?}");
        ensure!(
            Delivery {
                duplicate: false,
                ..again.clone()
            } == first,
            "{again:?} vs {first:?}"
        );
        ensure!(store.inbox_max(UserId(2)).await? == 2 && store.inbox_max(UserId(3)).await? == 1);
        // The same req from another sender is another message.
        let d = send(&store, 2, "same", to_user(1)).await?;
        ensure!(!d.duplicate && d.message.id != first.message.id);

        // Group: a resend is answered even after the sender left the group.
        let g = store
            .create_group("g", &[UserId(1), UserId(2), UserId(3)])
            .await?;
        let gm = send(&store, 3, "g1", Target::Group(g)).await?;
        ensure!(store.remove_member(g, UserId(3)).await?);
        let again = send(&store, 3, "g1", Target::Group(g)).await?;
        ensure!(again.duplicate && again.inbox == gm.inbox && again.sender_seq == gm.sender_seq);
        let res = send(&store, 3, "g2", Target::Group(g)).await;
        ensure!(
            matches!(res.as_ref().map_err(|e| e.downcast_ref::<StoreError>()), Err(Some(StoreError::NotMember(x))) if *x == g),
            "{res:?}"
        );

        // Large group: the duplicate reports the timeline sequence.
        let big = store
            .create_group("big", &[UserId(1), UserId(2), UserId(3)])
            .await?;
        let t1 = store
            .store_message(&msg(1, "t1", Target::Group(big), "{}"), 2)
            .await?;
        let t1b = store
            .store_message(&msg(1, "t1", Target::Group(big), "{}"), 2)
            .await?;
        ensure!(t1.gseq == Some(1) && t1b.gseq == Some(1) && t1b.duplicate && t1b.inbox.is_empty());
        ensure!(store.timeline_max(big).await? == 1);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn small_group_write_fan_out_gives_every_member_one_entry() {
    each_backend(|Ctx { store, .. }| async move {
        add_users(&store, [1, 2, 3, 4, 5], "acme").await?;
        send(&store, 1, "warm-up", to_user(2)).await?;
        let members = [UserId(1), UserId(2), UserId(3), UserId(4)];
        let g = store.create_group("team", &members).await?;
        let d = store
            .store_message(&msg(3, "hello", Target::Group(g), r#"{"t":1}"#), 4)
            .await?;
        ensure!(d.gseq.is_none() && d.sender_seq == Some(1), "{d:?}");
        let want = vec![
            (UserId(1), 2),
            (UserId(2), 2),
            (UserId(3), 1),
            (UserId(4), 1),
        ];
        ensure!(d.inbox == want, "{d:?}");
        ensure!(d.message.target == Target::Group(g));
        for u in [1, 2, 3, 4] {
            let inbox = whole_inbox(&store, u).await?;
            let last = inbox.last().context("entry")?;
            ensure!(*last == d.message, "user {u}: {last:?}");
        }
        ensure!(store.inbox_max(UserId(5)).await? == 0);
        ensure!(store.timeline_max(g).await? == 0);
        ensure!(store.timeline_since(g, 0, 10).await?.items.is_empty());
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn large_group_uses_the_timeline() {
    each_backend(|Ctx { store, .. }| async move {
        add_users(&store, [1, 2, 3, 4, 5], "acme").await?;
        let members = [UserId(1), UserId(2), UserId(3), UserId(4)];
        let g = store.create_group("town-hall", &members).await?;
        let mut sent = Vec::new();
        for (i, sender) in [1, 4, 1].into_iter().enumerate() {
            let req = format!("m{i}");
            let d = store
                .store_message(&msg(sender, &req, Target::Group(g), "{}"), 3)
                .await?;
            ensure!(d.gseq == Some(i as u64 + 1) && d.sender_seq.is_none() && d.inbox.is_empty());
            sent.push(d.message);
        }
        for u in 1..=4 {
            ensure!(
                store.inbox_max(UserId(u)).await? == 0,
                "user {u} got an inbox entry"
            );
        }
        let page = store.timeline_since(g, 0, 2).await?;
        ensure!(page.max == 3);
        ensure!(page.items == vec![(1, sent[0].clone()), (2, sent[1].clone())]);
        let page = store.timeline_since(g, 2, 10).await?;
        ensure!(page.items == vec![(3, sent[2].clone())] && page.max == 3);
        ensure!(store.timeline_since(g, 3, 10).await?.items.is_empty());
        ensure!(store.groups_of(UserId(4)).await?[0].timeline_max == 3);
        // The same group under a larger threshold fans out to inboxes.
        let d = store
            .store_message(&msg(2, "small", Target::Group(g), "{}"), 4)
            .await?;
        ensure!(d.gseq.is_none() && d.inbox.len() == 4 && store.timeline_max(g).await? == 3);

        // Membership is checked for large groups too, without a gap.
        let res = store
            .store_message(&msg(5, "outsider", Target::Group(g), "{}"), 3)
            .await;
        ensure!(
            matches!(res, Err(StoreError::NotMember(x)) if x == g),
            "{res:?}"
        );
        let d = store
            .store_message(&msg(3, "after", Target::Group(g), "{}"), 3)
            .await?;
        ensure!(d.gseq == Some(4), "{d:?}");

        let res = store.timeline_since(g + 1, 0, 10).await;
        ensure!(matches!(res, Err(StoreError::UnknownGroup(_))), "{res:?}");
        let res = store.timeline_max(g + 1).await;
        ensure!(matches!(res, Err(StoreError::UnknownGroup(_))), "{res:?}");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn refused_and_failed_sends_leave_no_gap() {
    each_backend(|Ctx { store, .. }| async move {
        add_users(&store, [1, 2, 3], "acme").await?;
        let g = store.create_group("g", &[UserId(1), UserId(2)]).await?;
        send(&store, 1, "a", to_user(2)).await?;

        let err = |r: Result<Delivery, StoreError>| match r {
            Err(e) => Ok(e),
            Ok(d) => bail!("expected an error, got {d:?}"),
        };
        let e = err(store
            .store_message(&msg(1, "b", to_user(9), "{}"), 10)
            .await)?;
        ensure!(matches!(e, StoreError::UnknownUser(9)), "{e:?}");
        let e = err(store
            .store_message(&msg(9, "b", to_user(1), "{}"), 10)
            .await)?;
        ensure!(matches!(e, StoreError::UnknownUser(9)), "{e:?}");
        let e = err(store
            .store_message(&msg(3, "b", Target::Group(g), "{}"), 10)
            .await)?;
        ensure!(matches!(e, StoreError::NotMember(x) if x == g), "{e:?}");
        let e = err(store
            .store_message(&msg(1, "b", Target::Group(g + 9), "{}"), 10)
            .await)?;
        ensure!(
            matches!(e, StoreError::UnknownGroup(x) if x == g + 9),
            "{e:?}"
        );
        ensure!(e.to_string() == format!("unknown group {}", g + 9));
        // Fails inside the transaction, after the sequences were locked.
        let mut m = msg(1, "b", to_user(2), "{}");
        let kind = "k".repeat(33);
        m.kind = &kind;
        let e = err(store.store_message(&m, 10).await)?;
        ensure!(matches!(e, StoreError::Database(_)), "{e:?}");
        let mut m = msg(1, "b", Target::Group(g), "{}");
        let req = "r".repeat(65);
        m.req = &req;
        let e = err(store.store_message(&m, 10).await)?;
        ensure!(matches!(e, StoreError::Database(_)), "{e:?}");

        // "b" was never stored: it goes through now, with the next seqs.
        let d = send(&store, 1, "b", to_user(2)).await?;
        ensure!(
            !d.duplicate && d.inbox == vec![(UserId(1), 2), (UserId(2), 2)],
            "{d:?}"
        );
        whole_inbox(&store, 1).await?;
        whole_inbox(&store, 2).await?;
        ensure!(store.inbox_max(UserId(3)).await? == 0);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn inbox_since_pages() {
    each_backend(|Ctx { store, .. }| async move {
        add_users(&store, [1, 2], "acme").await?;
        for i in 0..10 {
            send(&store, 1, &format!("m{i}"), to_user(2)).await?;
        }
        let u = UserId(2);
        let page = store.inbox_since(u, 0, 3).await?;
        let seqs: Vec<u64> = page.items.iter().map(|(s, _)| *s).collect();
        ensure!(
            seqs == vec![1, 2, 3] && page.max == 10,
            "{seqs:?} {}",
            page.max
        );
        ensure!(page.items[0].1.req == "m0" && page.items[2].1.req == "m2");
        let page = store.inbox_since(u, 8, 5).await?;
        let seqs: Vec<u64> = page.items.iter().map(|(s, _)| *s).collect();
        ensure!(seqs == vec![9, 10] && page.max == 10);
        for since in [10, 11, 1000, u64::MAX] {
            let page = store.inbox_since(u, since, 5).await?;
            ensure!(page.items.is_empty() && page.max == 10, "since {since}");
        }
        let page = store.inbox_since(u, 0, 0).await?;
        ensure!(page.items.is_empty() && page.max == 10);
        // Sync loop: pull from the highest seq held until caught up.
        let (mut have, mut got) = (0, Vec::new());
        loop {
            let page = store.inbox_since(u, have, 4).await?;
            let Some(&(last, _)) = page.items.last() else {
                break;
            };
            got.extend(page.items.into_iter().map(|(s, _)| s));
            have = last;
        }
        ensure!(got == (1..=10).collect::<Vec<_>>());

        let page = store.inbox_since(UserId(77), 0, 10).await?;
        ensure!(page.items.is_empty() && page.max == 0);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn write_fan_out_to_500_members_and_users_without_a_seq_row() {
    each_backend(|Ctx { store, url }| async move {
        add_users(&store, 10_000..10_500, "bigcorp").await?;
        // A user written by another tool has no user_seq row yet.
        raw_execute(
            &url,
            "INSERT INTO users (id, name, org, created_at) VALUES (-5, 'raw', 'bigcorp', 0)",
        )
        .await?;
        let mut members: Vec<UserId> = (10_000..10_499).map(UserId).collect();
        members.push(UserId(u64::MAX - 4));
        let g = store.create_group("all", &members).await?;
        let started = std::time::Instant::now();
        let d = store
            .store_message(&msg(10_007, "x", Target::Group(g), "{}"), 500)
            .await?;
        let took = started.elapsed();
        ensure!(
            d.inbox.len() == 500 && d.inbox.iter().all(|&(_, s)| s == 1),
            "{:?}",
            &d.inbox[..3]
        );
        ensure!(d.inbox.windows(2).all(|w| w[0].0 < w[1].0));
        ensure!(d.inbox.last() == Some(&(UserId(u64::MAX - 4), 1)));
        let d = store
            .store_message(&msg(10_008, "y", Target::Group(g), "{}"), 500)
            .await?;
        ensure!(d.inbox.iter().all(|&(_, s)| s == 2) && d.sender_seq == Some(2));
        ensure!(store.inbox_max(UserId(u64::MAX - 4)).await? == 2);
        ensure!(store.inbox_max(UserId(10_499)).await? == 0);
        eprintln!("500-member write fan-out: {took:?}");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_bad_row_is_an_error_not_a_panic() {
    each_backend(|Ctx { store, url }| async move {
        add_users(&store, [1], "acme").await?;
        raw_execute(&url, "UPDATE user_seq SET last_seq = -3 WHERE user_id = 1").await?;
        match store.inbox_max(UserId(1)).await {
            Err(StoreError::BadRow { what }) => ensure!(what.contains("negative"), "{what}"),
            other => bail!("expected a bad row, got {other:?}"),
        }
        let res = send(&store, 1, "x", to_user(1)).await;
        ensure!(
            matches!(
                res.as_ref().map_err(|e| e.downcast_ref::<StoreError>()),
                Err(Some(StoreError::BadRow { .. }))
            ),
            "{res:?}"
        );
        Ok(())
    })
    .await;
}

/// (a) Eight app servers (own pools) send 50 messages each, from eight
/// senders, into one inbox: exactly 1..=400, each sender in send order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_senders_into_one_inbox_from_separate_pools() {
    each_backend(|Ctx { store, url }| async move {
        const TASKS: u64 = 8;
        const EACH: u64 = 50;
        add_users(&store, [1], "acme").await?;
        add_users(&store, 101..101 + TASKS, "acme").await?;
        let started = std::time::Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let url = url.clone();
                tokio::spawn(async move {
                    let store = store_at(&url).await?;
                    let sender = 101 + t;
                    for k in 0..EACH {
                        let d = send(&store, sender, &format!("{k}"), to_user(1)).await?;
                        ensure!(d.sender_seq == Some(k + 1), "sender {sender}: {d:?}");
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        eprintln!(
            "{} messages from {TASKS} pools: {:?}",
            TASKS * EACH,
            started.elapsed()
        );
        let inbox = whole_inbox(&store, 1).await?;
        ensure!(inbox.len() == (TASKS * EACH) as usize);
        let mut ids: Vec<u64> = inbox.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        ids.dedup();
        ensure!(ids.len() == inbox.len(), "a message appears twice");
        let mut per_sender: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for m in &inbox {
            per_sender
                .entry(m.sender.0)
                .or_default()
                .push(m.req.parse()?);
        }
        ensure!(per_sender.len() == TASKS as usize);
        for (sender, reqs) in per_sender {
            ensure!(
                reqs == (0..EACH).collect::<Vec<_>>(),
                "sender {sender}: {reqs:?}"
            );
        }
        Ok(())
    })
    .await;
}

/// (b) Four senders on separate pools, 25 messages each, into one small
/// group of six: every member sees the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_group_senders_give_every_member_the_same_order() {
    each_backend(|Ctx { store, url }| async move {
        add_users(&store, 1..=6, "acme").await?;
        let members: Vec<UserId> = (1..=6).map(UserId).collect();
        let g = store.create_group("six", &members).await?;
        // Some 1:1 traffic interleaves with the group's in the inboxes.
        send(&store, 5, "before", to_user(6)).await?;
        let tasks: Vec<_> = (1..=4u64)
            .map(|sender| {
                let url = url.clone();
                tokio::spawn(async move {
                    let store = store_at(&url).await?;
                    for k in 0..25 {
                        send(&store, sender, &format!("g{k}"), Target::Group(g)).await?;
                        if k % 5 == 0 {
                            send(&store, sender, &format!("p{k}"), to_user(5 + sender % 2)).await?;
                        }
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        let mut orders = HashMap::new();
        for u in 1..=6 {
            let order: Vec<u64> = whole_inbox(&store, u)
                .await?
                .into_iter()
                .filter(|m| m.target == Target::Group(g))
                .map(|m| m.id)
                .collect();
            ensure!(
                order.len() == 100,
                "user {u}: {} group messages",
                order.len()
            );
            orders.insert(u, order);
        }
        for u in 2..=6 {
            ensure!(
                orders[&u] == orders[&1],
                "user {u} sees another order than user 1"
            );
        }
        Ok(())
    })
    .await;
}

/// (c) Four tasks race the same (sender, req): one stores, all agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_resends_store_once() {
    each_backend(|Ctx { store, url }| async move {
        add_users(&store, [1, 2, 3], "acme").await?;
        let g = store
            .create_group("g", &[UserId(1), UserId(2), UserId(3)])
            .await?;
        let stores = {
            let mut v = Vec::new();
            for _ in 0..4 {
                v.push(store_at(&url).await?);
            }
            v
        };
        for round in 0..6u64 {
            let target = if round % 2 == 0 {
                to_user(2)
            } else {
                Target::Group(g)
            };
            let req = format!("race-{round}");
            let tasks: Vec<_> = stores
                .iter()
                .cloned()
                .map(|s| {
                    let req = req.clone();
                    tokio::spawn(async move { send(&s, 1, &req, target).await })
                })
                .collect();
            let mut out = Vec::new();
            for task in tasks {
                out.push(task.await??);
            }
            let fresh = out.iter().filter(|d| !d.duplicate).count();
            ensure!(fresh == 1, "round {round}: {fresh} stored");
            let first = Delivery {
                duplicate: false,
                ..out[0].clone()
            };
            for d in &out {
                let d = Delivery {
                    duplicate: false,
                    ..d.clone()
                };
                ensure!(d == first, "round {round}: {d:?} vs {first:?}");
            }
        }
        // Three 1:1 and three group messages, each stored once.
        ensure!(whole_inbox(&store, 1).await?.len() == 6);
        ensure!(whole_inbox(&store, 2).await?.len() == 6);
        ensure!(whole_inbox(&store, 3).await?.len() == 3);
        Ok(())
    })
    .await;
}

/// A batch gives every message what storing it alone would have given:
/// consecutive sequences in batch order, a large group's timeline, the
/// original allocation for a resend (earlier or in the same batch), the
/// same refusals, and no gap left by a refused message.
#[tokio::test]
async fn a_batch_stores_each_message_as_storing_it_alone_would() {
    each_backend(|Ctx { store, .. }| async move {
        add_users(&store, 1..=5, "acme").await?;
        let small = store
            .create_group("small", &[UserId(1), UserId(2), UserId(3)])
            .await?;
        let big = store
            .create_group("big", &[UserId(1), UserId(2), UserId(4), UserId(5)])
            .await?;
        let earlier = send(&store, 1, "earlier", to_user(2)).await?;
        // User 5 has no `user_seq` row until this batch needs one.
        let batch = [
            msg(1, "a", to_user(2), r#"{"n":1}"#),
            msg(2, "b", to_user(1), r#"{"n":2}"#),
            msg(1, "c", to_user(2), r#"{"n":3}"#),
            msg(1, "earlier", to_user(2), r#"{"text":"earlier"}"#),
            msg(9, "unknown sender", to_user(1), "{}"),
            msg(1, "unknown target", to_user(9), "{}"),
            msg(3, "g", Target::Group(small), r#"{"n":4}"#),
            msg(4, "outsider", Target::Group(small), "{}"),
            msg(1, "t", Target::Group(big), r#"{"n":5}"#),
            msg(3, "t", Target::Group(big), "{}"),
            msg(1, "nogroup", Target::Group(999_999), "{}"),
            msg(1, "a", to_user(2), r#"{"n":1}"#),
            msg(5, "self", to_user(5), r#"{"n":6}"#),
            msg(2, "t", Target::Group(big), r#"{"n":7}"#),
        ];
        // Groups of more than three members are large.
        let out = store.store_messages(&batch, 3).await;
        ensure!(out.len() == batch.len());
        // All in one transaction, not message by message.
        ensure!(store.batch_fallbacks() == 0, "the batch fell back");
        let ok = |i: usize| -> anyhow::Result<&Delivery> {
            out[i]
                .as_ref()
                .map_err(|e| anyhow::anyhow!("message {i}: {e}"))
        };
        // 1 → 2 "a": user 1 holds "earlier" at 1, so 2; user 2 the same.
        ensure!(ok(0)?.sender_seq == Some(2) && !ok(0)?.duplicate);
        ensure!(
            ok(0)?.inbox == vec![(UserId(1), 2), (UserId(2), 2)],
            "{:?}",
            ok(0)?
        );
        ensure!(
            ok(1)?.inbox == vec![(UserId(1), 3), (UserId(2), 3)],
            "{:?}",
            ok(1)?
        );
        ensure!(
            ok(2)?.inbox == vec![(UserId(1), 4), (UserId(2), 4)],
            "{:?}",
            ok(2)?
        );
        // A resend of an earlier message: its original allocation.
        let again = ok(3)?;
        ensure!(
            again.duplicate
                && again.inbox == earlier.inbox
                && again.message.id == earlier.message.id,
            "{again:?}"
        );
        ensure!(
            matches!(out[4], Err(StoreError::UnknownUser(9))),
            "{:?}",
            out[4]
        );
        ensure!(
            matches!(out[5], Err(StoreError::UnknownUser(9))),
            "{:?}",
            out[5]
        );
        ensure!(
            ok(6)?.inbox == vec![(UserId(1), 5), (UserId(2), 5), (UserId(3), 1)],
            "{:?}",
            ok(6)?
        );
        ensure!(
            matches!(out[7], Err(StoreError::NotMember(g)) if g == small),
            "{:?}",
            out[7]
        );
        ensure!(
            ok(8)?.gseq == Some(1) && ok(8)?.inbox.is_empty(),
            "{:?}",
            ok(8)?
        );
        ensure!(
            matches!(out[9], Err(StoreError::NotMember(g)) if g == big),
            "{:?}",
            out[9]
        );
        ensure!(
            matches!(out[10], Err(StoreError::UnknownGroup(999_999))),
            "{:?}",
            out[10]
        );
        // The same (sender, req) twice in one batch: one message.
        let twin = ok(11)?;
        ensure!(
            twin.duplicate && twin.message.id == ok(0)?.message.id,
            "{twin:?}"
        );
        ensure!(ok(12)?.inbox == vec![(UserId(5), 1)] && ok(12)?.sender_seq == Some(1));
        ensure!(ok(13)?.gseq == Some(2), "{:?}", ok(13)?);

        // Gap-free inboxes holding exactly what was stored, in batch order.
        let bodies = |ms: Vec<StoredMessage>| ms.into_iter().map(|m| m.body).collect::<Vec<_>>();
        ensure!(
            bodies(whole_inbox(&store, 1).await?)
                == [
                    r#"{"text":"earlier"}"#,
                    r#"{"n":1}"#,
                    r#"{"n":2}"#,
                    r#"{"n":3}"#,
                    r#"{"n":4}"#
                ]
        );
        ensure!(whole_inbox(&store, 2).await? == whole_inbox(&store, 1).await?);
        ensure!(bodies(whole_inbox(&store, 3).await?) == [r#"{"n":4}"#]);
        ensure!(whole_inbox(&store, 4).await?.is_empty());
        ensure!(bodies(whole_inbox(&store, 5).await?) == [r#"{"n":6}"#]);
        let timeline = store.timeline_since(big, 0, 10).await?;
        ensure!(timeline.max == 2 && timeline.items.len() == 2);
        ensure!(
            timeline.items[0].1.body == r#"{"n":5}"# && timeline.items[1].1.body == r#"{"n":7}"#
        );
        // Each stored message is what its sender sent.
        for (i, m) in batch.iter().enumerate() {
            if let Ok(d) = &out[i] {
                ensure!(d.message.sender == m.sender && d.message.req == m.req);
                if !d.duplicate {
                    ensure!(d.message.body == m.body && d.message.target == m.target);
                }
            }
        }
        Ok(())
    })
    .await;
}

/// A batch prepared before the previous one was stored (as the chat writer
/// prepares the next batch while the previous one commits) is stored after
/// it: sequences continue from the previous batch's, and a resend of a
/// message of the previous batch, which the earlier checks could not see,
/// is still answered with the original. On MariaDB the second batch's
/// transaction is open, holding no lock, while the first one runs.
#[tokio::test]
async fn a_batch_prepared_before_the_previous_one_is_stored_after_it() {
    each_backend(|Ctx { store, url }| async move {
        add_users(&store, 1..=3, "acme").await?;
        let first = [
            msg(1, "a", to_user(2), r#"{"n":1}"#),
            msg(2, "b", to_user(1), r#"{"n":2}"#),
        ];
        let second = [
            msg(1, "c", to_user(2), r#"{"n":3}"#),
            msg(1, "a", to_user(2), r#"{"n":1}"#),
            msg(3, "d", to_user(1), r#"{"n":4}"#),
        ];
        let p1 = store.prepare_batch(&first).await;
        let p2 = store.prepare_batch(&second).await;
        // On MariaDB the second batch's transaction stays open while the
        // first is stored; SQLite begins none ahead.
        let mysql = url.starts_with("mysql:");
        ensure!(p1.begun() == mysql && p2.begun() == mysql);
        let committing = std::sync::atomic::AtomicU32::new(0);
        let signal = || {
            committing.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        };
        let out1 = store.store_prepared(&first, p1, 10, &signal).await;
        ensure!(
            committing.load(std::sync::atomic::Ordering::Relaxed) == 1,
            "the first batch did not announce its commit"
        );
        ensure!(store.batch_fallbacks() == 0, "the first batch fell back");
        let out2 = store.store_prepared(&second, p2, 10, &signal).await;
        // The resend of "a", unseen by the early check, failed the second
        // batch on the unique key; each message was then stored alone.
        ensure!(
            store.batch_fallbacks() == 1,
            "the second batch did not fall back"
        );
        let ok = |out: &[Result<Delivery, StoreError>], i: usize| -> anyhow::Result<Delivery> {
            out[i]
                .as_ref()
                .map(Delivery::clone)
                .map_err(|e| anyhow::anyhow!("message {i}: {e}"))
        };
        ensure!(ok(&out1, 0)?.inbox == vec![(UserId(1), 1), (UserId(2), 1)]);
        ensure!(ok(&out1, 1)?.inbox == vec![(UserId(1), 2), (UserId(2), 2)]);
        ensure!(
            ok(&out2, 0)?.inbox == vec![(UserId(1), 3), (UserId(2), 3)],
            "{:?}",
            out2[0]
        );
        let again = ok(&out2, 1)?;
        ensure!(
            again.duplicate && again.message.id == ok(&out1, 0)?.message.id,
            "{again:?}"
        );
        ensure!(
            ok(&out2, 2)?.inbox == vec![(UserId(1), 4), (UserId(3), 1)],
            "{:?}",
            out2[2]
        );
        // Gap-free, in the order of the batches.
        let bodies = |ms: Vec<StoredMessage>| ms.into_iter().map(|m| m.body).collect::<Vec<_>>();
        ensure!(
            bodies(whole_inbox(&store, 1).await?)
                == [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#, r#"{"n":4}"#]
        );
        Ok(())
    })
    .await;
}

/// A value the database refuses fails the batch transaction; every message
/// is then stored on its own and gets what storing it alone gives: the
/// others are stored, gap-free, and only the bad one fails.
#[tokio::test]
async fn a_batch_the_database_refuses_is_stored_message_by_message() {
    each_backend(|Ctx { store, .. }| async move {
        add_users(&store, [1, 2], "acme").await?;
        let long_kind = "k".repeat(40);
        let mut bad = msg(1, "bad", to_user(2), "{}");
        bad.kind = &long_kind;
        let batch = [
            msg(1, "x", to_user(2), "{}"),
            bad,
            msg(2, "y", to_user(1), "{}"),
        ];
        let out = store.store_messages(&batch, 10).await;
        ensure!(store.batch_fallbacks() == 1);
        let alone = store
            .store_message(&msg(1, "z", to_user(2), "{}"), 10)
            .await?;
        ensure!(
            out[0].as_ref().map(|d| d.inbox.clone()).ok()
                == Some(vec![(UserId(1), 1), (UserId(2), 1)]),
            "{:?}",
            out[0]
        );
        // `kind` is at most 32 characters (a CHECK on SQLite, the column's
        // length on strict MariaDB).
        ensure!(
            matches!(out[1], Err(StoreError::Database(_))),
            "{:?}",
            out[1]
        );
        ensure!(
            out[2].as_ref().map(|d| d.sender_seq).ok() == Some(Some(2)),
            "{:?}",
            out[2]
        );
        ensure!(alone.sender_seq == Some(3));
        let n = whole_inbox(&store, 2).await?.len();
        ensure!(whole_inbox(&store, 1).await?.len() == n);
        Ok(())
    })
    .await;
}

/// Batches from four pools at once, each mixing 1:1 messages into one
/// inbox with messages to one group: gap-free inboxes, every member of the
/// group sees one order, every sender's messages in its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_keep_inboxes_gap_free_and_groups_in_one_order() {
    each_backend(|Ctx { store, url }| async move {
        add_users(&store, 1..=8, "acme").await?;
        let members: Vec<UserId> = (2..=8).map(UserId).collect();
        let g = store.create_group("seven", &members).await?;
        let tasks: Vec<_> = (5..=8u64)
            .map(|sender| {
                let url = url.clone();
                tokio::spawn(async move {
                    let store = store_at(&url).await?;
                    for round in 0..10 {
                        let reqs: Vec<String> =
                            (0..6).map(|k| format!("{}", round * 6 + k)).collect();
                        let batch: Vec<NewMessage<'_>> = reqs
                            .iter()
                            .enumerate()
                            .map(|(k, req)| {
                                let target = if k % 2 == 0 {
                                    to_user(1)
                                } else {
                                    Target::Group(g)
                                };
                                msg(sender, req, target, "{}")
                            })
                            .collect();
                        for r in store.store_messages(&batch, 100).await {
                            r?;
                        }
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        let inbox = whole_inbox(&store, 1).await?;
        ensure!(inbox.len() == 4 * 30, "{} messages for user 1", inbox.len());
        let mut group_orders = Vec::new();
        for u in 2..=8 {
            let all = whole_inbox(&store, u).await?;
            let order: Vec<u64> = all
                .iter()
                .filter(|m| m.target == Target::Group(g))
                .map(|m| m.id)
                .collect();
            ensure!(
                order.len() == 4 * 30,
                "user {u}: {} group messages",
                order.len()
            );
            group_orders.push(order);
            // Per sender, in the order sent.
            let mut per_sender: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
            for m in all {
                per_sender
                    .entry(m.sender.0)
                    .or_default()
                    .push(m.req.parse()?);
            }
            for (s, reqs) in per_sender {
                ensure!(
                    reqs.windows(2).all(|w| w[0] < w[1]),
                    "user {u}, sender {s}: {reqs:?}"
                );
            }
        }
        ensure!(
            group_orders.windows(2).all(|w| w[0] == w[1]),
            "members see different orders"
        );
        Ok(())
    })
    .await;
}

/// Read positions: the last message of a conversation at or below a
/// position is found among other conversations' messages; a position only
/// moves forward; the others' positions come back in the asking user's
/// own inbox sequences, 1:1 and groups alike.
#[tokio::test]
async fn read_positions_move_forward_and_translate_between_inboxes() {
    each_backend(|Ctx { store, .. }| async move {
        add_users(&store, [1, 2, 3], "acme").await?;
        let g = store
            .create_group("team", &[UserId(1), UserId(2), UserId(3)])
            .await?;
        // 1's inbox: 1 (3→1), 2 (2→1), 3 (group), 4 (1→2), 5 (3→1).
        send(&store, 3, "a", to_user(1)).await?;
        let d21 = send(&store, 2, "b", to_user(1)).await?;
        let dg = send(&store, 3, "c", Target::Group(g)).await?;
        let d12 = send(&store, 1, "d", to_user(2)).await?;
        send(&store, 3, "e", to_user(1)).await?;
        let me = UserId(1);
        let last = store.last_in_conversation(me, to_user(2), 5).await?;
        ensure!(last == Some((4, d12.message.id)), "{last:?}");
        let last = store.last_in_conversation(me, to_user(2), 3).await?;
        ensure!(last == Some((2, d21.message.id)), "{last:?}");
        let last = store.last_in_conversation(me, to_user(2), 1).await?;
        ensure!(last.is_none(), "{last:?}");
        let last = store.last_in_conversation(me, Target::Group(g), 5).await?;
        ensure!(last == Some((3, dg.message.id)), "{last:?}");
        let rows = store.inbox_rows_of(dg.message.id).await?;
        ensure!(rows.len() == 3 && rows[0] == (UserId(1), 3), "{rows:?}");

        // 2 reads its conversation with 1 up to its inbox seq 2 (message d).
        let (pos, moved) = store
            .mark_read(UserId(2), to_user(1), 2, d12.message.id)
            .await?;
        ensure!(moved && pos.seq == 2, "{pos:?}");
        let (pos, moved) = store
            .mark_read(UserId(2), to_user(1), 1, d21.message.id)
            .await?;
        ensure!(
            !moved && pos.seq == 2 && pos.message_id == d12.message.id,
            "{pos:?}"
        );
        // 3 reads the group.
        store
            .mark_read(UserId(3), Target::Group(g), 1, dg.message.id)
            .await?;
        let mine = store.read_positions(UserId(2)).await?;
        ensure!(
            mine.len() == 1 && mine[0].conversation == to_user(1),
            "{mine:?}"
        );
        let mut theirs = store.others_reads(me, &[g]).await?;
        theirs.sort_by_key(|t| t.reader);
        ensure!(theirs.len() == 2, "{theirs:?}");
        // 2 read message d: in 1's inbox that is seq 4.
        ensure!(
            theirs[0].reader == UserId(2)
                && theirs[0].conversation == to_user(1)
                && theirs[0].seq == 4,
            "{theirs:?}"
        );
        ensure!(
            theirs[1].reader == UserId(3)
                && theirs[1].conversation == Target::Group(g)
                && theirs[1].seq == 3,
            "{theirs:?}"
        );
        // Without the group listed, only 1:1 positions.
        ensure!(store.others_reads(me, &[]).await?.len() == 1);
        Ok(())
    })
    .await;
}

/// Marks racing from separate pools (devices on different app servers):
/// whatever order they commit in, the stored position ends at the highest
/// (a lower mark never overwrites a higher one), and at least the first
/// one says it moved it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_read_marks_keep_the_highest() {
    each_backend(|Ctx { store, url }| async move {
        add_users(&store, [1, 2], "acme").await?;
        let tasks: Vec<_> = (1..=8u64)
            .map(|seq| {
                let url = url.clone();
                tokio::spawn(async move {
                    let store = store_at(&url).await?;
                    let (_, moved) = store.mark_read(UserId(1), to_user(2), seq, seq).await?;
                    anyhow::Ok(moved)
                })
            })
            .collect();
        let mut moved = 0;
        for t in tasks {
            moved += usize::from(t.await??);
        }
        ensure!((1..=8).contains(&moved), "{moved} marks moved it");
        let mine = store.read_positions(UserId(1)).await?;
        ensure!(
            mine.len() == 1 && mine[0].seq == 8 && mine[0].message_id == 8,
            "{mine:?}"
        );
        Ok(())
    })
    .await;
}
