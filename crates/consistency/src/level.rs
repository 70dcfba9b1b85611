//! The consistency levels a recovery point can reach.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How consistent a recovery point is, from weakest to strongest.
///
/// The order is meaningful: `Crash < FileSystem < Application`, so a policy's minimum can be
/// checked with a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// As if the power had been cut: no guest cooperation. File systems replay their journal on
    /// restore; applications recover as after a crash.
    Crash,
    /// File systems were frozen (FIFREEZE) while the disks were snapshotted: clean file systems,
    /// no journal replay, but applications may hold unflushed state.
    FileSystem,
    /// Applications were quiesced by their pre-scripts and the file systems frozen: restores
    /// start without any recovery.
    Application,
}

impl Level {
    /// All levels, weakest first.
    pub const ALL: [Level; 3] = [Level::Crash, Level::FileSystem, Level::Application];

    /// The stable name used in JSON, TOML and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Crash => "crash",
            Level::FileSystem => "file_system",
            Level::Application => "application",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for a string that names no level.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown consistency level {given:?}: expected one of crash, file_system, application")]
pub struct UnknownLevel {
    /// What was given.
    pub given: String,
}

impl FromStr for Level {
    type Err = UnknownLevel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "crash" => Ok(Level::Crash),
            "file_system" | "filesystem" | "fs" => Ok(Level::FileSystem),
            "application" | "app" => Ok(Level::Application),
            _ => Err(UnknownLevel {
                given: s.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_and_names_round_trip() {
        assert!(Level::Crash < Level::FileSystem && Level::FileSystem < Level::Application);
        for l in Level::ALL {
            assert_eq!(l.as_str().parse::<Level>(), Ok(l));
            assert_eq!(serde_json::to_string(&l).unwrap(), format!("\"{l}\""));
        }
        assert!("fast".parse::<Level>().is_err());
    }
}
