//! The deployment (exchange + app servers A and B as real processes, the
//! users and the group in the directory) and the two scenarios.

use crate::conn::{Scenario, connect_all};
use crate::flow::{Flow, Shared};
use crate::measure::{Meters, Outcome, Timing, measure};
use crate::{Args, SERVER_A, SERVER_B};
use anyhow::Result;
use iim::store::{Store, User};
use iim::types::UserId;
use iim_kit::client::Socket;
use iim_kit::deploy::{Deployment, Spec, server_name};
use iim_kit::proc::Binaries;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Exchange 100 and app servers A and B in `dir` on the database
/// `db_url`: production timers; client rate limits lifted (one bench
/// connection stands for many human users).
pub fn spec(dir: &Path, db_url: &str, bins: Binaries) -> Spec {
    let mut spec = Spec::new(dir, db_url, bins);
    spec.servers = vec![SERVER_A, SERVER_B];
    spec.server_toml = "[limits]\nrate_per_sec = 1000000\nrate_burst = 1000000\nmax_connections_per_ip = 1000000\n".into();
    spec.jwt_secret = Some(iim_kit::JWT_SECRET.into());
    spec.log_filter = Some(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()));
    spec
}

/// The processes to read CPU time of, labelled as the report names them.
pub fn labelled_pids(dep: &Deployment) -> Vec<(&'static str, u32)> {
    let label = |name: &str| match name {
        n if n == server_name(SERVER_A) => "A",
        n if n == server_name(SERVER_B) => "B",
        _ => "exchange",
    };
    dep.pids().iter().map(|(n, pid)| (label(n), *pid)).collect()
}

pub fn one_to_one_users(pairs: usize) -> (Vec<u64>, Vec<u64>) {
    let senders = (0..pairs as u64).map(|p| 100_000 + p).collect();
    let receivers = (0..pairs as u64).map(|p| 200_000 + p).collect();
    (senders, receivers)
}

/// Connected members on A and on B when `online` of `size` are: half each
/// (A takes the odd one), within each server's half of the group.
pub fn online_per_side(size: usize, online: usize) -> [usize; 2] {
    let half = size.div_ceil(2);
    let a = online.div_ceil(2).min(half);
    [a, (online - a).min(size - half)]
}

pub fn group_users(size: usize) -> Vec<u64> {
    (0..size as u64).map(|m| 300_000 + m).collect()
}

/// The users and the group in the directory, then the deployment started
/// and linked (so pushes flow at once). Returns the group id.
pub async fn deploy(args: &Args, dep: &mut Deployment) -> Result<u64> {
    // Schema, directory and group, before any daemon starts.
    let store = Store::new(&dep.registry().await?);
    let (senders, receivers) = one_to_one_users(args.pairs);
    let members = group_users(args.group_size);
    // One organisation per user: no presence broadcasts between them.
    let users: Vec<User> = senders
        .iter()
        .chain(&receivers)
        .chain(&members)
        .map(|&u| User {
            id: UserId(u),
            name: format!("bench{u}"),
            org: format!("bench-{u}"),
        })
        .collect();
    store.add_users(&users).await?;
    let ids: Vec<UserId> = members.iter().map(|&u| UserId(u)).collect();
    let group = store.create_group("bench-group", &ids).await?;
    dep.start_exchange(dep.first_exchange())?;
    dep.wait_exchanges(&[dep.first_exchange()]).await?;
    for id in [SERVER_A, SERVER_B] {
        dep.start_server(id)?;
    }
    dep.wait_servers(&[SERVER_A, SERVER_B]).await?;
    Ok(group)
}

pub async fn one_to_one(
    args: &Args,
    dep: &mut Deployment,
    t: &Timing,
    meters: &mut Meters,
) -> Result<Outcome> {
    let (senders, receivers) = one_to_one_users(args.pairs);
    let mut list: Vec<(SocketAddr, u64)> = senders.iter().map(|&u| (dep.ws(SERVER_A), u)).collect();
    list.extend(receivers.iter().map(|&u| (dep.ws(SERVER_B), u)));
    let started = Instant::now();
    let mut conns = connect_all(&list).await?;
    eprintln!(
        "chat-bench: 1:1: {} connections in {:.1} s",
        list.len(),
        started.elapsed().as_secs_f64()
    );
    let recv_conns = conns.split_off(args.pairs);
    // Sender p on A writes to receiver p on B: one push, on B.
    let flows = receivers
        .iter()
        .enumerate()
        .map(|(p, &to)| Flow::new(p, 0, to, 0, [0, 1]))
        .collect();
    let shared = Arc::new(Shared::new(flows, args.size)?);
    let mut all: Vec<(Socket, usize, Option<usize>)> = conns
        .into_iter()
        .enumerate()
        .map(|(p, w)| (w, 0, Some(p)))
        .collect();
    all.extend(recv_conns.into_iter().map(|w| (w, 1, None)));
    let sc = Scenario::start(all, shared);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = measure("1:1", &sc, args.window, t, meters, dep).await;
    let s = sc.stop().await;
    let out = r?;
    s?;
    Ok(out)
}

pub async fn group(
    args: &Args,
    dep: &mut Deployment,
    group: u64,
    t: &Timing,
    meters: &mut Meters,
) -> Result<Outcome> {
    let members = group_users(args.group_size);
    let half = members.len().div_ceil(2);
    let ws = [dep.ws(SERVER_A), dep.ws(SERVER_B)];
    // Member m belongs on A for m < half, on B otherwise; the first
    // `online` of each half connect (all by default).
    let online = args.group_online.unwrap_or(members.len());
    let on = online_per_side(members.len(), online);
    let connected = |m: usize| {
        if m < half {
            m < on[0]
        } else {
            m - half < on[1]
        }
    };
    let list: Vec<(SocketAddr, u64)> = members
        .iter()
        .enumerate()
        .filter(|&(m, _)| connected(m))
        .map(|(m, &u)| (ws[usize::from(m >= half)], u))
        .collect();
    // Senders alternate: member 0 (A), member `half` (B), member 1 (A), …
    let mut sender_members = Vec::new();
    for k in 0..args.group_senders {
        let m = if k % 2 == 0 { k / 2 } else { half + k / 2 };
        if m < members.len() && connected(m) && !sender_members.contains(&m) {
            sender_members.push(m);
        }
    }
    let started = Instant::now();
    let conns = connect_all(&list).await?;
    eprintln!(
        "chat-bench: group: {} connections in {:.1} s",
        list.len(),
        started.elapsed().as_secs_f64()
    );
    // Every connected member but the sending connection gets a push.
    let on = [u32::try_from(on[0])?, u32::try_from(on[1])?];
    let flows = sender_members
        .iter()
        .enumerate()
        .map(|(f, &m)| {
            let side = usize::from(m >= half);
            let mut expect = on;
            expect[side] -= 1;
            Flow::new(f, 1, group, side, expect)
        })
        .collect();
    let shared = Arc::new(Shared::new(flows, args.size)?);
    let by_member: HashMap<usize, usize> = sender_members
        .iter()
        .enumerate()
        .map(|(f, &m)| (m, f))
        .collect();
    let connected_members = (0..members.len()).filter(|&m| connected(m));
    let all = conns
        .into_iter()
        .zip(connected_members)
        .map(|(w, m)| (w, usize::from(m >= half), by_member.get(&m).copied()))
        .collect();
    let sc = Scenario::start(all, shared);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = measure("group", &sc, args.group_window, t, meters, dep).await;
    let s = sc.stop().await;
    let out = r?;
    s?;
    Ok(out)
}
