//! `vault undelete`: bring back what plain deletes hid in an immutable S3 vault.

use anyhow::Result;
use bulwark_vault::unhide::UnhideOptions;
use clap::{Args, Subcommand};

use crate::ui;
use crate::{VaultArg, open};

#[derive(Debug, Subcommand)]
pub enum VaultCmd {
    /// Immutable S3 vaults: remove the delete markers that hide still-locked versions of
    /// points, manifests and blocks (plain deletes with the vault's credentials), so hidden
    /// points list and restore again. Points pruned by Bulwark are left alone (see
    /// `undelete --point`).
    Undelete(UndeleteHiddenArgs),
}

#[derive(Debug, Args)]
pub struct UndeleteHiddenArgs {
    #[command(flatten)]
    vault: VaultArg,
    /// Only this VM's points and manifests (blocks are shared: all of them).
    #[arg(long)]
    vm: Option<String>,
    /// Show what would be brought back; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(cmd: VaultCmd) -> Result<()> {
    match cmd {
        VaultCmd::Undelete(a) => {
            let vault = open(&a.vault).await?;
            let options = UnhideOptions {
                vm: a.vm,
                dry_run: a.dry_run,
            };
            let report = vault.unhide(&options).await?;
            ui::show(a.json, &serde_json::to_value(&report)?, &report, false, "")
        }
    }
}
