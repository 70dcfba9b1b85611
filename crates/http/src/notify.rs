//! The notification of a verify (through the API) that found damage.

use jiff::Timestamp;
use serde_json::{Value, json};

/// The `verify_damage` event: the VM verified (or every VM), the problems and the broken
/// points. Its id is unique per verify run.
pub(crate) fn verify_damage(
    vm: Option<&str>,
    problems: &[Value],
    broken: &impl serde::Serialize,
    now: Timestamp,
) -> bulwark_notify::Event {
    let scope = vm.unwrap_or("all");
    bulwark_notify::Event {
        id: format!("verify-{scope}-{}", now.as_millisecond()),
        kind: bulwark_notify::EventKind::VerifyDamage,
        at: now,
        vm: vm.map(String::from),
        job: None,
        summary: format!(
            "verify of {}: {} problem(s) in the vault",
            vm.map_or("every VM".to_string(), |v| format!("vm {v}")),
            problems.len()
        ),
        details: json!({ "problems": problems, "broken_points": broken }),
    }
}
