//! The agent's handler over an in-memory stream (no root, nothing frozen): levels offered,
//! pre-script outcomes and fallbacks, refusal of paths that are not mount points, idempotent
//! thaw.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use bulwark_agent::{AgentCore, Config};
use bulwark_consistency::Level;
use bulwark_protocol::{
    AgentState, CAP_FSFREEZE, CAP_SCRIPTS, Client, Connection, ErrorCode, ScriptStatus,
    ServeOptions, serve,
};

fn script(dir: &Path, name: &str, body: &str, mode: u32) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p.display().to_string()
}

fn config(dir: &Path, text: &str, mode: u32) -> Config {
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    Config::load(&path).unwrap()
}

async fn client(core: &std::sync::Arc<AgentCore>) -> Client<tokio::io::DuplexStream> {
    let (a, b) = tokio::io::duplex(64 * 1024);
    tokio::spawn(serve(
        Connection::new(b, "test"),
        core.connection(),
        ServeOptions::default(),
    ));
    let mut c = Client::new(Connection::new(a, "agent"));
    c.set_reply_timeout(Some(Duration::from_secs(30)));
    c
}

fn is_owner_root(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).unwrap().uid() == 0
}

#[tokio::test]
async fn a_directory_that_is_not_a_mount_point_is_never_frozen() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let text = format!(
        "listen = \"unix:{0}/s\"\nstate_dir = \"{0}/state\"\n[freeze]\nmounts = [\"{0}\"]\n",
        dir.display()
    );
    let core = AgentCore::new(config(dir, &text, 0o600), None);
    let mut c = client(&core).await;
    let hello = c.hello("t", "0", &[]).await.unwrap();
    assert_eq!(hello.levels, [Level::Crash]);
    assert!(!hello.has_capability(CAP_FSFREEZE));
    let err = c.freeze(Duration::from_secs(1)).await.unwrap_err();
    match err {
        bulwark_protocol::Error::Remote { code, message, .. } => {
            assert_eq!(code, ErrorCode::FreezeFailed);
            assert!(message.contains("is not a mount point"), "{message}");
        }
        other => panic!("{other}"),
    }
    // Thaw with nothing frozen is harmless and says so.
    let t = c.thaw().await.unwrap();
    assert!(!t.held_continuously);
    assert_eq!(c.status().await.unwrap().state, AgentState::Idle);
}

