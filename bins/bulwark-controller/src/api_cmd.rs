//! `token create`, `run-now` and `jobs cancel`: the running daemon's API from the shell.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use bulwark_daemon::config::{Config, Scope};
use clap::{Args, Subcommand, ValueEnum};

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an API token: prints it once on stdout; the configuration keeps only its SHA-256
    /// (appended as a [[http.token]] entry with --config, else printed on stderr to add).
    Create(TokenCreateArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ScopeArg {
    /// Read resources only.
    Read,
    /// Read, and run actions (run now, cancel, verify, prune, restore).
    Operator,
}

#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// What the token may do.
    #[arg(long, value_enum)]
    scope: ScopeArg,
    /// A name for the token (shown in the daemon's logs).
    #[arg(long)]
    name: String,
    /// Append the token's entry to this daemon configuration (it must have an [http]
    /// section); restart the daemon to use it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// Where the daemon's API is and how to authenticate.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// The daemon's configuration: the API address is its [http] listen.
    #[arg(long, value_name = "FILE", required_unless_present = "api")]
    config: Option<PathBuf>,
    /// The API's base URL (instead of --config), e.g. https://backup1:8470.
    #[arg(long, value_name = "URL")]
    api: Option<String>,
    /// A file holding the API token (else the BULWARK_API_TOKEN environment variable).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// A PEM CA certificate to trust for an https API with a private certificate.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunNowArgs {
    /// The VM to back up now.
    vm: String,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The running job's id (`jobs` lists them).
    id: i64,
    #[command(flatten)]
    api: ApiArgs,
}

pub fn token(c: TokenCommand) -> Result<()> {
    let TokenCommand::Create(a) = c;
    if a.name.trim().is_empty() || a.name.contains(['"', '\\', '\n']) {
        bail!("--name: a plain name without quotes or backslashes");
    }
    let token = bulwark_http::new_token();
    let scope = match a.scope {
        ScopeArg::Read => Scope::Read,
        ScopeArg::Operator => Scope::Operator,
    };
    let entry = format!(
        "\n[[http.token]]\nname = \"{}\"\nscope = \"{scope}\"\nsha256 = \"{}\"\n",
        a.name,
        hex_of(&bulwark_http::token_sha256(&token))
    );
    match &a.config {
        Some(path) => {
            let before = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let c = Config::load(path)?;
            if c.http.is_none() {
                bail!(
                    "{}: no [http] section: add one with listen = \"127.0.0.1:8470\" first",
                    path.display()
                );
            }
            let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
            f.write_all(entry.as_bytes())?;
            drop(f);
            if let Err(e) = Config::load(path) {
                std::fs::write(path, before)?;
                bail!("the configuration would not be valid with the token ({e}); left unchanged");
            }
            eprintln!(
                "token {:?} ({scope}) added to {}; restart the daemon to use it",
                a.name,
                path.display()
            );
        }
        None => eprintln!("add to the daemon's configuration:{entry}"),
    }
    println!("{token}");
    Ok(())
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    fn new(a: &ApiArgs) -> Result<Client> {
        let base = match (&a.api, &a.config) {
            (Some(u), _) => u.trim_end_matches('/').to_string(),
            (None, Some(c)) => {
                let c = Config::load(c)?;
                let Some(h) = c.http else {
                    bail!(
                        "{}: no [http] section: the daemon serves no API",
                        c.file.display()
                    );
                };
                let scheme = if h.tls.is_some() { "https" } else { "http" };
                let host = if h.listen.ip().is_unspecified() {
                    "127.0.0.1".to_string()
                } else {
                    h.listen.ip().to_string()
                };
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host
                };
                format!("{scheme}://{host}:{}", h.listen.port())
            }
            (None, None) => bail!("give --config or --api"),
        };
        let token = match &a.token_file {
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("reading the token file {}", p.display()))?,
            None => std::env::var("BULWARK_API_TOKEN")
                .context("no API token: set BULWARK_API_TOKEN or give --token-file")?,
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = reqwest::Client::builder().timeout(std::time::Duration::from_secs(120));
        if let Some(ca) = &a.ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
        }
        Ok(Client {
            base,
            token: token.trim().to_string(),
            http: b.build()?,
        })
    }

    async fn post(&self, path: &str) -> Result<serde_json::Value> {
        let url = format!("{}{path}", self.base);
        let r = self
            .http
            .post(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        if !status.is_success() {
            let why = body["error"].as_str().unwrap_or("(no message)");
            bail!("{status}: {why}");
        }
        Ok(body)
    }
}

pub async fn run_now(a: RunNowArgs) -> Result<()> {
    let c = Client::new(&a.api)?;
    let r = c.post(&format!("/api/v1/vms/{}/run", a.vm)).await?;
    println!("{}", r["job"]);
    eprintln!("job {} started for VM {}", r["job"], a.vm);
    Ok(())
}

pub async fn cancel(a: CancelArgs) -> Result<()> {
    let c = Client::new(&a.api)?;
    c.post(&format!("/api/v1/jobs/{}/cancel", a.id)).await?;
    eprintln!(
        "job {}: cancel requested; it stops at its next safe point",
        a.id
    );
    Ok(())
}
