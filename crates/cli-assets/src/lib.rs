//! Man pages and shell completions (bash, zsh, fish) of the Bulwark binaries, generated from
//! their clap definitions, for the Debian packages (`packaging/build-debs.sh`).
//!
//! Each binary answers a hidden first argument, `generate-assets --out DIR`, through
//! [`dispatch`] before its normal command line is parsed, so the command never shows in
//! `--help`, in the man pages or in the completions.
//!
//! ```
//! use bulwark_cli_assets::{ManPages, dispatch};
//!
//! let out = tempfile::tempdir()?;
//! let cmd = || clap::Command::new("demo-tool").subcommand(clap::Command::new("run"));
//! let args = ["demo-tool", "generate-assets", "--out", out.path().to_str().unwrap()];
//! // A binary passes `std::env::args_os()` and returns the exit code when it gets one.
//! let code = dispatch(args.map(Into::into), cmd, ManPages::Single { section: "8" });
//! assert_eq!(code, Some(std::process::ExitCode::SUCCESS));
//! assert!(out.path().join("man/demo-tool.8").is_file());
//! assert!(out.path().join("completions/demo-tool.bash").is_file());
//! // Any other first argument is left to the binary's own parser.
//! assert_eq!(dispatch(["demo-tool".into(), "run".into()], cmd, ManPages::PerCommand), None);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use clap_complete::Shell;

/// The hidden subcommand's name.
pub const COMMAND: &str = "generate-assets";

/// What went wrong, and where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A directory or file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Which man pages a binary gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ManPages {
    /// One page for the whole binary, in `section` (`"8"` for a daemon).
    Single {
        /// The man section.
        section: &'static str,
    },
    /// One section-1 page per command and subcommand (`tool.1`, `tool-sub.1`, ...).
    PerCommand,
}

/// The arguments of `generate-assets`.
#[derive(Debug, Parser)]
#[command(name = COMMAND)]
struct AssetsArgs {
    /// Output directory: man/ and completions/ (bash, zsh, fish) are written under it.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// Runs `generate-assets` when it is the first argument of `args` (the program's whole
/// command line, program name first); `None` otherwise. `command` builds the binary's clap
/// definition (`Cli::command`).
pub fn dispatch(
    args: impl IntoIterator<Item = OsString>,
    command: impl FnOnce() -> clap::Command,
    man: ManPages,
) -> Option<ExitCode> {
    let mut args = args.into_iter();
    let program = args.next()?;
    if args.next()? != COMMAND {
        return None;
    }
    let cmd = command();
    let bin_name = format!("{} {COMMAND}", cmd.get_name());
    let parsed = match AssetsArgs::command_for(&bin_name)
        .try_get_matches_from(std::iter::once(program).chain(args))
        .and_then(|m| <AssetsArgs as clap::FromArgMatches>::from_arg_matches(&m))
    {
        Ok(a) => a,
        Err(e) => {
            // Prints the usage or help, as clap does; exit status 2 for a bad command line.
            let _ = e.print();
            return Some(if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            });
        }
    };
    Some(match generate(cmd, man, &parsed.out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    })
}

impl AssetsArgs {
    fn command_for(bin_name: &str) -> clap::Command {
        <AssetsArgs as clap::CommandFactory>::command().bin_name(bin_name.to_string())
    }
}

/// Writes the man pages under `out/man/` and the completions `out/completions/{NAME.bash,
/// _NAME, NAME.fish}` for `cmd` (NAME is its name).
pub fn generate(cmd: clap::Command, man: ManPages, out: &Path) -> Result<(), Error> {
    let man_dir = out.join("man");
    let completions = out.join("completions");
    for dir in [&man_dir, &completions] {
        std::fs::create_dir_all(dir).map_err(|source| Error::Write {
            path: dir.clone(),
            source,
        })?;
    }
    let wrote_man = |source| Error::Write {
        path: man_dir.clone(),
        source,
    };
    match man {
        ManPages::Single { section } => {
            clap_mangen::Man::new(cmd.clone())
                .section(section)
                .generate_to(&man_dir)
                .map_err(wrote_man)?;
        }
        ManPages::PerCommand => {
            clap_mangen::generate_to(cmd.clone(), &man_dir).map_err(wrote_man)?
        }
    }
    let mut cmd = cmd;
    let name = cmd.get_name().to_string();
    for shell in [Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, &name, &completions).map_err(|source| {
            Error::Write {
                path: completions.clone(),
                source,
            }
        })?;
    }
    let mut bash = Vec::new();
    clap_complete::generate(Shell::Bash, &mut cmd, &name, &mut bash);
    let bash = fix_bash_labels(&String::from_utf8_lossy(&bash), &name);
    let path = completions.join(format!("{name}.bash"));
    std::fs::write(&path, bash).map_err(|source| Error::Write { path, source })?;
    Ok(())
}

/// Works around clap_complete's bash generator for a binary name with a hyphen (clap issues
/// 6421, 6529): the loop that walks the words names the state of `my-app sub` as
/// `my__app__subcmd__sub`, but the case arm that completes it is labelled
/// `my__subcmd__app__subcmd__sub`, so no subcommand's options or subcommands ever completed.
/// The arms are renamed to what the loop produces.
fn fix_bash_labels(script: &str, name: &str) -> String {
    if !name.contains('-') {
        return script.to_string();
    }
    let wrong = format!("{}__subcmd__", name.replace('-', "__subcmd__"));
    let right = format!("{}__subcmd__", name.replace('-', "__"));
    script.replace(&wrong, &right)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tool() -> clap::Command {
        clap::Command::new("my-tool")
            .subcommand(clap::Command::new("backup").arg(clap::Arg::new("vault").long("vault")))
    }

    #[test]
    fn per_command_pages_and_bash_arms_match_the_word_loop() {
        let out = tempfile::tempdir().unwrap();
        generate(tool(), ManPages::PerCommand, out.path()).unwrap();
        assert!(out.path().join("man/my-tool.1").is_file());
        assert!(out.path().join("man/my-tool-backup.1").is_file());
        let bash = std::fs::read_to_string(out.path().join("completions/my-tool.bash")).unwrap();
        // The loop's state name and the case arm agree, so `my-tool backup --<TAB>` completes.
        assert!(bash.contains("my__tool__subcmd__backup)"), "{bash}");
        assert!(!bash.contains("my__subcmd__tool"), "{bash}");
        assert!(out.path().join("completions/_my-tool").is_file());
        assert!(out.path().join("completions/my-tool.fish").is_file());
    }

    #[test]
    fn a_bad_command_line_is_refused_and_an_unwritable_out_is_an_error() {
        let args = ["my-tool", COMMAND, "--nope"].map(OsString::from);
        assert_eq!(
            dispatch(args, tool, ManPages::PerCommand),
            Some(ExitCode::from(2))
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        let err = generate(tool(), ManPages::PerCommand, file.path()).unwrap_err();
        assert!(err.to_string().contains("writing"), "{err}");
    }
}
