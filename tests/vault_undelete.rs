//! `vault undelete` on a real S3 server (moto) with Object Lock: a point's objects deleted
//! with the vault's own credentials (plain DELETEs, which only add delete markers) vanish from
//! `list`; `vault undelete --dry-run` names the point and changes nothing; `vault undelete`
//! removes the markers, the point lists again, restores bit-exact and `verify` is clean.
#![allow(clippy::unwrap_used)]

mod vault_servers;

use std::process::{Command, Output};

use bulwark_tests::{controller_bin, stderr_of};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use vault_servers::{Place, noise, s3_bucket_place};

fn cli(place: &Place, args: &[&str]) -> Output {
    place
        .controller(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn ok(out: Output, what: &str) -> Output {
    assert!(out.status.success(), "{what}: {}", stderr_of(&out));
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap()
}

fn points(place: &Place) -> Vec<String> {
    let out = ok(
        cli(
            place,
            &[
                "list",
                "--vault",
                &place.location,
                "--vm",
                "web01",
                "--json",
            ],
        ),
        "list",
    );
    json(&out)["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn undelete_brings_back_a_point_hidden_by_plain_deletes() {
    let Some(place) = s3_bucket_place("vault_undelete", true).await else {
        return;
    };
    let v = place.location.clone();
    ok(
        cli(
            &place,
            &[
                "init",
                "--vault",
                &v,
                "--block-size",
                "64KiB",
                "--immutable-days",
                "1",
            ],
        ),
        "init",
    );
    let image = place.dir.path().join("os.img");
    let data = noise(7, 1 << 20);
    std::fs::write(&image, &data).unwrap();
    let disk = format!("os={}", image.display());
    let out = ok(
        cli(
            &place,
            &[
                "backup", "--vault", &v, "--vm", "web01", "--disk", &disk, "--json",
            ],
        ),
        "backup",
    );
    let id = json(&out)["point"].as_str().unwrap().to_string();
    assert_eq!(points(&place), std::slice::from_ref(&id));

    // The thief: every point, manifest and block deleted with the vault's credentials.
    let store = bulwark_vault::location::open_store(&v, &place.options.store, false).unwrap();
    let mut deleted = 0;
    for prefix in ["points", "manifests", "blocks"] {
        let keys: Vec<_> = store
            .list(Some(&prefix.into()))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .unwrap();
        for k in keys {
            store.delete(&k).await.unwrap();
            deleted += 1;
        }
    }
    assert!(deleted > 16, "{deleted} objects deleted");
    assert!(points(&place).is_empty(), "the point is hidden");
    let to = place.dir.path().join("restored.img");
    let restore = |place: &Place| {
        cli(
            place,
            &[
                "restore",
                "--vault",
                &v,
                "--vm",
                "web01",
                "--point",
                &id,
                "--disk",
                "os",
                "--to",
                &to.display().to_string(),
                "--force",
            ],
        )
    };
    assert!(
        !restore(&place).status.success(),
        "a hidden point cannot restore"
    );

    // A dry run names the point and changes nothing.
    let out = ok(
        cli(
            &place,
            &[
                "vault",
                "undelete",
                "--vault",
                &v,
                "--vm",
                "web01",
                "--dry-run",
                "--json",
            ],
        ),
        "vault undelete --dry-run",
    );
    let r = json(&out);
    assert_eq!(
        r["points"],
        serde_json::json!([format!("web01/{id}")]),
        "{r}"
    );
    assert!(points(&place).is_empty());

    let out = ok(
        cli(
            &place,
            &[
                "vault", "undelete", "--vault", &v, "--vm", "web01", "--json",
            ],
        ),
        "vault undelete",
    );
    let r = json(&out);
    assert_eq!(
        r["points"],
        serde_json::json!([format!("web01/{id}")]),
        "{r}"
    );
    assert_eq!(r["manifests"], 1, "{r}");
    assert_eq!(r["blocks"], 16, "{r}");
    assert_eq!(points(&place), std::slice::from_ref(&id));
    ok(restore(&place), "restore");
    assert!(std::fs::read(&to).unwrap() == data, "restored bytes differ");
    ok(cli(&place, &["verify", "--vault", &v]), "verify");

    // Again: nothing left to bring back.
    let out = ok(
        cli(&place, &["vault", "undelete", "--vault", &v, "--json"]),
        "vault undelete again",
    );
    assert_eq!(json(&out)["markers_removed"], 0);
}

/// A local vault is refused with a clear error.
#[test]
fn undelete_refuses_a_vault_that_is_not_immutable_s3() {
    let dir = tempfile::tempdir().unwrap();
    let v = dir.path().join("vault").display().to_string();
    let out = Command::new(controller_bin())
        .args(["init", "--vault", &v])
        .env_remove("BULWARK_VAULT")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let out = Command::new(controller_bin())
        .args(["vault", "undelete", "--vault", &v])
        .env_remove("BULWARK_VAULT")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("immutable S3 vault"),
        "{}",
        stderr_of(&out)
    );
}