#[tokio::test]
async fn disabled_freeze_is_unsupported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let text = format!(
        "listen = \"unix:{0}/s\"\nstate_dir = \"{0}/state\"\n[freeze]\nenabled = false\n",
        dir.display()
    );
    let core = AgentCore::new(config(dir, &text, 0o600), None);
    let mut c = client(&core).await;
    assert_eq!(c.hello("t", "0", &[]).await.unwrap().levels, [Level::Crash]);
    let err = c.freeze(Duration::from_secs(1)).await.unwrap_err();
    assert!(
        matches!(
            err,
            bulwark_protocol::Error::Remote {
                code: ErrorCode::Unsupported,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn pre_scripts_outcomes_and_fallbacks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    if !is_owner_root(dir) {
        bulwark_tests::skip(
            "agent handler::pre_scripts_outcomes_and_fallbacks",
            bulwark_tests::Needs::Root,
            "needs root (the scripts it makes must be owned by root)",
        );
        return;
    }
    let ok = script(dir, "ok.sh", "#!/bin/sh\necho fine\n", 0o755);
    let bad = script(dir, "bad.sh", "#!/bin/sh\necho nope >&2\nexit 4\n", 0o755);
    let post = script(dir, "post.sh", "#!/bin/sh\ndate > \"$0.ran\"\n", 0o755);
    let base = format!(
        "listen = \"unix:{0}/s\"\nstate_dir = \"{0}/state\"\n[freeze]\nenabled = false\n",
        dir.display()
    );

    // All succeed: application; thaw runs the post-script.
    let text = format!(
        "{base}[scripts]\n[[scripts.pre]]\npath = \"{ok}\"\n[[scripts.post]]\npath = \"{post}\"\n"
    );
    let core = AgentCore::new(config(dir, &text, 0o600), None);
    let mut c = client(&core).await;
    let h = c.hello("t", "0", &[]).await.unwrap();
    assert!(h.has_capability(CAP_SCRIPTS));
    let p = c.prepare().await.unwrap();
    assert_eq!(p.level, Level::Application);
    assert_eq!(p.scripts[0].status, ScriptStatus::Succeeded);
    assert_eq!(c.status().await.unwrap().state, AgentState::Prepared);
    let t = c.thaw().await.unwrap();
    assert_eq!(t.post_scripts.len(), 1);
    assert_eq!(t.post_scripts[0].status, ScriptStatus::Succeeded);
    assert!(Path::new(&format!("{post}.ran")).exists());
    // Idempotent: the same report again.
    assert_eq!(c.thaw().await.unwrap(), t);

    // A controller that prepares and vanishes: the application is resumed, the agent is idle.
    std::fs::remove_file(format!("{post}.ran")).unwrap();
    let mut c = client(&core).await;
    c.hello("t", "0", &[]).await.unwrap();
    assert_eq!(c.prepare().await.unwrap().level, Level::Application);
    drop(c);
    let mut c = client(&core).await;
    c.hello("t", "0", &[]).await.unwrap();
    let mut waited = 0;
    while c.status().await.unwrap().state != AgentState::Idle {
        waited += 1;
        assert!(waited < 500, "still prepared after the controller left");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(Path::new(&format!("{post}.ran")).exists());
    assert_eq!(c.prepare().await.unwrap().level, Level::Application);

    // A failure with continue_on_failure: file_system with the reason; the next is skipped.
    let text = format!(
        "{base}[scripts]\ncontinue_on_failure = true\n[[scripts.pre]]\npath = \"{bad}\"\n[[scripts.pre]]\npath = \"{ok}\"\n"
    );
    let core = AgentCore::new(config(dir, &text, 0o600), None);
    let mut c = client(&core).await;
    c.hello("t", "0", &[]).await.unwrap();
    let p = c.prepare().await.unwrap();
    assert_eq!(p.level, Level::FileSystem);
    assert_eq!(p.scripts[0].status, ScriptStatus::Failed);
    assert_eq!(p.scripts[0].exit_code, Some(4));
    // What the script printed stays on the agent's host: not in the outcome, not in the
    // reasons (both end up in the recovery point).
    assert_eq!(p.scripts[0].message, None);
    let reply = format!("{p:?}");
    assert!(
        !reply.contains("nope"),
        "script output left the agent: {reply}"
    );
    assert_eq!(p.scripts[1].status, ScriptStatus::Skipped);
    assert!(
        p.reasons[0].contains("exited with status 4"),
        "{:?}",
        p.reasons
    );

    // Without it: the prepare fails.
    let text = format!("{base}[scripts]\n[[scripts.pre]]\npath = \"{bad}\"\n");
    let core = AgentCore::new(config(dir, &text, 0o600), None);
    let mut c = client(&core).await;
    c.hello("t", "0", &[]).await.unwrap();
    let err = c.prepare().await.unwrap_err();
    assert!(
        matches!(
            &err,
            bulwark_protocol::Error::Remote {
                code: ErrorCode::PrepareFailed,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(c.status().await.unwrap().state, AgentState::Idle);

    // A group-writable configuration file: refused, file_system.
    let text = format!("{base}[scripts]\n[[scripts.pre]]\npath = \"{ok}\"\n");
    let core = AgentCore::new(config(dir, &text, 0o620), None);
    let mut c = client(&core).await;
    let h = c.hello("t", "0", &[]).await.unwrap();
    assert!(!h.levels.contains(&Level::Application));
    let p = c.prepare().await.unwrap();
    assert_eq!(p.level, Level::FileSystem);
    assert_eq!(p.scripts[0].status, ScriptStatus::Refused);
    assert!(
        p.reasons[0].contains("writable by group"),
        "{:?}",
        p.reasons
    );
}

#[tokio::test]
async fn only_the_connection_that_prepared_may_thaw() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let text = format!(
        "listen = \"unix:{0}/s\"\nstate_dir = \"{0}/state\"\n[freeze]\nenabled = false\n",
        dir.display()
    );
    let core = AgentCore::new(config(dir, &text, 0o600), None);
    let mut owner = client(&core).await;
    owner.hello("owner", "0", &[]).await.unwrap();
    owner.prepare().await.unwrap();
    let mut other = client(&core).await;
    other.hello("other", "0", &[]).await.unwrap();
    let err = other.thaw().await.unwrap_err();
    assert!(
        matches!(
            &err,
            bulwark_protocol::Error::Remote {
                code: ErrorCode::InvalidState,
                ..
            }
        ),
        "another connection thawed: {err}"
    );
    assert_eq!(other.status().await.unwrap().state, AgentState::Prepared);
    owner.thaw().await.unwrap();
    assert_eq!(other.status().await.unwrap().state, AgentState::Idle);
}
