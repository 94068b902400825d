//! `iimctl users | friends | groups | demo-data`: the user directory and the
//! chat groups in the shared database (the tables of `iim::store`).
//!
//! Commands that write open the database as the daemons do (a SQLite file
//! is created if missing); listings refuse a SQLite file that does not
//! exist. Tables are plain text; `--json` prints what scripts should parse.

use std::fmt::Write as _;

use anyhow::Context;
use clap::{Args, Subcommand};
use iim::store::{GroupSummary, Store, User};
use iim::types::UserId;
use serde_json::json;

use crate::{DatabaseArg, open_registry, redact};

/// The demo directory: named users (id, name, org).
const DEMO_USERS: [(u64, &str, &str); 5] = [
    (1001, "Alice", "acme"),
    (1002, "Bob", "acme"),
    (2001, "Carol", "acme"),
    (2002, "Dave", "acme"),
    (3001, "Erin", "globex"),
];
/// Generated members of the large demo group: `user<id>` in org `bigcorp`.
const DEMO_GENERATED: std::ops::Range<u64> = 5000..5600;
const DEMO_FRIENDS: [(u64, u64); 2] = [(1001, 3001), (2001, 3001)];
const DEMO_TEAM: [u64; 3] = [1001, 2001, 3001];

#[derive(Args, Debug)]
pub(crate) struct UsersArgs {
    #[command(subcommand)]
    command: UsersCommand,
}

#[derive(Subcommand, Debug)]
enum UsersCommand {
    /// Add a user, or change the name and org of an existing one.
    Add(UserAddArgs),
    /// List every user, by id.
    List(ListArgs),
}

#[derive(Args, Debug)]
struct UserAddArgs {
    #[command(flatten)]
    db: DatabaseArg,
    #[arg(long, value_name = "ID")]
    id: u64,
    #[arg(long)]
    name: String,
    /// Organisation: users of one org are each other's colleagues.
    #[arg(long)]
    org: String,
}

#[derive(Args, Debug)]
struct ListArgs {
    #[command(flatten)]
    db: DatabaseArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct FriendsArgs {
    #[command(subcommand)]
    command: FriendsCommand,
}

#[derive(Subcommand, Debug)]
enum FriendsCommand {
    /// Make two users friends (both ways; idempotent).
    Add(FriendAddArgs),
    /// List a user's friends.
    List(FriendListArgs),
}

#[derive(Args, Debug)]
struct FriendAddArgs {
    #[command(flatten)]
    db: DatabaseArg,
    #[arg(value_name = "USER")]
    a: u64,
    #[arg(value_name = "FRIEND")]
    b: u64,
}

#[derive(Args, Debug)]
struct FriendListArgs {
    #[command(flatten)]
    db: DatabaseArg,
    #[arg(value_name = "USER")]
    user: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct GroupsArgs {
    #[command(subcommand)]
    command: GroupsCommand,
}

#[derive(Subcommand, Debug)]
enum GroupsCommand {
    /// Create a chat group and print its id.
    Create(GroupCreateArgs),
    /// Add a user to a group (idempotent).
    Add(GroupAddArgs),
    /// List groups with their member count and timeline position.
    List(GroupListArgs),
}

#[derive(Args, Debug)]
struct GroupCreateArgs {
    #[command(flatten)]
    db: DatabaseArg,
    #[arg(long)]
    name: String,
    /// Members (comma-separated user ids).
    #[arg(long, value_delimiter = ',', required = true, value_name = "IDS")]
    members: Vec<u64>,
}

#[derive(Args, Debug)]
struct GroupAddArgs {
    #[command(flatten)]
    db: DatabaseArg,
    #[arg(value_name = "GROUP")]
    group: u64,
    #[arg(value_name = "USER")]
    user: u64,
}

#[derive(Args, Debug)]
struct GroupListArgs {
    #[command(flatten)]
    db: DatabaseArg,
    /// Only the groups this user belongs to.
    #[arg(long, value_name = "ID")]
    user: Option<u64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct DemoDataArgs {
    #[command(flatten)]
    db: DatabaseArg,
}

pub(crate) async fn users(a: UsersArgs) -> anyhow::Result<()> {
    match a.command {
        UsersCommand::Add(a) => {
            let store = open_for_writing(&a.db).await?;
            let user = User {
                id: UserId(a.id),
                name: a.name,
                org: a.org,
            };
            store
                .add_user(&user)
                .await
                .context("cannot save the user")?;
            println!("user {} saved: {} ({})", user.id, user.name, user.org);
        }
        UsersCommand::List(a) => {
            let store = open_for_reading(&a.db).await?;
            let users = store.users().await.context("cannot list users")?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&users_json(&users))?);
            } else {
                print!("{}", users_table(&users));
            }
        }
    }
    Ok(())
}

