//! Enrollment: the controller's CA and the certificates it issues (rcgen, ECDSA P-256).
//!
//! Layout: the CA lives in a directory of its own as `ca.pem` (certificate, 0644) and `ca.key`
//! (private key, 0600). An issued identity is written to an output directory as
//! `<name>.pem`, `<name>.key` (0600) and a copy of `ca.pem`, which is exactly the
//! [`TlsFiles`] of that side.
//!
//! ```no_run
//! use std::path::Path;
//! # fn main() -> Result<(), bulwark_protocol::Error> {
//! let ca_dir = Path::new("/etc/bulwark/ca");
//! bulwark_protocol::ensure_ca(ca_dir, "Bulwark controller CA")?;
//! // On the controller: its client identity.
//! let controller = bulwark_protocol::enroll_controller(ca_dir, Path::new("/etc/bulwark/tls"), "controller")?;
//! // For a guest: copy the three files into the guest's /etc/bulwark-agent/tls.
//! let agent = bulwark_protocol::enroll_agent(
//!     ca_dir,
//!     Path::new("/var/lib/bulwark/enroll/web1"),
//!     "web1.example.org",
//!     &["192.0.2.10"],
//! )?;
//! # let _ = (controller, agent);
//! # Ok(()) }
//! ```

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::error::Error;
use crate::tls::TlsFiles;

/// File name of the CA certificate.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key.
pub const CA_KEY_FILE: &str = "ca.key";
/// Validity of the CA certificate: 20 years.
pub const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// Validity of issued certificates: 5 years. Re-enroll to renew.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// Certificates start being valid this long before their creation, for guests whose clock
/// lags.
pub const CLOCK_SKEW: Duration = Duration::from_secs(24 * 3600);

const ORGANIZATION: &str = "Bulwark";

/// The controller's certificate authority: signs agent and controller certificates.
pub struct CertificateAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("CertificateAuthority")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// A certificate and its private key, issued by a [`CertificateAuthority`].
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The name it was issued for (common name and file stem).
    pub name: String,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
    /// The issuing CA's certificate, PEM.
    pub ca_cert_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("name", &self.name)
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// Where [`ensure_ca`] put the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    /// `<dir>/ca.pem`.
    pub cert: PathBuf,
    /// `<dir>/ca.key`, mode 0600.
    pub key: PathBuf,
    /// Whether this call created them (false: they existed and were loaded).
    pub created: bool,
}

fn cert_error(what: &'static str) -> impl FnOnce(rcgen::Error) -> Error {
    move |source| Error::CertGen { what, source }
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(CLOCK_SKEW);
    params.not_after = epoch + now.saturating_add(lifetime);
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::CommonName, common_name);
    dn
}

