//! bulwark-snapshot: see the crate description. (Filled in by its issue.)

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {}
