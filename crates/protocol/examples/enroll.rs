//! Enrollment by hand, until `bulwark-controller enroll` is wired:
//!
//! ```text
//! cargo run -p bulwark-protocol --example enroll -- <ca-dir> <out-dir> controller <name>
//! cargo run -p bulwark-protocol --example enroll -- <ca-dir> <out-dir> agent <host> [extra names or IPs...]
//! ```
//!
//! Creates the CA in `<ca-dir>` on first use, then issues the certificate into `<out-dir>`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (ca_dir, out_dir, kind, name, extra) = match args.as_slice() {
        [ca, out, kind, name, extra @ ..] => (
            PathBuf::from(ca),
            PathBuf::from(out),
            kind.as_str(),
            name.as_str(),
            extra,
        ),
        _ => {
            eprintln!(
                "usage: enroll <ca-dir> <out-dir> (controller <name> | agent <host> [names...])"
            );
            return ExitCode::from(2);
        }
    };
    let result = bulwark_protocol::ensure_ca(&ca_dir, "Bulwark controller CA").and_then(|ca| {
        if ca.created {
            println!("created CA {} and {}", ca.cert.display(), ca.key.display());
        }
        match kind {
            "controller" => bulwark_protocol::enroll_controller(&ca_dir, &out_dir, name),
            "agent" => {
                let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                bulwark_protocol::enroll_agent(&ca_dir, &out_dir, name, &extra)
            }
            other => Err(bulwark_protocol::Error::InvalidArgument {
                what: "kind",
                value: other.to_owned(),
                message: "expected \"controller\" or \"agent\"".to_owned(),
            }),
        }
    });
    match result {
        Ok(files) => {
            println!(
                "ca_cert = {}\ncert = {}\nkey = {}",
                files.ca_cert.display(),
                files.cert.display(),
                files.key.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("enroll: {e}");
            ExitCode::FAILURE
        }
    }
}
