//! The Debian packages (issue 16): `packaging/build-debs.sh --profile dev` builds both from the
//! debug binaries, then, on the real .deb files:
//!
//! * `dpkg-deb` lists the binary, the man pages, the bash/zsh/fish completions, the root-only
//!   example configuration (a conffile) and the systemd unit; the maintainer scripts enable the
//!   unit and never start it on install;
//! * `systemd-analyze verify` accepts both units (no warning at all), in the extracted tree;
//! * `lintian` reports no error (warnings are printed);
//! * `man` renders `bulwark-controller` and `bulwark-agent` from the packaged pages;
//! * the packaged bash completion completes subcommands;
//! * the packaged binary's `serve --check` (the controller unit's ExecStartPre) accepts the
//!   packaged example configuration and rejects a broken one; the agent's example parses.
//!
//! Needs lintian, systemd-analyze, dpkg-deb and man (tests/run.sh installs them) and cargo-deb
//! (`bash packaging/build-debs.sh --install-tool`); skips without them unless
//! BULWARK_REQUIRE_ROOT_TESTS=1.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bulwark_tests::{
    agent_bin, controller_bin, root_or_skip, shell_cargo_env, stderr_of, stdout_of,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sh(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        stdout_of(&out),
        stderr_of(&out)
    );
    out
}

/// Builds both packages into `out` and returns (controller .deb, agent .deb).
fn build_debs(out: &Path) -> (PathBuf, PathBuf) {
    // The test kit's binaries are built already; the script reuses them (--profile dev).
    let _ = (controller_bin(), agent_bin());
    // As from a shell: the test's CARGO_* variables would make its cargo build rebuild ring and
    // everything above it (see shell_cargo_env).
    let o = sh(shell_cargo_env(&mut Command::new("bash"))
        .arg(root().join("packaging/build-debs.sh"))
        .args(["--profile", "dev", "--out"])
        .arg(out));
    let paths: Vec<PathBuf> = stdout_of(&o)
        .lines()
        .filter(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .collect();
    let find = |name: &str| {
        paths
            .iter()
            .find(|p| {
                p.file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with(&format!("{name}_")))
            })
            .unwrap_or_else(|| panic!("build-debs.sh printed no {name} package: {paths:?}"))
            .clone()
    };
    (find("bulwark-controller"), find("bulwark-agent"))
}

/// `dpkg-deb -c` as (mode, owner, path) triples, paths without the leading ".".
fn contents(deb: &Path) -> Vec<(String, String, String)> {
    let o = sh(Command::new("dpkg-deb").arg("-c").arg(deb));
    stdout_of(&o)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].to_string(),
                f[1].to_string(),
                f[5].trim_start_matches('.').to_string(),
            )
        })
        .collect()
}

fn control_file(deb: &Path, name: &str) -> String {
    stdout_of(&sh(Command::new("dpkg-deb").arg("-I").arg(deb).arg(name)))
}

fn assert_has(list: &[(String, String, String)], path: &str, mode: &str) {
    let found = list.iter().find(|(_, _, p)| p == path);
    let Some((m, owner, _)) = found else {
        panic!("the package lacks {path}; it holds:\n{list:#?}")
    };
    assert_eq!(m, mode, "{path}: mode");
    assert!(
        owner == "root/root" || owner == "0/0",
        "{path}: owner {owner}"
    );
}

/// Maintainer scripts: enable the unit, never start it on a fresh install, stop only on removal.
fn check_scripts(deb: &Path, unit: &str) {
    let postinst = control_file(deb, "postinst");
    assert!(
        postinst.contains(&format!("deb-systemd-helper enable '{unit}'"))
            || postinst.contains(&format!("deb-systemd-helper enable {unit}")),
        "postinst does not enable {unit}:\n{postinst}"
    );
    assert!(
        postinst.contains("daemon-reload"),
        "postinst: no daemon-reload:\n{postinst}"
    );
    for line in postinst.lines() {
        let l = line.trim();
        // A restart happens only on upgrade ($2, the old version, set) and only of a running
        // unit (try-restart); "start" never appears.
        assert!(
            !(l.contains("deb-systemd-invoke") && l.contains(" start ")),
            "postinst starts the unit: {l}"
        );
    }
    assert!(
        postinst.contains("try-restart") && postinst.contains("if [ -n \"$2\" ]"),
        "postinst: a restart not limited to upgrades of a running unit:\n{postinst}"
    );
    let prerm = control_file(deb, "prerm");
    assert!(
        prerm.contains("\"$1\" = remove") && prerm.contains("stop"),
        "prerm must stop the unit on removal only:\n{prerm}"
    );
}