pub(crate) async fn friends(a: FriendsArgs) -> anyhow::Result<()> {
    match a.command {
        FriendsCommand::Add(a) => {
            let store = open_for_writing(&a.db).await?;
            store
                .add_friendship(UserId(a.a), UserId(a.b))
                .await
                .context("cannot add the friendship")?;
            println!("{} and {} are friends", a.a, a.b);
        }
        FriendsCommand::List(a) => {
            let store = open_for_reading(&a.db).await?;
            let ids = store
                .friends_of(UserId(a.user))
                .await
                .context("cannot list friends")?;
            let users = resolve(&store, &ids).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&users_json(&users))?);
            } else if users.is_empty() {
                println!("user {} has no friends yet", a.user);
            } else {
                print!("{}", users_table(&users));
            }
        }
    }
    Ok(())
}

pub(crate) async fn groups(a: GroupsArgs) -> anyhow::Result<()> {
    match a.command {
        GroupsCommand::Create(a) => {
            let store = open_for_writing(&a.db).await?;
            let members: Vec<UserId> = a.members.iter().map(|&u| UserId(u)).collect();
            let id = store
                .create_group(&a.name, &members)
                .await
                .context("cannot create the group")?;
            // Only the id, so scripts can capture it.
            println!("{id}");
        }
        GroupsCommand::Add(a) => {
            let store = open_for_writing(&a.db).await?;
            store
                .add_member(a.group, UserId(a.user))
                .await
                .context("cannot add the member")?;
            println!("user {} is a member of group {}", a.user, a.group);
        }
        GroupsCommand::List(a) => {
            let store = open_for_reading(&a.db).await?;
            let groups = match a.user {
                Some(u) => store.groups_of(UserId(u)).await,
                None => store.groups().await,
            }
            .context("cannot list groups")?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&groups_json(&groups))?);
            } else {
                print!("{}", groups_table(&groups));
            }
        }
    }
    Ok(())
}

/// Loads the demo directory; running it again changes nothing.
pub(crate) async fn demo_data(a: DemoDataArgs) -> anyhow::Result<()> {
    for line in load_demo_data(&a.db.resolve()?).await? {
        println!("{line}");
    }
    Ok(())
}

/// Loads the demo directory into the database at `url` (as `iimctl
/// demo-data`); returns what it did, one line each.
pub(crate) async fn load_demo_data(url: &str) -> anyhow::Result<Vec<String>> {
    let store = open_for_writing(&DatabaseArg::url(url)).await?;
    let mut out = Vec::new();
    let mut users: Vec<User> = DEMO_USERS
        .iter()
        .map(|&(id, name, org)| User {
            id: UserId(id),
            name: name.to_owned(),
            org: org.to_owned(),
        })
        .collect();
    users.extend(DEMO_GENERATED.map(|id| User {
        id: UserId(id),
        name: format!("user{id}"),
        org: "bigcorp".to_owned(),
    }));
    store.add_users(&users).await.context("cannot save users")?;
    let named: Vec<String> = DEMO_USERS
        .iter()
        .map(|(id, name, org)| format!("{id} {name} ({org})"))
        .collect();
    out.push(format!("users: {}", named.join(", ")));
    out.push(format!(
        "users: {}..{} generated as user<id> (bigcorp)",
        DEMO_GENERATED.start,
        DEMO_GENERATED.end - 1
    ));

    for (a, b) in DEMO_FRIENDS {
        store
            .add_friendship(UserId(a), UserId(b))
            .await
            .context("cannot add a friendship")?;
    }
    let pairs: Vec<String> = DEMO_FRIENDS
        .iter()
        .map(|(a, b)| format!("{a}–{b}"))
        .collect();
    out.push(format!("friendships: {}", pairs.join(", ")));

    let team: Vec<UserId> = DEMO_TEAM.iter().map(|&u| UserId(u)).collect();
    let mut town_hall = team.clone();
    town_hall.extend(DEMO_GENERATED.map(UserId));
    let existing = store.groups().await.context("cannot list groups")?;
    for (name, members) in [("team", team), ("town-hall", town_hall)] {
        if let Some(g) = existing.iter().find(|g| g.name == name) {
            out.push(format!(
                "group {name}: exists already (id {}, {} members), left as it is",
                g.id, g.members
            ));
            continue;
        }
        let id = store
            .create_group(name, &members)
            .await
            .with_context(|| format!("cannot create group {name}"))?;
        out.push(format!(
            "group {name}: created, id {id}, {} members",
            members.len()
        ));
    }
    Ok(out)
}

