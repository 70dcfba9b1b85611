//! Who backs up a VM: an ownership record per VM, like a backup group's owner in Proxmox
//! Backup Server.
//!
//! A VM's ownership record names the controller (its host name,
//! [`crate::OpenOptions::host`]) that backs the VM up. A backup from any other host is refused
//! with [`Error::NotOwner`], unless it is told to take the VM over ([`Vault::claim_vm`] with
//! `take_over`); the previous owner's next backup is then refused. Two controllers sharing one
//! vault with overlapping VM sets thus never interleave points of one VM.
//!
//! # Generations
//!
//! Records are never rewritten: each is a create-only write (`PutMode::Create`) of a new key.
//! The first claim writes generation 0 at `owners/<vm>.json`; a take-over of generation `n`
//! writes generation `n + 1` at `owners/takeovers/<vm>/<n + 1>.json` (20 digits), naming the
//! owner it took the VM from. The VM's owner is the record of the highest generation. Of two
//! hosts claiming or taking over the same generation at once, exactly one write succeeds; the
//! other is refused by the store and gets [`Error::ClaimLost`] naming the winner, having
//! written nothing. This works on every backend that honours create-only writes (local
//! directories, S3, Azure Blob); the older records stay as the VM's history.
//!
//! On a store found to ignore conditional writes
//! ([`VaultConfig::conditional_writes`](crate::VaultConfig::conditional_writes) `Some(false)`),
//! the second write of a generation silently replaces the first: two simultaneous take-overs
//! may then both believe they won (the last writer holds the record). Nothing can detect that
//! there; a take-over warns about it.

use bytes::Bytes;
use futures::TryStreamExt;
use jiff::Timestamp;
use object_store::path::Path as ObjPath;
use serde::{Deserialize, Serialize};

use crate::{Error, Vault, bounded, put_create, validate_name};

/// The largest ownership record read.
const MAX_OWNER_BYTES: u64 = 64 << 10;

/// The ownership record of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    /// The VM.
    pub vm: String,
    /// The controller that backs it up (its host name).
    pub owner: String,
    /// Since when.
    pub since: Timestamp,
    /// The owner it was taken over from, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_over_from: Option<String>,
    /// 0 for the first claim, one more for each take-over (see [the module docs](self)).
    #[serde(default)]
    pub generation: u64,
}

/// The key of `vm`'s first ownership record (generation 0).
pub fn owner_key(vm: &str) -> ObjPath {
    ObjPath::from(format!("owners/{vm}.json"))
}

/// The prefix under which `vm`'s take-over records live.
fn takeover_prefix(vm: &str) -> ObjPath {
    ObjPath::from(format!("owners/takeovers/{vm}"))
}

/// The key of `vm`'s ownership record of `generation` (0: [`owner_key`]).
pub fn owner_generation_key(vm: &str, generation: u64) -> ObjPath {
    if generation == 0 {
        owner_key(vm)
    } else {
        ObjPath::from(format!("owners/takeovers/{vm}/{generation:020}.json"))
    }
}