#[test]
fn debian_packages_build_clean_with_verified_units_man_pages_and_completions() {
    if !root_or_skip(
        "packaging",
        &["lintian", "systemd-analyze", "dpkg-deb", "man", "bash"],
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (controller, agent) = build_debs(&tmp.path().join("debs"));

    // What each package holds.
    let c = contents(&controller);
    assert_has(&c, "/usr/bin/bulwark-controller", "-rwxr-xr-x");
    assert_has(
        &c,
        "/usr/share/man/man1/bulwark-controller.1.gz",
        "-rw-r--r--",
    );
    assert_has(
        &c,
        "/usr/share/man/man1/bulwark-controller-serve.1.gz",
        "-rw-r--r--",
    );
    assert_has(
        &c,
        "/usr/share/bash-completion/completions/bulwark-controller",
        "-rw-r--r--",
    );
    assert_has(
        &c,
        "/usr/share/zsh/vendor-completions/_bulwark-controller",
        "-rw-r--r--",
    );
    assert_has(
        &c,
        "/usr/share/fish/vendor_completions.d/bulwark-controller.fish",
        "-rw-r--r--",
    );
    assert_has(&c, "/etc/bulwark/controller.toml.example", "-rw-------");
    assert_has(
        &c,
        "/usr/lib/systemd/system/bulwark-controller.service",
        "-rw-r--r--",
    );
    let a = contents(&agent);
    assert_has(&a, "/usr/sbin/bulwark-agent", "-rwxr-xr-x");
    assert_has(&a, "/usr/share/man/man8/bulwark-agent.8.gz", "-rw-r--r--");
    assert_has(
        &a,
        "/usr/share/bash-completion/completions/bulwark-agent",
        "-rw-r--r--",
    );
    assert_has(
        &a,
        "/usr/share/zsh/vendor-completions/_bulwark-agent",
        "-rw-r--r--",
    );
    assert_has(
        &a,
        "/usr/share/fish/vendor_completions.d/bulwark-agent.fish",
        "-rw-r--r--",
    );
    assert_has(&a, "/etc/bulwark/agent.toml.example", "-rw-------");
    assert_has(
        &a,
        "/usr/lib/systemd/system/bulwark-agent.service",
        "-rw-r--r--",
    );
    assert_eq!(
        control_file(&controller, "conffiles").trim(),
        "/etc/bulwark/controller.toml.example"
    );
    assert_eq!(
        control_file(&agent, "conffiles").trim(),
        "/etc/bulwark/agent.toml.example"
    );
    check_scripts(&controller, "bulwark-controller.service");
    check_scripts(&agent, "bulwark-agent.service");

    // Extract both into one tree.
    let tree = tmp.path().join("root");
    for deb in [&controller, &agent] {
        sh(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tree));
    }

    // systemd-analyze verify, in the extracted tree (so it checks the packaged binaries exist
    // and the Documentation= man pages open), with the host's own units beside ours.
    let units = tree.join("usr/lib/systemd/system");
    sh(Command::new("cp")
        .args(["-rn", "/usr/lib/systemd/system/."])
        .arg(&units));
    let man_path = tree.join("usr/share/man");
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", tree.display()))
        .arg(units.join("bulwark-controller.service"))
        .arg(units.join("bulwark-agent.service"))
        .env("MANPATH", &man_path)
        .output()
        .unwrap();
    assert!(
        o.status.success() && stderr_of(&o).trim().is_empty() && stdout_of(&o).trim().is_empty(),
        "systemd-analyze verify ({}):\n{}{}",
        o.status,
        stdout_of(&o),
        stderr_of(&o)
    );
    // The unit settings the agent's freeze guardian and the controller's validation rely on.
    let agent_unit = std::fs::read_to_string(units.join("bulwark-agent.service")).unwrap();
    for line in [
        "KillMode=process",
        "Restart=on-failure",
        "RuntimeDirectoryPreserve=yes",
        "After=local-fs.target network-online.target",
        "NoNewPrivileges=yes",
        "ProtectSystem=full",
    ] {
        assert!(
            agent_unit.lines().any(|l| l == line),
            "bulwark-agent.service lacks {line}"
        );
    }
    let controller_unit =
        std::fs::read_to_string(units.join("bulwark-controller.service")).unwrap();
    for line in [
        "ExecStartPre=/usr/bin/bulwark-controller serve --check --config /etc/bulwark/controller.toml",
        "StateDirectory=bulwark",
        "Restart=on-failure",
    ] {
        assert!(
            controller_unit.lines().any(|l| l == line),
            "bulwark-controller.service lacks {line}"
        );
    }

    // lintian: no errors. Warnings and info are shown.
    let o = Command::new("lintian")
        .args(["--fail-on", "error"])
        .arg(&controller)
        .arg(&agent)
        .output()
        .unwrap();
    let report = format!("{}{}", stdout_of(&o), stderr_of(&o));
    eprintln!("lintian:\n{report}");
    assert!(
        o.status.success() && !report.lines().any(|l| l.starts_with("E:")),
        "lintian reports errors ({}):\n{report}",
        o.status
    );

    // `man bulwark-controller` and `man 8 bulwark-agent` render from the packaged pages.
    for (page, want) in [
        (vec!["bulwark-controller"], "bulwark-controller-backup(1)"),
        (vec!["8", "bulwark-agent"], "--config"),
    ] {
        let o = Command::new("man")
            .args(&page)
            .env("MANPATH", &man_path)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output()
            .unwrap();
        let text = stdout_of(&o);
        assert!(
            o.status.success() && text.contains("NAME") && text.contains(want),
            "man {page:?} ({}): {}\n{text}",
            o.status,
            stderr_of(&o)
        );
        assert!(
            stderr_of(&o).trim().is_empty(),
            "man {page:?} warns: {}",
            stderr_of(&o)
        );
    }
    // The same, through `man -l` on the file itself.
    let o = sh(Command::new("man")
        .arg("-l")
        .arg(man_path.join("man1/bulwark-controller-serve.1.gz"))
        .env("MANPAGER", "cat"));
    assert!(stdout_of(&o).contains("--check"), "{}", stdout_of(&o));

    // The packaged bash completion: registered for the command, completes subcommands and the
    // subcommands of `key`.
    let completion = tree.join("usr/share/bash-completion/completions/bulwark-controller");
    let script = format!(
        r#"source '{}' || exit 3
spec=$(complete -p bulwark-controller) || exit 4
echo "SPEC $spec"
fn=$(sed -n 's/.*-F \([^ ]*\).*/\1/p' <<<"$spec")
complete_words() {{
    COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMP_LINE="$*"; COMP_POINT=${{#COMP_LINE}}
    COMPREPLY=()
    "$fn" bulwark-controller "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
    echo "$* => ${{COMPREPLY[*]}}"
}}
complete_words bulwark-controller ba
complete_words bulwark-controller ve
complete_words bulwark-controller key c
complete_words bulwark-controller backup --no-c
"#,
        completion.display()
    );
    let o = sh(Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &script])
        .env("TERM", "dumb"));
    let text = stdout_of(&o);
    assert!(
        text.starts_with("SPEC complete ") && text.contains(" -F _"),
        "no completion function registered:\n{text}"
    );
    for (words, want) in [
        ("bulwark-controller ba", "backup"),
        ("bulwark-controller ve", "verify"),
        ("bulwark-controller key c", "create change-passphrase"),
        ("bulwark-controller backup --no-c", "--no-change-tracking"),
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{words} =>")))
            .unwrap_or_else(|| panic!("no completion for {words:?}:\n{text}"));
        let got = line.split("=>").nth(1).unwrap_or_default().trim();
        let mut got: Vec<&str> = got.split_whitespace().collect();
        got.sort_unstable();
        let mut want: Vec<&str> = want.split_whitespace().collect();
        want.sort_unstable();
        assert_eq!(got, want, "completion of {words:?}");
    }

    // The packaged controller's `serve --check` (the unit's ExecStartPre) accepts the packaged
    // example once its paths exist, and refuses a broken configuration with the reason.
    let example =
        std::fs::read_to_string(tree.join("etc/bulwark/controller.toml.example")).unwrap();
    let image = tmp.path().join("web01.img");
    std::fs::write(&image, b"").unwrap();
    let config = tmp.path().join("controller.toml");
    std::fs::write(
        &config,
        example
            .replace(
                "/var/lib/libvirt/images/web01.img",
                &image.display().to_string(),
            )
            .replace(
                "/var/lib/bulwark",
                &tmp.path().join("state").display().to_string(),
            ),
    )
    .unwrap();
    let packaged = tree.join("usr/bin/bulwark-controller");
    sh(Command::new(&packaged)
        .args(["serve", "--check", "--config"])
        .arg(&config));
    assert!(
        !tmp.path().join("state").exists(),
        "serve --check must not create the state directory"
    );
    std::fs::write(&config, example.replace("[[vm]]", "[[vms]]")).unwrap();
    let o = Command::new(&packaged)
        .args(["serve", "--check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        !o.status.success() && stderr_of(&o).contains("vms"),
        "serve --check accepted a broken configuration: {}",
        stderr_of(&o)
    );
    // The agent's example parses as it is.
    let agent_example = tree.join("etc/bulwark/agent.toml.example");
    let text = std::fs::read_to_string(&agent_example).unwrap();
    bulwark_agent::Config::parse(&text, &agent_example)
        .unwrap_or_else(|e| panic!("the packaged agent.toml.example: {e}"));
}
