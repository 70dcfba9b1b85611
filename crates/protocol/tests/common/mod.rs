//! Shared test helpers: a toy agent and certificate fixtures.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;

use bulwark_consistency::Level;
use bulwark_protocol::{
    AgentIdentity, AgentState, CAP_FSFREEZE, CAP_SCRIPTS, ErrorCode, ErrorReply, Frozen, Handler,
    Hello, HelloOk, Prepared, Request, Response, StatusReport, Thawed, TlsFiles,
};

/// A toy agent: Idle → Prepared → Frozen → Idle, one freeze at a time across connections.
#[derive(Debug, Clone)]
pub struct ToyAgent {
    pub state: Arc<Mutex<AgentState>>,
}

impl ToyAgent {
    pub fn new() -> ToyAgent {
        ToyAgent {
            state: Arc::new(Mutex::new(AgentState::Idle)),
        }
    }
}

impl Handler for ToyAgent {
    async fn hello(&mut self, _hello: &Hello, version: u16) -> Result<HelloOk, ErrorReply> {
        Ok(HelloOk {
            version,
            agent: AgentIdentity {
                hostname: "toy".into(),
                agent_version: "0.0.1".into(),
            },
            capabilities: vec![CAP_FSFREEZE.into(), CAP_SCRIPTS.into()],
            levels: Level::ALL.to_vec(),
        })
    }

    async fn handle(&mut self, request: Request) -> Response {
        let mut state = self.state.lock().unwrap();
        match request {
            Request::Ping => Response::Pong,
            Request::Status => Response::Status(StatusReport {
                state: *state,
                deadline_unix_ms: (*state == AgentState::Frozen).then_some(1),
                mounts: vec![],
            }),
            Request::Prepare => {
                *state = AgentState::Prepared;
                Response::Prepared(Prepared {
                    scripts: vec![],
                    level: Level::Application,
                    reasons: vec![],
                })
            }
            Request::Freeze { timeout_ms } => {
                if *state == AgentState::Frozen {
                    return Response::error(ErrorCode::Busy, "already frozen");
                }
                *state = AgentState::Frozen;
                Response::Frozen(Frozen {
                    mounts: vec!["/".into()],
                    timeout_ms,
                    deadline_unix_ms: 1,
                })
            }
            Request::Thaw => {
                let held = *state == AgentState::Frozen;
                *state = AgentState::Idle;
                Response::Thawed(Thawed {
                    held_continuously: held,
                    reason: (!held).then(|| "was not frozen".to_owned()),
                    frozen_for_ms: 3,
                    post_scripts: vec![],
                })
            }
            Request::Hello(_) => Response::error(ErrorCode::Internal, "hello reached the handler"),
        }
    }
}

/// A CA with an agent identity (localhost, 127.0.0.1) and a controller identity, on disk.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca_dir: PathBuf,
    pub agent: TlsFiles,
    pub controller: TlsFiles,
}

pub fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    bulwark_protocol::ensure_ca(&ca_dir, "Test CA").unwrap();
    let agent = bulwark_protocol::enroll_agent(
        &ca_dir,
        &dir.path().join("agent"),
        "localhost",
        &["127.0.0.1"],
    )
    .unwrap();
    let controller =
        bulwark_protocol::enroll_controller(&ca_dir, &dir.path().join("controller"), "controller")
            .unwrap();
    Pki {
        dir,
        ca_dir,
        agent,
        controller,
    }
}

pub fn path_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