impl Vault {
    /// The host name this vault handle acts as (leases and ownership records name it).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The current ownership record of `vm` (its highest generation), if it has one.
    pub async fn vm_owner(&self, vm: &str) -> Result<Option<OwnerRecord>, Error> {
        validate_name("vm", vm)?;
        // The highest take-over generation, if any; names that are not ours are skipped.
        let prefix = takeover_prefix(vm);
        // Listed whole under the vault's retry policy, like the leases: a listing cut short
        // by a transient fault is repeated, never taken as "no take-over".
        let store = self.store.clone();
        let metas: Vec<_> = crate::retry::retry(&self.retry, prefix.as_ref(), |_| {
            store.list(Some(&prefix)).try_collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Error::store(&prefix, e))?;
        let mut highest: Option<u64> = None;
        for meta in metas {
            let generation = meta
                .location
                .filename()
                .and_then(|f| f.strip_suffix(".json"))
                .filter(|n| n.len() == 20)
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|&n| n > 0);
            match generation {
                Some(n) => highest = Some(highest.map_or(n, |h| h.max(n))),
                None => {
                    tracing::warn!(key = %meta.location, "not an ownership record name; ignored")
                }
            }
        }
        let generation = highest.unwrap_or(0);
        let key = owner_generation_key(vm, generation);
        match self.read_owner_record(&key, vm).await? {
            Some(r) if r.generation != generation => Err(Error::Corrupt {
                key: key.to_string(),
                why: format!("the record says generation {}", r.generation),
            }),
            Some(r) => Ok(Some(r)),
            // A listed take-over record that cannot be read is damage, not "no owner".
            None if generation > 0 => Err(Error::Corrupt {
                key: key.to_string(),
                why: "listed but not found".into(),
            }),
            None => Ok(None),
        }
    }

