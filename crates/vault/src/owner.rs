//! Who backs up a VM: an ownership record per VM, like a backup group's owner in Proxmox
//! Backup Server.
//!
//! `owners/<vm>.json` names the controller (its host name, [`crate::OpenOptions::host`]) that
//! backs the VM up. The first backup of a VM claims it (a create-only write: of two hosts
//! claiming at once, one wins and the other is refused). A backup from any other host is
//! refused with [`Error::NotOwner`], unless it is told to take the VM over
//! ([`Vault::claim_vm`] with `take_over`), which rewrites the record naming the previous
//! owner; the previous owner's next backup is then refused. Two controllers sharing one vault
//! with overlapping VM sets thus never interleave points of one VM.

use bytes::Bytes;
use jiff::Timestamp;
use object_store::path::Path as ObjPath;
use object_store::{PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::{Error, Vault, bounded, retry, validate_name};

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
}

/// The key of `vm`'s ownership record.
pub fn owner_key(vm: &str) -> ObjPath {
    ObjPath::from(format!("owners/{vm}.json"))
}

impl Vault {
    /// The host name this vault handle acts as (leases and ownership records name it).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The ownership record of `vm`, if it has one.
    pub async fn vm_owner(&self, vm: &str) -> Result<Option<OwnerRecord>, Error> {
        validate_name("vm", vm)?;
        let key = owner_key(vm);
        let got =
            bounded::get_capped(self.store.as_ref(), &self.retry, &key, MAX_OWNER_BYTES).await;
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
            Err(e) => return Err(Error::store(&key, e)),
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
    /// with [`Error::NotOwner`] when another host does, unless `take_over`.
    pub async fn claim_vm(&self, vm: &str, take_over: bool) -> Result<OwnerRecord, Error> {
        let me = self.host().to_string();
        for _ in 0..3 {
            let current = self.vm_owner(vm).await?;
            let (mode, previous) = match &current {
                Some(r) if r.owner == me => return Ok(r.clone()),
                Some(r) if !take_over => {
                    return Err(Error::NotOwner {
                        vm: vm.into(),
                        owner: r.owner.clone(),
                        me,
                    });
                }
                Some(r) => (PutMode::Overwrite, Some(r.owner.clone())),
                None => (PutMode::Create, None),
            };
            let record = OwnerRecord {
                vm: vm.into(),
                owner: me.clone(),
                since: Timestamp::now(),
                taken_over_from: previous.clone(),
            };
            let mut json =
                serde_json::to_vec_pretty(&record).map_err(|e| Error::Worker(e.to_string()))?;
            json.extend_from_slice(b"\n");
            let key = owner_key(vm);
            let bytes = Bytes::from(json);
            let put = retry::retry(&self.retry, key.as_ref(), |_| {
                let opts = PutOptions {
                    mode: mode.clone(),
                    ..Default::default()
                };
                self.store
                    .put_opts(&key, PutPayload::from(bytes.clone()), opts)
            })
            .await;
            match put {
                Ok(_) => {
                    match &previous {
                        Some(p) => tracing::warn!(vm, owner = %me, previous = %p, "VM taken over"),
                        None => tracing::info!(vm, owner = %me, "VM claimed"),
                    }
                    return Ok(record);
                }
                // Someone claimed it meanwhile (or a retry of ours landed): look again.
                Err(object_store::Error::AlreadyExists { .. }) => continue,
                Err(e) => return Err(Error::store(&key, e)),
            }
        }
        Err(Error::Worker(format!(
            "the ownership record of VM {vm} kept changing while it was claimed"
        )))
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
    }
}
