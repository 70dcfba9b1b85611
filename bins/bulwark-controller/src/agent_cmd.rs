//! `backup --agent ...` (the quiesced backup) and `enroll`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use bulwark_consistency::Level;
use bulwark_controller::{AgentTarget, Quiesce, QuiesceOptions};
use clap::Args;

/// The guest-agent options of `backup`.
#[derive(Debug, Args)]
pub struct QuiesceArgs {
    /// The VM's guest agent: unix:PATH, virtio-serial:unix:PATH (the QEMU chardev socket of
    /// the port the agent serves in the guest) or tcp:HOST:PORT (mutual TLS, see --tls-dir).
    /// With it the guest is quiesced (pre-scripts, fsfreeze) around the snapshot.
    #[arg(long, value_name = "unix:PATH|virtio-serial:unix:PATH|tcp:HOST:PORT")]
    agent: Option<String>,
    /// The controller's TLS files from `enroll`: ca.pem, controller.pem, controller.key.
    #[arg(long, value_name = "DIR", requires = "agent")]
    tls_dir: Option<PathBuf>,
    /// The name the agent's certificate must carry (default: the host of --agent).
    #[arg(long, value_name = "NAME", requires = "agent")]
    agent_name: Option<String>,
    /// The consistency wanted: application, file_system or crash (default: the best the agent
    /// offers).
    #[arg(long, value_name = "LEVEL")]
    consistency: Option<Level>,
    /// The lowest consistency acceptable: below it the backup fails and commits nothing.
    #[arg(long, value_name = "LEVEL", default_value = "crash")]
    min_consistency: Level,
    /// How long the agent may keep the guest frozen before its watchdog thaws on its own
    /// (the agent may cap it).
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    freeze_timeout_ms: u64,
    /// Test hook: sleep this long in the snapshot phase while the guest is frozen.
    #[arg(long, hide = true, value_name = "MS")]
    test_snapshot_delay_ms: Option<u64>,
}

impl QuiesceArgs {
    /// The quiescing these options ask for: none unless `--agent` is given (or more than
    /// crash consistency is asked for, which needs it).
    pub fn quiesce(&self) -> Result<Option<Quiesce>> {
        let wants_more = self.consistency.is_some_and(|l| l > Level::Crash);
        let Some(agent) = &self.agent else {
            if wants_more || self.min_consistency > Level::Crash {
                bail!("--consistency/--min-consistency above crash need --agent");
            }
            return Ok(None);
        };
        let name = self.agent_name.clone();
        let agent = AgentTarget::from_options(agent, self.tls_dir.as_deref(), name)?;
        let options = QuiesceOptions {
            wanted: self.consistency,
            minimum: self.min_consistency,
            freeze_timeout: Duration::from_millis(self.freeze_timeout_ms.max(1)),
            snapshot_delay: self.test_snapshot_delay_ms.map(Duration::from_millis),
        };
        Ok(Some(Quiesce { agent, options }))
    }
}

/// `bulwark-controller enroll`.
#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// The controller's CA directory (ca.pem, ca.key; created on first use). The controller's
    /// own client identity goes to DIR/controller (ca.pem, controller.pem, controller.key),
    /// the directory `backup --tls-dir` wants.
    #[arg(long, value_name = "DIR")]
    ca_dir: PathBuf,
    /// Where to write the agent's files (ca.pem, NAME.pem, NAME.key): copy them into the guest
    /// and name them in the agent's [tls] table.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// The agent's name: its host name, the certificate's common name and file stem.
    #[arg(long, value_name = "NAME")]
    agent: String,
    /// Another DNS name or IP address the controller dials the agent by; repeatable.
    #[arg(long = "san", value_name = "HOST_OR_IP")]
    sans: Vec<String>,
}

/// Issues the agent's certificate; creates the CA and the controller's identity if missing.
pub fn enroll(a: EnrollArgs) -> Result<()> {
    let sans: Vec<&str> = a.sans.iter().map(String::as_str).collect();
    println!(
        "{}",
        bulwark_protocol::enroll(&a.ca_dir, &a.out, &a.agent, &sans)?
    );
    Ok(())
}