    async fn read_owner_record(
        &self,
        key: &ObjPath,
        vm: &str,
    ) -> Result<Option<OwnerRecord>, Error> {
        let got = bounded::get_capped(self.store.as_ref(), &self.retry, key, MAX_OWNER_BYTES).await;
        let bytes = match got {
            Ok(bounded::Capped::Read(b)) => b,
            Ok(bounded::Capped::TooLarge(size)) => {
                return Err(bounded::too_large(
                    key.as_ref(),
                    "ownership record",
                    size,
                    MAX_OWNER_BYTES,
                ));
            }
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(Error::store(key, e)),
        };
        let r: OwnerRecord = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
            key: key.to_string(),
            why: format!("not an ownership record: {e}"),
        })?;
        if r.vm != vm {
            return Err(Error::Corrupt {
                key: key.to_string(),
                why: format!("the record names VM {:?}", r.vm),
            });
        }
        Ok(Some(r))
    }

    /// Makes sure this host ([`Vault::host`]) owns `vm`: claims it when nobody does, refuses
    /// with [`Error::NotOwner`] when another host does, unless `take_over`. Of two hosts
    /// claiming or taking over at once, one wins; the other gets [`Error::ClaimLost`] naming
    /// the winner (on a store that honours conditional writes; see [the module docs](self)).
    pub async fn claim_vm(&self, vm: &str, take_over: bool) -> Result<OwnerRecord, Error> {
        let me = self.host().to_string();
        let current = self.vm_owner(vm).await?;
        let (generation, previous) = match &current {
            Some(r) if r.owner == me => return Ok(r.clone()),
            Some(r) if !take_over => {
                return Err(Error::NotOwner {
                    vm: vm.into(),
                    owner: r.owner.clone(),
                    me,
                });
            }
            Some(r) => (r.generation.saturating_add(1), Some(r.owner.clone())),
            None => (0, None),
        };
        if previous.is_some() && self.config().conditional_writes == Some(false) {
            tracing::warn!(
                vm,
                "this store ignores conditional writes: a simultaneous take-over by another \
                 host cannot be detected (both may believe they own the VM)"
            );
        }
        let record = OwnerRecord {
            vm: vm.into(),
            owner: me.clone(),
            since: Timestamp::now(),
            taken_over_from: previous.clone(),
            generation,
        };
        let mut json =
            serde_json::to_vec_pretty(&record).map_err(|e| Error::Worker(e.to_string()))?;
        json.extend_from_slice(b"\n");
        let key = owner_generation_key(vm, generation);
        if put_create(&self.store, &self.retry, &key, Bytes::from(json)).await? {
            match &previous {
                Some(p) => {
                    tracing::warn!(vm, owner = %me, previous = %p, generation, "VM taken over")
                }
                None => tracing::info!(vm, owner = %me, "VM claimed"),
            }
            return Ok(record);
        }
        // Another writer created this generation first: it won.
        let winner = self.vm_owner(vm).await?;
        match winner {
            Some(r) if r.owner == me => Ok(r),
            Some(r) => Err(Error::ClaimLost {
                vm: vm.into(),
                winner: r.owner,
                me,
                generation,
            }),
            None => Err(Error::Corrupt {
                key: key.to_string(),
                why: "the store refused to create it, yet no ownership record reads".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use object_store::memory::InMemory;

    use crate::{CreateOptions, OpenOptions, Vault};

    async fn as_host(store: &Arc<InMemory>, host: &str) -> Vault {
        let options = OpenOptions {
            host: Some(host.into()),
            ..OpenOptions::default()
        };
        Vault::open_store_with(store.clone(), "mem:", &options)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn each_vm_is_backed_up_by_its_owner_only() {
        let store = Arc::new(InMemory::new());
        Vault::create_store(store.clone(), "mem:", &CreateOptions::default())
            .await
            .unwrap();
        let (a, b) = (
            as_host(&store, "host-a").await,
            as_host(&store, "host-b").await,
        );
        assert_eq!(a.vm_owner("web").await.unwrap(), None);
        let r = a.claim_vm("web", false).await.unwrap();
        assert_eq!((r.owner.as_str(), r.taken_over_from), ("host-a", None));
        // Again: still ours.
        a.claim_vm("web", false).await.unwrap();
        let e = b.claim_vm("web", false).await.unwrap_err();
        assert!(
            matches!(&e, crate::Error::NotOwner { owner, .. } if owner == "host-a"),
            "{e}"
        );
        assert!(e.to_string().contains("--take-over"), "{e}");
        // Another VM is b's.
        b.claim_vm("db", false).await.unwrap();
        // Taken over: now a is refused.
        let r = b.claim_vm("web", true).await.unwrap();
        assert_eq!(r.taken_over_from.as_deref(), Some("host-a"));
        assert!(a.claim_vm("web", false).await.is_err());
        assert_eq!(
            a.vm_owner("web").await.unwrap().unwrap().owner,
            "host-b".to_string()
        );
        // Records are never rewritten: generation 0 still names host-a, generation 1 host-b.
        let r = b.vm_owner("web").await.unwrap().unwrap();
        assert_eq!((r.owner.as_str(), r.generation), ("host-b", 1));
        let first = a.read_owner_record(&super::owner_key("web"), "web").await;
        assert_eq!(first.unwrap().unwrap().owner, "host-a");
        // Taken back: generation 2.
        let r = a.claim_vm("web", true).await.unwrap();
        assert_eq!(
            (r.generation, r.taken_over_from.as_deref()),
            (2, Some("host-b"))
        );
        assert_eq!(b.vm_owner("web").await.unwrap().unwrap(), r);
        assert!(b.claim_vm("web", false).await.is_err());
    }

    #[tokio::test]
    async fn a_damaged_or_misplaced_record_is_an_error() {
        use object_store::{ObjectStoreExt, PutPayload};
        let store = Arc::new(InMemory::new());
        Vault::create_store(store.clone(), "mem:", &CreateOptions::default())
            .await
            .unwrap();
        let a = as_host(&store, "host-a").await;
        a.claim_vm("web", false).await.unwrap();
        // Generation 1 holding a record that says it is generation 0.
        let r = a.vm_owner("web").await.unwrap().unwrap();
        let json = serde_json::to_vec(&r).unwrap();
        store
            .put(
                &super::owner_generation_key("web", 1),
                PutPayload::from(json),
            )
            .await
            .unwrap();
        let e = a.vm_owner("web").await.unwrap_err();
        assert!(e.to_string().contains("generation 0"), "{e}");
        // Another VM's record in its place.
        store
            .put(
                &super::owner_generation_key("db", 0),
                PutPayload::from(serde_json::to_vec(&r).unwrap()),
            )
            .await
            .unwrap();
        let e = a.vm_owner("db").await.unwrap_err();
        assert!(e.to_string().contains("names VM"), "{e}");
    }
}
