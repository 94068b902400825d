//! Steps 9 and 10 of the demo: users chatting through `iimctl chat`
//! processes (this binary, started through the test kit's launcher, each
//! with its output in a log file), one to one across two servers (with a
//! typing indicator and a read receipt), then in the small group "team".

use super::section;
use anyhow::Context;
use iim_kit::proc::Proc;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;

/// How long the demo's chat receivers print what arrives.
const CHAT_WAIT_SECS: u64 = 6;
/// How long a receiver may take to connect and show its history.
const READY_WAIT: Duration = Duration::from_secs(10);

/// Steps 9 and 10. `clients` are the three servers' client endpoints.
pub(super) async fn steps(
    logs: &Path,
    clients: &[String],
    team: u64,
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    let mut chats = Chats {
        logs: logs.to_owned(),
        started: 0,
    };
    section("9. Chat: user 1001 on server 1 writes to user 2001 on server 2, over WebSocket");
    println!("  A user connects to any app server's client endpoint with a token (iimctl token);");
    println!("  a message is stored, acknowledged with its seq, then pushed through the exchange.");
    let texts = [
        "hi Carol, Alice here on server 1",
        "the exchange carried this to server 2",
    ];
    println!("  1001 says it is typing first; then 2001, on a second device, marks the chat read:");
    println!("  the receipt reaches 1001 (watching on another device) and 2001's first device.");
    let receiver = chats.receiver(&clients[1], 2001, "terminal").await?;
    let watcher = chats.receiver(&clients[0], 1001, "watch").await?;
    let input = format!("/to 2001\n/typing\n{}\n{}\n", texts[0], texts[1]);
    let sender = chats.sender(&clients[0], 1001, "terminal", &input)?;
    let sent = finish(sender, "the sender, user 1001 on server 1", problems).await;
    let acks = sent.iter().filter(|l| l.starts_with("sent, seq ")).count();
    if acks != 2 {
        problems.push(format!("the 1:1 sender printed {acks} acks, expected 2"));
    }
    let reader = chats.sender(&clients[1], 2001, "phone", "/to 1001\n/read\n")?;
    finish(
        reader,
        "2001 on a second device, marking the chat read",
        problems,
    )
    .await;
    let got = finish(receiver, "the receiver, user 2001 on server 2", problems).await;
    for text in texts {
        expect_line(
            &got,
            "user 2001",
            "[seq ",
            &format!("1001 → you: {text}"),
            problems,
        );
    }
    expect_line(
        &got,
        "user 2001",
        "[typing] user 1001 is typing",
        "",
        problems,
    );
    expect_line(
        &got,
        "user 2001 (first device)",
        "[read] you read the chat with 1001 up to ",
        "(another device)",
        problems,
    );
    let watched = finish(watcher, "user 1001 watching on a second device", problems).await;
    expect_line(
        &watched,
        "user 1001 (second device)",
        "[read] user 2001 read your chat up to ",
        "",
        problems,
    );

    section(&format!(
        "10. A group: user 3001 on server 3 writes to \"team\" (group {team}: 1001, 2001, 3001)"
    ));
    println!(
        "  A small group's message gets a seq in every member's inbox; the history shows step 9."
    );
    let alice = chats.receiver(&clients[0], 1001, "terminal").await?;
    let carol = chats.receiver(&clients[1], 2001, "terminal").await?;
    let text = "hello team, Erin here on server 3";
    let sender = chats.sender(
        &clients[2],
        3001,
        "terminal",
        &format!("/group {team}\n{text}\n"),
    )?;
    let sent = finish(sender, "the sender, user 3001 on server 3", problems).await;
    if !sent.iter().any(|l| l.starts_with("sent, seq ")) {
        problems.push("the group sender printed no ack".to_owned());
    }
    let start = format!("[group {team}, seq ");
    let end = format!("3001: {text}");
    for (proc, user, server) in [(alice, 1001, 1), (carol, 2001, 2)] {
        let title = format!("the receiver, user {user} on server {server}");
        let got = finish(proc, &title, problems).await;
        expect_line(&got, &format!("user {user}"), &start, &end, problems);
    }
    Ok(())
}

