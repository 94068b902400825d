//! The results as Markdown tables on stdout.

use crate::db::redact;
use crate::flow::Hists;
use crate::measure::{Outcome, Timing};
use crate::{Args, SERVER_A, SERVER_B};
use hdrhistogram::Histogram;

pub fn q(h: &Histogram<u64>, quantile: f64) -> String {
    if h.is_empty() {
        "-".into()
    } else {
        group_digits(h.value_at_quantile(quantile))
    }
}

pub fn group_digits(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

pub fn report(
    args: &Args,
    t: &Timing,
    db_version: &str,
    pids: &[(&'static str, u32)],
    outcomes: &[Outcome],
) {
    let cmd: Vec<String> = std::env::args().collect();
    let online = crate::scenario::online_per_side(
        args.group_size,
        args.group_online.unwrap_or(args.group_size),
    );
    println!();
    println!("## chat-bench results");
    println!();
    println!("command: `{}`", cmd.join(" "));
    println!();
    println!(
        "deployment: iim-exchange + app servers A (id {SERVER_A}) and B (id {SERVER_B}), real processes on loopback; MariaDB {db_version} at {} (fresh database, dropped at the end); {} cores",
        redact(&args.mysql_url),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "1:1: {} pairs (senders on A, receivers on B), {} in flight per sender at saturation ({} connections)",
        args.pairs,
        args.window,
        2 * args.pairs
    );
    println!(
        "group: {} members ({} on A, {} on B connected; {}), {} senders, {} in flight per sender at saturation ({} pushes per message)",
        args.group_size,
        online[0],
        online[1],
        fan_out(args.group_size),
        args.group_senders.min(online[0] + online[1]),
        args.group_window,
        (online[0] + online[1]).saturating_sub(1)
    );
    println!(
        "message body {} B; warm-up {:.0} s, saturation window {:.0} s, latency run {:.0} s at {:.0} % of saturation (first 10 % not recorded)",
        args.size,
        t.warmup.as_secs_f64(),
        t.secs.as_secs_f64(),
        t.latency.as_secs_f64(),
        t.load
    );
    println!();
    println!("### Saturation (closed loop: a message is in flight until its last push)");
    println!();
    let cpu_head: Vec<&str> = pids.iter().map(|(l, _)| *l).collect();
    println!(
        "| scenario | messages/s stored+pushed | pushes/s received | acks/s | send → ack p50 / p99 µs | send → last push p50 / p99 µs | CPU % of a core ({}) | MariaDB commits/s | fsyncs/s | row lock waits (time) | lost |",
        cpu_head.join(" / ")
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for o in outcomes {
        let w = &o.sat;
        let cpu: Vec<String> = w.cpu.iter().map(|c| format!("{c:.0}")).collect();
        println!(
            "| {} | {} | {} | {} | {} / {} | {} / {} | {} | {:.0} | {:.0} | {} ({} ms) | {} |",
            o.name,
            group_digits((w.c.completed as f64 / w.secs) as u64),
            group_digits((w.c.pushes as f64 / w.secs) as u64),
            group_digits((w.c.acks as f64 / w.secs) as u64),
            q(&o.sat_h.ack, 0.5),
            q(&o.sat_h.ack, 0.99),
            q(&o.sat_h.last, 0.5),
            q(&o.sat_h.last, 0.99),
            cpu.join(" / "),
            w.commits,
            w.fsyncs,
            w.lock_waits,
            w.lock_time_ms,
            w.c.lost
        );
    }
    println!();
    println!(
        "### Latency at a fixed offered load (µs from the intended send time; corrected for coordinated omission)"
    );
    println!();
    println!(
        "| scenario | load | offered msg/s | sent msg/s | to ack p50 / p99 | to last push p50 | p99 | p999 | max | samples / sent | lost |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for o in outcomes {
        let Some(l) = &o.lat else { continue };
        println!(
            "| {} | {:.0} % | {:.0} | {:.0} | {} / {} | {} | {} | {} | {} | {} / {} | {} |",
            o.name,
            t.load,
            l.offered,
            l.achieved,
            q(&l.h.ack, 0.5),
            q(&l.h.ack, 0.99),
            q(&l.h.last, 0.5),
            q(&l.h.last, 0.99),
            q(&l.h.last, 0.999),
            q(&l.h.last, 1.0),
            l.h.last.len(),
            l.sent,
            l.lost
        );
    }
    if let Some(o) = outcomes.iter().find(|o| o.name == "group") {
        println!();
        println!(
            "### Group: which member gets it when (µs from the intended send time, p50 / p99)"
        );
        println!();
        println!(
            "| run | to ack | to the median member | to the last member on the sender's server | to the last member on the other server | to the last member |"
        );
        println!("|---|---|---|---|---|---|");
        let row = |run: String, h: &Hists| {
            let pair = |x: &Histogram<u64>| format!("{} / {}", q(x, 0.5), q(x, 0.99));
            println!(
                "| {run} | {} | {} | {} | {} | {} |",
                pair(&h.ack),
                pair(&h.median),
                pair(&h.last_same),
                pair(&h.last_other),
                pair(&h.last)
            );
        };
        row("saturation (closed loop)".into(), &o.sat_h);
        if let Some(l) = &o.lat {
            row(
                format!("{:.0} % load, {:.0} msg/s", t.load, l.offered),
                &l.h,
            );
        }
    }
    println!();
    println!("### App server counters during the saturation window (A / B)");
    println!();
    println!(
        "| scenario | chat messages stored | chat pushes handed to the relay | pushes dropped | connections cut (overflow) |"
    );
    println!("|---|---|---|---|---|");
    for o in outcomes {
        let s = &o.sat.servers;
        let pick = |i: usize| {
            s.iter()
                .map(|c| c[i].to_string())
                .collect::<Vec<_>>()
                .join(" / ")
        };
        println!(
            "| {} | {} | {} | {} | {} |",
            o.name,
            pick(0),
            pick(1),
            pick(2),
            pick(3)
        );
    }
    let mut notes = Vec::new();
    for o in outcomes {
        if o.stray > 0 {
            notes.push(format!(
                "{}: {} pushes arrived for messages already counted lost or twice",
                o.name, o.stray
            ));
        }
        if o.refused > 0 || !o.errors.is_empty() {
            notes.push(format!(
                "{}: {} sends refused; error frames {:?}",
                o.name, o.refused, o.errors
            ));
        }
    }
    if !notes.is_empty() {
        println!();
        for n in notes {
            println!("note: {n}");
        }
    }
}

/// How the app servers (default configuration) store a message to a group
/// of `members`: copied to every inbox, or once to the group's timeline.
fn fan_out(members: usize) -> &'static str {
    let threshold = iim_appserver::config::ChatConfig::default().large_group_threshold;
    if members > threshold {
        "read fan-out: one timeline row"
    } else {
        "write fan-out: one inbox row per member"
    }
}
