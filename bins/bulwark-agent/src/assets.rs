//! `bulwark-agent generate-assets --out DIR` (hidden): writes the man page (section 8: a
//! daemon) and the shell completions, generated from the clap definitions, for the Debian
//! package (`packaging/build-debs.sh`).
//!
//! It is dispatched before the normal command line is parsed ([`dispatch`]), so it never
//! appears in `--help`, in the man page or in the completions.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use clap_complete::Shell;

/// The hidden subcommand's name.
const NAME: &str = "generate-assets";

/// The arguments of `generate-assets`.
#[derive(Debug, Parser)]
#[command(name = "generate-assets", bin_name = "bulwark-agent generate-assets")]
struct AssetsArgs {
    /// Output directory: man/bulwark-agent.8 and completions/ (bash, zsh, fish) are written
    /// under it.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// Runs `generate-assets` when it is the first argument; `None` otherwise.
pub fn dispatch() -> Option<ExitCode> {
    let mut args = std::env::args_os();
    let program = args.next()?;
    if args.next()? != NAME {
        return None;
    }
    let parsed = AssetsArgs::parse_from(std::iter::once(program).chain(args));
    Some(match generate(crate::Cli::command(), &parsed.out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    })
}

/// Writes `out/man/bulwark-agent.8` and `out/completions/{bulwark-agent.bash,_bulwark-agent,
/// bulwark-agent.fish}`.
fn generate(cmd: clap::Command, out: &Path) -> Result<()> {
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .generate_to(&man)
        .with_context(|| format!("writing the man page to {}", man.display()))?;
    let mut cmd = cmd;
    let name = cmd.get_name().to_string();
    for shell in [Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, &name, &completions)
            .with_context(|| format!("writing {shell} completion to {}", completions.display()))?;
    }
    let mut bash = Vec::new();
    clap_complete::generate(Shell::Bash, &mut cmd, &name, &mut bash);
    let bash = fix_bash_labels(&String::from_utf8_lossy(&bash), &name);
    let path = completions.join(format!("{name}.bash"));
    std::fs::write(&path, bash).with_context(|| format!("writing {}", path.display()))?;
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
