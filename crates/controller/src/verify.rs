//! `verify` with memory: what it finds bad is recorded in the vault (`health/bad-blocks/`),
//! so that `list` names the broken points and the next backup of a disk that still holds the
//! data heals them; records of blocks that read back sound again are removed.

use std::collections::BTreeSet;

use bulwark_blockdiff::Address;
use bulwark_vault::{Vault, VerifyReport};

use crate::Error;

/// What [`verify`] did besides verifying.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[non_exhaustive]
pub struct HealthUpdate {
    /// Bad-block records written (one per damaged or missing block found).
    pub recorded: usize,
    /// Records removed: their block reads back verified now.
    pub cleared: usize,
}

/// Verifies every point of `vm` (or of the vault), records each damaged or missing block
/// found, and clears the records of blocks that read back sound again. `progress` as in
/// [`Vault::verify`].
pub async fn verify(
    vault: &Vault,
    vm: Option<&str>,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<(VerifyReport, HealthUpdate), Error> {
    let report = vault.verify(vm, progress).await?;
    let recorded = vault.record_bad_blocks(&report).await?;
    let still_bad: BTreeSet<Address> = report
        .problems
        .iter()
        .filter_map(|p| {
            p.key
                .strip_prefix("blocks/")
                .and_then(|k| k.rsplit('/').next())
                .and_then(Address::from_hex)
        })
        .collect();
    let cleared = vault.clear_healed_records(&still_bad).await?;
    if recorded > 0 {
        tracing::warn!(
            recorded,
            "bad blocks recorded in the vault: the next backup of each disk that still holds \
             the data heals them"
        );
    }
    Ok((report, HealthUpdate { recorded, cleared }))
}
