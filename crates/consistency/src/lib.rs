//! bulwark-consistency: the consistency levels (crash < file_system < application).
//!
//! ```
//! use bulwark_consistency::Level;
//! assert!(Level::Crash < Level::Application);
//! assert_eq!("file_system".parse::<Level>().unwrap(), Level::FileSystem);
//! ```

mod level;

pub use level::{Level, UnknownLevel};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {}