impl CertificateAuthority {
    /// Creates a new CA: a fresh key and a self-signed certificate (CA, path length 0: it
    /// signs only end-entity certificates).
    pub fn generate(common_name: &str) -> Result<CertificateAuthority, Error> {
        validate_common_name(common_name)?;
        let key = KeyPair::generate().map_err(cert_error("CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, CA_VALIDITY);
        let cert = params
            .self_signed(&key)
            .map_err(cert_error("CA certificate"))?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<CertificateAuthority, Error> {
        let key = KeyPair::from_pem(key_pem).map_err(cert_error("loading the CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(cert_error("loading the CA certificate"))?;
        Ok(CertificateAuthority {
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    /// Loads `<dir>/ca.pem` and `<dir>/ca.key`.
    pub fn load(dir: &Path) -> Result<CertificateAuthority, Error> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert = read(&cert_path)?;
        let key = read(&key_path)?;
        CertificateAuthority::from_pem(&cert, &key)
    }

    /// Writes `<dir>/ca.pem` (0644) and `<dir>/ca.key` (0600), creating `dir` (0700) if needed.
    pub fn save(&self, dir: &Path) -> Result<CaFiles, Error> {
        create_dir(dir)?;
        let cert = dir.join(CA_CERT_FILE);
        let key = dir.join(CA_KEY_FILE);
        write_atomic(&key, self.key_pem().as_bytes(), 0o600)?;
        write_atomic(&cert, self.cert_pem.as_bytes(), 0o644)?;
        Ok(CaFiles {
            cert,
            key,
            created: true,
        })
    }

    /// The CA certificate, PEM: the trust anchor both sides pin.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM. Keep it on the controller only.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues an agent (server) certificate for `name`, a host name or IP address that the
    /// controller will dial, plus `extra_names` (more DNS names or IPs). The certificate
    /// carries them as subject alternative names and may only be used as a TLS server
    /// (`serverAuth`): an agent's identity cannot pose as the controller.
    pub fn issue_agent(&self, name: &str, extra_names: &[&str]) -> Result<IssuedCert, Error> {
        let mut sans = vec![san(name)?];
        for extra in extra_names {
            let s = san(extra)?;
            if !sans.contains(&s) {
                sans.push(s);
            }
        }
        self.issue(name, sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// Issues the controller's client certificate (`clientAuth` only) under `name`.
    pub fn issue_controller(&self, name: &str) -> Result<IssuedCert, Error> {
        validate_file_stem(name)?;
        self.issue(name, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        name: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<IssuedCert, Error> {
        validate_file_stem(name)?;
        let key = KeyPair::generate().map_err(cert_error("key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(name);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, LEAF_VALIDITY);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(cert_error("certificate"))?;
        Ok(IssuedCert {
            name: name.to_owned(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_cert_pem: self.cert_pem.clone(),
        })
    }
}

impl IssuedCert {
    /// Writes `<dir>/<name>.pem` (0644), `<dir>/<name>.key` (0600) and `<dir>/ca.pem` (0644),
    /// creating `dir` (0700) if needed, each file atomically. Returns their paths.
    pub fn write(&self, dir: &Path) -> Result<TlsFiles, Error> {
        validate_file_stem(&self.name)?;
        create_dir(dir)?;
        let files = TlsFiles {
            ca_cert: dir.join(CA_CERT_FILE),
            cert: dir.join(format!("{}.pem", self.name)),
            key: dir.join(format!("{}.key", self.name)),
        };
        write_atomic(&files.key, self.key_pem.as_bytes(), 0o600)?;
        write_atomic(&files.cert, self.cert_pem.as_bytes(), 0o644)?;
        write_atomic(&files.ca_cert, self.ca_cert_pem.as_bytes(), 0o644)?;
        Ok(files)
    }
}

/// Creates the CA in `ca_dir` if `ca.pem` and `ca.key` are both missing; loads (and so checks)
/// it if both exist. Exactly one of them existing is an error: silently replacing a CA would
/// lock out every enrolled agent.
pub fn ensure_ca(ca_dir: &Path, common_name: &str) -> Result<CaFiles, Error> {
    let cert = ca_dir.join(CA_CERT_FILE);
    let key = ca_dir.join(CA_KEY_FILE);
    match (exists(&cert)?, exists(&key)?) {
        (false, false) => {
            let ca = CertificateAuthority::generate(common_name)?;
            tracing::info!(dir = %ca_dir.display(), "created the controller CA");
            ca.save(ca_dir)
        }
        (true, true) => {
            CertificateAuthority::load(ca_dir)?;
            Ok(CaFiles {
                cert,
                key,
                created: false,
            })
        }
        (cert_exists, _) => {
            let (present, missing) = if cert_exists {
                (&cert, &key)
            } else {
                (&key, &cert)
            };
            Err(Error::File {
                path: missing.clone(),
                action: "loading the CA",
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "missing while {} exists; refusing to create a new CA over it",
                        present.display()
                    ),
                ),
            })
        }
    }
}

/// Issues an agent certificate with the CA in `ca_dir` (see
/// [`CertificateAuthority::issue_agent`]) and writes it to `out_dir` (see
/// [`IssuedCert::write`]). The returned files are the agent's [`TlsFiles`].
pub fn enroll_agent(
    ca_dir: &Path,
    out_dir: &Path,
    agent_name: &str,
    extra_names: &[&str],
) -> Result<TlsFiles, Error> {
    let ca = CertificateAuthority::load(ca_dir)?;
    ca.issue_agent(agent_name, extra_names)?.write(out_dir)
}

/// Issues the controller's client certificate with the CA in `ca_dir` and writes it to
/// `out_dir`. The returned files are the controller's [`TlsFiles`].
pub fn enroll_controller(ca_dir: &Path, out_dir: &Path, name: &str) -> Result<TlsFiles, Error> {
    let ca = CertificateAuthority::load(ca_dir)?;
    ca.issue_controller(name)?.write(out_dir)
}

/// What [`enroll`] did: its `Display` is the notes for the operator followed by the `[tls]`
/// table of the agent's configuration.
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// The CA directory, and whether the CA was created now.
    pub ca: (PathBuf, bool),
    /// The controller's client identity, when it was created now (in `<ca_dir>/controller`).
    pub controller: Option<TlsFiles>,
    /// The agent's files.
    pub agent: TlsFiles,
}

/// Enrolls an agent: creates the CA in `ca_dir` and the controller's client identity in
/// `<ca_dir>/controller` (`ca.pem`, `controller.pem`, `controller.key`) when missing, then
/// issues the agent's certificate for `agent_name` and `extra_names` into `out_dir`.
pub fn enroll(
    ca_dir: &Path,
    out_dir: &Path,
    agent_name: &str,
    extra_names: &[&str],
) -> Result<Enrollment, Error> {
    let ca = ensure_ca(ca_dir, "Bulwark controller CA")?;
    let controller_dir = ca_dir.join("controller");
    let controller = if exists(&controller_dir.join("controller.pem"))? {
        None
    } else {
        Some(enroll_controller(ca_dir, &controller_dir, "controller")?)
    };
    let agent = enroll_agent(ca_dir, out_dir, agent_name, extra_names)?;
    Ok(Enrollment {
        ca: (ca_dir.to_path_buf(), ca.created),
        controller,
        agent,
    })
}

impl std::fmt::Display for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ca.1 {
            writeln!(f, "# created the controller CA in {}", self.ca.0.display())?;
        }
        if let Some(c) = &self.controller {
            let dir = c.cert.parent().unwrap_or(Path::new("."));
            let (cert, dir) = (c.cert.display(), dir.display());
            writeln!(
                f,
                "# created the controller's client certificate {cert} (use --tls-dir {dir})"
            )?;
        }
        let path = |p: &Path| format!("{:?}", p.display().to_string());
        let a = &self.agent;
        write!(
            f,
            "[tls]\nca = {}\ncert = {}\nkey = {}",
            path(&a.ca_cert),
            path(&a.cert),
            path(&a.key)
        )
    }
}

fn invalid(what: &'static str, value: &str, message: &str) -> Error {
    Error::InvalidArgument {
        what,
        value: value.to_owned(),
        message: message.to_owned(),
    }
}

fn validate_common_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err(invalid(
            "common name",
            name,
            "must be 1 to 64 characters without control characters",
        ));
    }
    Ok(())
}

/// Names become file names: a host name, an IP address, or at least something without path
/// separators. `ca` is reserved: `ca.key` is the CA's key.
fn validate_file_stem(name: &str) -> Result<(), Error> {
    let ok = name != "ca"
        && !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
    if !ok {
        return Err(invalid(
            "name",
            name,
            "must be 1 to 64 of [A-Za-z0-9._:-], not starting with '.' or '-', and not \"ca\"",
        ));
    }
    Ok(())
}

fn san(name: &str) -> Result<SanType, Error> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if name.len() > 253 || !name.split('.').all(valid_label) {
        return Err(invalid(
            "agent name",
            name,
            "must be a DNS host name or an IP address",
        ));
    }
    let dns = name
        .to_owned()
        .try_into()
        .map_err(cert_error("subject alternative name"))?;
    Ok(SanType::DnsName(dns))
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::File {
        path: path.to_owned(),
        action: "reading",
        source,
    })
}

fn exists(path: &Path) -> Result<bool, Error> {
    path.try_exists().map_err(|source| Error::File {
        path: path.to_owned(),
        action: "checking existence",
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), Error> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::File {
            path: dir.to_owned(),
            action: "creating the directory",
            source,
        })
}

/// Writes `contents` to a temporary file created with `mode` (never wider, whatever the
/// umask allows: the mode is set on creation and the umask only narrows it), syncs it and
/// renames it over `path`.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let file_error = |action: &'static str| {
        move |source| Error::File {
            path: path.to_owned(),
            action,
            source,
        }
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(file_error("creating"))?;
        file.write_all(contents).map_err(file_error("writing"))?;
        file.sync_all().map_err(file_error("syncing"))?;
        std::fs::rename(&tmp, path).map_err(file_error("renaming into place"))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn ensure_ca_creates_then_loads() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let first = ensure_ca(&ca_dir, "Test CA").unwrap();
        assert!(first.created);
        assert_eq!(mode(&first.key), 0o600);
        assert_eq!(mode(&ca_dir), 0o700);
        let pem = std::fs::read_to_string(&first.cert).unwrap();
        let second = ensure_ca(&ca_dir, "Test CA").unwrap();
        assert!(!second.created);
        assert_eq!(std::fs::read_to_string(&second.cert).unwrap(), pem);
    }

    #[test]
    fn half_a_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let files = ensure_ca(dir.path(), "Test CA").unwrap();
        std::fs::remove_file(&files.key).unwrap();
        assert!(matches!(
            ensure_ca(dir.path(), "Test CA"),
            Err(Error::File { .. })
        ));
    }

    #[test]
    fn issued_files_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        ensure_ca(&ca_dir, "Test CA").unwrap();
        let out = dir.path().join("agent");
        let files = enroll_agent(&ca_dir, &out, "web1.example.org", &["127.0.0.1", "::1"]).unwrap();
        assert_eq!(files.cert, out.join("web1.example.org.pem"));
        assert_eq!(mode(&files.key), 0o600);
        assert_eq!(
            std::fs::read(&files.ca_cert).unwrap(),
            std::fs::read(ca_dir.join(CA_CERT_FILE)).unwrap()
        );
        let ctl = enroll_controller(&ca_dir, &dir.path().join("ctl"), "controller").unwrap();
        assert_eq!(mode(&ctl.key), 0o600);
    }

    #[test]
    fn bad_names_refused() {
        let ca = CertificateAuthority::generate("Test CA").unwrap();
        for bad in ["", "../etc", "a/b", "-x", ".hidden", "bad name", "a..b"] {
            assert!(ca.issue_agent(bad, &[]).is_err(), "{bad:?} accepted");
        }
        assert!(ca.issue_agent("ok", &["not a name"]).is_err());
        assert!(ca.issue_controller("x/y").is_err());
        let dir = tempfile::tempdir().unwrap();
        ensure_ca(dir.path(), "Test CA").unwrap();
        assert!(enroll_controller(dir.path(), dir.path(), "ca").is_err());
    }

    #[test]
    fn ca_roundtrips_through_pem() {
        let ca = CertificateAuthority::generate("Test CA").unwrap();
        let again = CertificateAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        let issued = again.issue_controller("ctl").unwrap();
        assert!(issued.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{issued:?}").contains("PRIVATE"));
        assert!(!format!("{again:?}").contains("PRIVATE"));
    }
}
