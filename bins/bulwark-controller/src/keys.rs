//! `key` commands and the key-file option of every vault command.
//!
//! Passphrases are read from the environment only (never from the command line, where other
//! users could see them in the process list): `BULWARK_PASSPHRASE` by default.

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use bulwark_vault::{MasterKey, OpenOptions, StoreOptions};
use clap::{Args, Subcommand};

/// The key of an encrypted vault, for every command.
#[derive(Debug, Args)]
pub struct GlobalKeyArgs {
    /// Key file of an encrypted vault (`key create` makes one). Its passphrase, if any, is read
    /// from the environment variable BULWARK_PASSPHRASE.
    #[arg(long, global = true, env = "BULWARK_KEY_FILE", value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

/// `init --encrypt`.
#[derive(Debug, Args)]
pub struct EncryptArgs {
    /// Encrypt the vault (blocks, manifests, points) with the key given by --key-file; block
    /// names become keyed hashes. Chosen once, at creation.
    #[arg(long)]
    pub encrypt: bool,
}

/// Key management. The key file is given with --key-file (or BULWARK_KEY_FILE).
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a new random master key in a new file (mode 0600; never overwrites).
    Create(CreateArgs),
    /// Print the fingerprint of a key file (no passphrase needed).
    Fingerprint,
    /// Re-protect a key file under a new passphrase (or none). The key itself is unchanged.
    ChangePassphrase(ChangeArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Protect the key with the passphrase held in this environment variable (Argon2id).
    #[arg(long, value_name = "VAR")]
    passphrase_env: Option<String>,
}

#[derive(Debug, Args)]
pub struct ChangeArgs {
    /// The variable holding the current passphrase.
    #[arg(long, value_name = "VAR", default_value = "BULWARK_PASSPHRASE")]
    passphrase_env: String,
    /// The variable holding the new passphrase.
    #[arg(long, value_name = "VAR", default_value = "BULWARK_NEW_PASSPHRASE")]
    new_passphrase_env: String,
    /// Store the key without a passphrase (anyone who can read the file has the key).
    #[arg(long, conflicts_with = "new_passphrase_env")]
    no_passphrase: bool,
}

/// The passphrase in the environment variable `var` (required, not empty).
fn passphrase_from(var: &str) -> Result<String> {
    match std::env::var(var) {
        Ok(p) if !p.is_empty() => Ok(p),
        Ok(_) => bail!("environment variable {var} is empty"),
        Err(_) => bail!("set the passphrase in the environment variable {var}"),
    }
}

/// The key file given with --key-file or BULWARK_KEY_FILE, kept by [`init`] for every vault
/// operation of this run.
static KEY_FILE: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Keeps the key option for [`vault_options`] and the `key` commands. Call once, from `main`.
pub fn init(args: &GlobalKeyArgs) {
    let file = args.key_file.clone().filter(|f| !f.as_os_str().is_empty());
    // A second call would be a bug of main's; the first value stays.
    let _ = KEY_FILE.set(file);
}

fn key_file() -> Option<&'static PathBuf> {
    KEY_FILE.get().and_then(Option::as_ref)
}

/// The vault options of this run, built from the command line and the environment (the vault
/// library reads neither): the store settings (`AWS_*`, `AZURE_*`, `AZURITE_BLOB_STORAGE_URL`,
/// `BULWARK_STORE_*`, the file named by `BULWARK_STORE_CONFIG`) and the key of --key-file /
/// `BULWARK_KEY_FILE`, unwrapped with `BULWARK_PASSPHRASE` when the file is protected by one.
pub fn vault_options() -> Result<OpenOptions> {
    let store = StoreOptions::from_vars(std::env::vars())?;
    // The host name leases and VM ownership records name: the kernel's, unless
    // BULWARK_HOST says otherwise (several controllers on one machine, or a renamed host
    // that keeps its VMs).
    let host = std::env::var("BULWARK_HOST")
        .ok()
        .filter(|h| !h.trim().is_empty());
    let options = OpenOptions {
        store,
        host,
        ..OpenOptions::default()
    };
    Ok(match key_file() {
        Some(file) => {
            let pass = std::env::var("BULWARK_PASSPHRASE").ok();
            options.with_key_file(file, pass.as_deref())?
        }
        None => options,
    })
}

/// `init`: `--encrypt` and a key go together, so a vault is never encrypted by accident, nor
/// left unencrypted when encryption was asked for.
pub fn check_init(a: &EncryptArgs) -> Result<()> {
    let has_key = key_file().is_some();
    match (a.encrypt, has_key) {
        (true, false) => bail!("--encrypt needs --key-file (create one with `key create`)"),
        (false, true) => bail!(
            "a key file is set (--key-file or BULWARK_KEY_FILE): pass --encrypt to create an \
             encrypted vault, or unset it"
        ),
        _ => Ok(()),
    }
}

/// Runs a `key` command.
pub fn run(cmd: KeyCommand) -> Result<()> {
    let Some(file) = key_file() else {
        bail!("give the key file with --key-file FILE (or BULWARK_KEY_FILE)");
    };
    let protected = |p: bool| {
        if p {
            "protected by a passphrase"
        } else {
            "no passphrase"
        }
    };
    match cmd {
        KeyCommand::Create(a) => {
            let pass = a.passphrase_env.map(|v| passphrase_from(&v)).transpose()?;
            let key = MasterKey::create_file(file, pass.as_deref())?;
            println!("{}", key.fingerprint());
            eprintln!(
                "created key {} ({}); keep a copy somewhere safe: without it the vault cannot be \
                 read",
                file.display(),
                protected(pass.is_some())
            );
        }
        KeyCommand::Fingerprint => {
            let (wrapped, fp) = bulwark_vault::crypto::key_file_info(file)?;
            println!("{fp}");
            eprintln!("({})", protected(wrapped));
        }
        KeyCommand::ChangePassphrase(a) => {
            let (wrapped, _) = bulwark_vault::crypto::key_file_info(file)?;
            let old = wrapped
                .then(|| passphrase_from(&a.passphrase_env))
                .transpose()?;
            let new = (!a.no_passphrase)
                .then(|| passphrase_from(&a.new_passphrase_env))
                .transpose()?;
            let key = MasterKey::change_passphrase(file, old.as_deref(), new.as_deref())
                .with_context(|| format!("changing the passphrase of {}", file.display()))?;
            eprintln!(
                "key {} re-protected ({})",
                key.fingerprint(),
                protected(new.is_some())
            );
        }
    }
    Ok(())
}