/// A live line (not history) starting with `start` and ending with `end`.
fn expect_line(lines: &[String], who: &str, start: &str, end: &str, problems: &mut Vec<String>) {
    if !lines
        .iter()
        .any(|l| l.starts_with(start) && l.ends_with(end))
    {
        problems.push(format!("{who} did not print a line \"{start}…] {end}\""));
    }
}

/// Starts `iimctl chat` children, each logging to `chat-<user>-<n>.log`.
struct Chats {
    logs: PathBuf,
    started: usize,
}

impl Chats {
    /// A user that prints what it receives for [`CHAT_WAIT_SECS`]; returns
    /// once it is connected and has printed its history (its `ready` line).
    async fn receiver(&mut self, server: &str, user: u64, device: &str) -> anyhow::Result<Proc> {
        let wait = CHAT_WAIT_SECS.to_string();
        println!(
            "  $ iimctl chat --server {server} --user {user} --device {device} --wait-secs {wait} &"
        );
        let args = ["--device", device, "--wait-secs", &wait];
        let mut proc = self.start(server, user, &args, None)?;
        // A receiver that never gets ready shows in its output below.
        let _ready = iim_kit::poll_until(READY_WAIT, async || {
            let ready = lines(&proc).iter().any(|l| l.starts_with("ready"));
            Ok(ready || proc.child.try_wait()?.is_some())
        })
        .await;
        Ok(proc)
    }

    /// A user that sends `input` and exits once every send is acknowledged
    /// and every request answered.
    fn sender(
        &mut self,
        server: &str,
        user: u64,
        device: &str,
        input: &str,
    ) -> anyhow::Result<Proc> {
        println!(
            "  $ printf '{}' | iimctl chat --server {server} --user {user} --device {device} --exit-after-input",
            input.replace('\n', "\\n")
        );
        let args = ["--device", device, "--exit-after-input"];
        self.start(server, user, &args, Some(input))
    }

    fn start(
        &mut self,
        server: &str,
        user: u64,
        args: &[&str],
        input: Option<&str>,
    ) -> anyhow::Result<Proc> {
        let me = std::env::current_exe().context("cannot locate the iimctl binary")?;
        let mut cmd = Command::new(me);
        cmd.args(["chat", "--server", server, "--user", &user.to_string()])
            .args(args)
            .env_remove("IIM_JWT_SECRET")
            .env_remove("RUST_LOG");
        self.started += 1;
        let name = format!("chat-{user}-{}", self.started);
        let log = self.logs.join(format!("{name}.log"));
        let proc = match input {
            Some(text) => Proc::start_with_input(&name, cmd, &log, true, text.to_owned()),
            None => Proc::start(&name, cmd, &log, true),
        };
        proc.context("cannot start iimctl chat")
    }
}

/// What a chat child printed so far.
fn lines(proc: &Proc) -> Vec<String> {
    proc.log_text().lines().map(str::to_owned).collect()
}

/// Waits for a chat child to exit, prints its output under `title`, and
/// returns the output.
async fn finish(mut proc: Proc, title: &str, problems: &mut Vec<String>) -> Vec<String> {
    let limit = Duration::from_secs(CHAT_WAIT_SECS + 20);
    let failed = match proc.wait(limit).await {
        Ok(Some(status)) if status.success() => None,
        Ok(Some(status)) => Some(status.to_string()),
        Ok(None) => {
            proc.kill9().await;
            Some(format!("still running after {} s, killed", limit.as_secs()))
        }
        Err(e) => Some(e.to_string()),
    };
    let lines = lines(&proc);
    println!("  {title}:");
    for line in &lines {
        println!("    {line}");
    }
    if let Some(how) = failed {
        problems.push(format!("iimctl chat for {title} ended with {how}"));
    }
    lines
}
