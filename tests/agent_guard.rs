//! Freeze safety of the real agent (root): whoever dies, the guest does not stay frozen.
//!
//! * agent SIGKILLed while frozen: the guardian process thaws (at once: it sees its pipe close;
//!   at the latest at the deadline); a writer blocked on the file system continues;
//! * agent and guardian both SIGKILLed: the next agent start thaws from the state file;
//! * the controller vanishes while frozen: the agent thaws (it does not wait for the deadline);
//! * SIGTERM: the agent thaws before it exits;
//! * one freeze at a time across connections.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

#[path = "agent_common/mod.rs"]
mod agent_common;

use std::path::Path;
use std::time::{Duration, Instant};

use agent_common::*;
use bulwark_protocol::{AgentState, Client, ErrorCode, connect_unix};
use bulwark_tests::*;

const TOOLS: &[&str] = &["mkfs.ext4", "mkfs.xfs", "losetup", "fsfreeze"];

fn setup(dir: &Path) -> (Guest, AgentProc) {
    let guest = Guest::new(dir, 64 * MIB, 512 * MIB);
    let config = write_config(
        dir,
        "agent.toml",
        &unix_config(dir, guest.mnt(), "max_timeout_ms = 60000"),
        0o600,
    );
    let agent = AgentProc::start(&config);
    (guest, agent)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn client(dir: &Path) -> Client<tokio::net::UnixStream> {
    let mut c = Client::new(connect_unix(&dir.join("agent.sock")).await.unwrap());
    c.set_reply_timeout(Some(Duration::from_secs(30)));
    c.hello("test", "0", &[]).await.unwrap();
    c
}

#[test]
fn sigkilled_agent_is_covered_by_the_guardian_and_the_writer_continues() {
    if !root_or_skip("sigkill_while_frozen", TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (guest, mut agent) = setup(dir);
    let writer = Writer::start(guest.mnt());
    let rt = rt();
    let c = rt.block_on(async {
        let mut c = client(dir).await;
        let f = c.freeze(Duration::from_secs(8)).await.unwrap();
        assert_eq!(
            f.mounts,
            [guest.mnt().canonicalize().unwrap().display().to_string()]
        );
        c
    });
    assert!(
        !writer.progresses(Duration::from_millis(400)),
        "the writer was not blocked by the freeze"
    );
    assert!(dir.join("state/frozen.json").exists());
    assert_eq!(agent.children().len(), 1, "one guardian process expected");
    let killed = Instant::now();
    agent.kill9();
    assert!(
        writer.progresses(Duration::from_secs(8 + 2)),
        "the guest stayed frozen after the agent was SIGKILLed"
    );
    let resumed = killed.elapsed();
    eprintln!("writer resumed {resumed:?} after SIGKILL (deadline 8s)");
    assert!(resumed < Duration::from_secs(9));
    drop(c);
    // The killed agent left its state file; the next start cleans it up.
    assert!(dir.join("state/frozen.json").exists());
    let agent = AgentProc::start(&agent.config.clone());
    assert!(!dir.join("state/frozen.json").exists());
    assert!(
        agent
            .log_text()
            .contains("frozen state of a previous agent")
    );
    writer.stop();
}

#[test]
fn agent_and_guardian_both_killed_the_next_start_thaws() {
    if !root_or_skip("agent_and_guardian_killed", TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (guest, mut agent) = setup(dir);
    let writer = Writer::start(guest.mnt());
    let rt = rt();
    let c = rt.block_on(async {
        let mut c = client(dir).await;
        c.freeze(Duration::from_secs(60)).await.unwrap();
        c
    });
    let guardians = agent.children();
    assert_eq!(guardians.len(), 1);
    let out = std::process::Command::new("kill")
        .args(["-KILL", &guardians[0].to_string()])
        .output()
        .unwrap();
    assert!(out.status.success());
    agent.kill9();
    drop(c);
    // Nobody is left to thaw: still frozen.
    assert!(!writer.progresses(Duration::from_millis(700)));
    let config = agent.config.clone();
    drop(agent);
    let started = Instant::now();
    let agent = AgentProc::start(&config);
    assert!(
        writer.progresses(Duration::from_secs(5)),
        "the restarted agent did not thaw"
    );
    eprintln!("restarted agent thawed within {:?}", started.elapsed());
    let log = agent.log_text();
    assert!(
        log.contains("thawed file systems a previous agent left frozen"),
        "{log}"
    );
    writer.stop();
}

#[test]
fn a_vanished_controller_does_not_leave_the_guest_frozen() {
    if !root_or_skip("controller_vanishes", TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (guest, agent) = setup(dir);
    let writer = Writer::start(guest.mnt());
    let rt = rt();
    rt.block_on(async {
        let mut c = client(dir).await;
        c.freeze(Duration::from_secs(60)).await.unwrap();
        drop(c);
    });
    assert!(
        writer.progresses(Duration::from_secs(5)),
        "frozen until the 60s deadline"
    );
    rt.block_on(async {
        let mut c = client(dir).await;
        assert_eq!(c.status().await.unwrap().state, AgentState::Idle);
        // Thaw is idempotent: it reports the earlier thaw, not held continuously.
        let t = c.thaw().await.unwrap();
        assert!(!t.held_continuously);
        assert!(t.reason.unwrap().contains("connection closed"));
    });
    writer.stop();
    drop(agent);
}

#[test]
fn sigterm_thaws_before_exit_and_one_freeze_at_a_time() {
    if !root_or_skip("sigterm_thaws", TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (guest, mut agent) = setup(dir);
    let writer = Writer::start(guest.mnt());
    let rt = rt();
    let (c1, c2) = rt.block_on(async {
        let mut c1 = client(dir).await;
        let mut c2 = client(dir).await;
        c1.freeze(Duration::from_secs(60)).await.unwrap();
        let busy = c2.freeze(Duration::from_secs(60)).await.unwrap_err();
        assert!(
            matches!(
                busy,
                bulwark_protocol::Error::Remote {
                    code: ErrorCode::Busy,
                    ..
                }
            ),
            "{busy}"
        );
        let st = c2.status().await.unwrap();
        assert_eq!(st.state, AgentState::Frozen);
        assert!(st.deadline_unix_ms.is_some());
        (c1, c2)
    });
    assert!(!writer.progresses(Duration::from_millis(300)));
    assert!(
        agent.term(Duration::from_secs(10)),
        "the agent did not exit on SIGTERM"
    );
    assert!(
        writer.progresses(Duration::from_secs(2)),
        "still frozen after SIGTERM"
    );
    assert!(!dir.join("state/frozen.json").exists());
    assert!(agent.log_text().contains("thawing first"));
    drop((c1, c2));
    writer.stop();
}