/// Connects as the daemons do: migrations run, a missing SQLite file is
/// created.
async fn open_for_writing(db: &DatabaseArg) -> anyhow::Result<Store> {
    let url = db.resolve()?;
    let registry = iim::registry::Registry::connect(&url)
        .await
        .with_context(|| format!("cannot open the database {}", redact(&url)))?;
    Ok(Store::new(&registry))
}

async fn open_for_reading(db: &DatabaseArg) -> anyhow::Result<Store> {
    Ok(Store::new(&open_registry(&db.resolve()?).await?))
}

/// The directory rows of `ids`; an id without one is shown nameless.
async fn resolve(store: &Store, ids: &[UserId]) -> anyhow::Result<Vec<User>> {
    let mut out = Vec::with_capacity(ids.len());
    for &id in ids {
        let user = store.user(id).await.context("cannot read a user")?;
        out.push(user.unwrap_or(User {
            id,
            name: String::new(),
            org: String::new(),
        }));
    }
    Ok(out)
}

fn users_json(users: &[User]) -> serde_json::Value {
    users
        .iter()
        .map(|u| json!({ "id": u.id.0, "name": u.name, "org": u.org }))
        .collect()
}

fn groups_json(groups: &[GroupSummary]) -> serde_json::Value {
    groups
        .iter()
        .map(|g| {
            json!({
                "id": g.id,
                "name": g.name,
                "members": g.members,
                "timeline_max": g.timeline_max,
            })
        })
        .collect()
}

fn users_table(users: &[User]) -> String {
    let rows: Vec<Vec<String>> = users
        .iter()
        .map(|u| vec![u.id.to_string(), u.name.clone(), u.org.clone()])
        .collect();
    table(&["ID", "NAME", "ORG"], &rows)
}

fn groups_table(groups: &[GroupSummary]) -> String {
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            vec![
                g.id.to_string(),
                g.name.clone(),
                g.members.to_string(),
                g.timeline_max.to_string(),
            ]
        })
        .collect();
    table(&["ID", "NAME", "MEMBERS", "TIMELINE"], &rows)
}

/// Left-aligned columns two spaces apart, widths in characters.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let headers: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&headers).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = w - cell.chars().count();
                let _ = write!(line, "{cell}{:pad$}  ", "");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_by_characters() {
        let rows = vec![
            vec!["1001".to_owned(), "Zoë".to_owned(), "acme".to_owned()],
            vec![
                "5000".to_owned(),
                "user5000".to_owned(),
                "bigcorp".to_owned(),
            ],
        ];
        assert_eq!(
            table(&["ID", "NAME", "ORG"], &rows),
            "ID    NAME      ORG\n1001  Zoë       acme\n5000  user5000  bigcorp\n"
        );
    }

    #[test]
    fn demo_groups_hold_the_named_users() {
        assert_eq!(DEMO_GENERATED.count(), 600);
        for u in DEMO_TEAM {
            assert!(DEMO_USERS.iter().any(|&(id, _, _)| id == u));
        }
    }
}
