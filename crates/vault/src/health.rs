//! Known-bad blocks: what `verify` found damaged or missing, recorded in the vault so that the
//! next backup of a disk that still holds the data can heal it.
//!
//! ```text
//! health/bad-blocks/<64 hex>.json    one record per bad block address
//! ```
//!
//! [`Vault::record_bad_blocks`] writes a record for each block problem of a
//! [`VerifyReport`]: the key, what was wrong, when, and the points that
//! need it (at most [`MAX_POINTS_PER_RECORD`] named). [`Vault::known_bad_blocks`] reads them
//! back (each read bounded; a record that cannot be read still marks its address as bad).
//! [`Vault::repair_block`] stores a block's content again over whatever is under its key
//! (content-addressed: the right content is the only content it may hold), reads it back
//! verified, and only then removes the record.
//!
//! The backup's side (the next round of work, in the controller): load the known-bad set
//! when a backup starts; an entry of the previous manifest whose address is in it is never
//! reused unread: the block is read from the snapshot, and when its address matches, it is
//! repaired with [`Vault::repair_block`]; a point is never committed while it references a
//! block still known bad. `list` names the points a record lists as broken.

use std::collections::BTreeMap;

use bulwark_blockdiff::Address;
use bytes::Bytes;
use futures::TryStreamExt;
use jiff::Timestamp;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::envelope::Kind;
use crate::{Error, Vault, VerifyReport, block_key};

/// Where the records live.
pub const BAD_BLOCKS_PREFIX: &str = "health/bad-blocks";

/// The most points one record names (the rest are counted).
pub const MAX_POINTS_PER_RECORD: usize = 1000;

/// The largest record read.
const MAX_RECORD_BYTES: u64 = 256 * 1024;

/// A block `verify` found bad.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadBlock {
    /// The block's address (hex).
    pub address: String,
    /// Its object key.
    pub key: String,
    /// What was wrong (missing, corrupt: why).
    pub why: String,
    /// When verify found it.
    pub found: Timestamp,
    /// Points (`vm/point`) that need it, at most [`MAX_POINTS_PER_RECORD`].
    pub points: Vec<String>,
    /// How many points need it in all.
    pub points_total: usize,
    /// The disks (`vm/point/disk`) that need it, at most [`MAX_POINTS_PER_RECORD`].
    #[serde(default)]
    pub disks: Vec<String>,
}

impl BadBlock {
    /// The disks of point `vm`/`id` that need this block (names only).
    pub fn disks_of(&self, vm: &str, id: &str) -> Vec<&str> {
        let prefix = format!("{vm}/{id}/");
        self.disks
            .iter()
            .filter_map(|d| d.strip_prefix(&prefix))
            .collect()
    }

    /// Whether this record names point `vm`/`id`.
    pub fn names_point(&self, vm: &str, id: &str) -> bool {
        let name = format!("{vm}/{id}");
        self.points.contains(&name)
    }
}

fn record_key(address: &Address) -> ObjPath {
    ObjPath::from(format!("{BAD_BLOCKS_PREFIX}/{}.json", address.to_hex()))
}

impl Vault {
    /// Records every bad block of `report` (missing or corrupt block objects) under
    /// `health/bad-blocks/`. Returns how many records were written.
    pub async fn record_bad_blocks(&self, report: &VerifyReport) -> Result<usize, Error> {
        let now = Timestamp::now();
        let mut n = 0;
        for p in &report.problems {
            let Some(address) = p
                .key
                .strip_prefix("blocks/")
                .and_then(|k| k.rsplit('/').next())
                .and_then(Address::from_hex)
            else {
                continue;
            };
            let record = BadBlock {
                address: address.to_hex(),
                key: p.key.clone(),
                why: p.message.clone(),
                found: now,
                points: p
                    .points
                    .iter()
                    .take(MAX_POINTS_PER_RECORD)
                    .cloned()
                    .collect(),
                points_total: p.points.len(),
                disks: p
                    .disks
                    .iter()
                    .take(MAX_POINTS_PER_RECORD)
                    .cloned()
                    .collect(),
            };
            let json =
                serde_json::to_vec_pretty(&record).map_err(|e| Error::Worker(e.to_string()))?;
            let key = record_key(&address);
            self.store
                .put(&key, PutPayload::from(json))
                .await
                .map_err(|e| Error::store(&key, e))?;
            n += 1;
        }
        Ok(n)
    }

    /// The blocks recorded as bad, by address. A record that cannot be read or parsed still
    /// marks the address its key names (with the read error as `why`).
    pub async fn known_bad_blocks(&self) -> Result<BTreeMap<Address, BadBlock>, Error> {
        let prefix = ObjPath::from(BAD_BLOCKS_PREFIX);
        // Every backup lists these first: a transient store error is retried like any other
        // idempotent request, not allowed to fail the job.
        let metas: Vec<_> = crate::retry::retry(&self.retry, prefix.as_ref(), |_| {
            self.store.list(Some(&prefix)).try_collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Error::store(&prefix, e))?;
        let mut out = BTreeMap::new();
        for meta in metas {
            let Some(address) = meta
                .location
                .filename()
                .and_then(|f| f.strip_suffix(".json"))
                .and_then(Address::from_hex)
            else {
                continue;
            };
            let read = self
                .get_raw_within(&meta.location, "bad-block record", MAX_RECORD_BYTES)
                .await;
            let record = match read {
                Err(Error::Missing { .. }) => continue,
                Ok(raw) => serde_json::from_slice::<BadBlock>(&raw)
                    .ok()
                    .filter(|r| r.address == address.to_hex()),
                Err(_) => None,
            };
            let record = record.unwrap_or_else(|| BadBlock {
                address: address.to_hex(),
                key: block_key(&address).to_string(),
                why: format!("{}: unreadable bad-block record", meta.location),
                found: Timestamp::UNIX_EPOCH,
                points: Vec::new(),
                points_total: 0,
                disks: Vec::new(),
            });
            out.insert(address, record);
        }
        Ok(out)
    }

    /// Reads again every recorded block that `still_bad` does not name (a verify that just
    /// found those bad), and removes the record of each that now reads back verified (healed
    /// meanwhile). Returns how many records were removed.
    pub async fn clear_healed_records(
        &self,
        still_bad: &std::collections::BTreeSet<Address>,
    ) -> Result<usize, Error> {
        let mut cleared = 0;
        for address in self.known_bad_blocks().await?.into_keys() {
            if still_bad.contains(&address) || self.get_block(address).await.is_err() {
                continue;
            }
            self.remove_bad_record(&address).await?;
            cleared += 1;
        }
        Ok(cleared)
    }

    async fn remove_bad_record(&self, address: &Address) -> Result<(), Error> {
        let record = record_key(address);
        match self.store.delete(&record).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::store(&record, e)),
        }
    }

    /// [`Vault::list_points`], with the damage recorded by `verify`: for each point that needs
    /// a block known bad, the records of those blocks (`"vm/point"` → records).
    pub async fn list_points_with_health(
        &self,
        vm: Option<&str>,
    ) -> Result<crate::PointList, Error> {
        let mut list = self.list_points(vm).await?;
        let bad = self.known_bad_blocks().await?;
        for p in &list.points {
            let damage: Vec<BadBlock> = bad
                .values()
                .filter(|b| b.names_point(&p.vm, &p.id))
                .cloned()
                .collect();
            if !damage.is_empty() {
                list.damaged.insert(format!("{}/{}", p.vm, p.id), damage);
            }
        }
        Ok(list)
    }

    /// Stores `data` again under its address, over a damaged object (or in place of a
    /// missing one), reads it back verified, and removes the bad-block record. `data` must
    /// be the block's content: its address is checked first, so wrong data is refused.
    /// Returns the stored bytes written.
    pub async fn repair_block(&self, address: Address, data: Bytes) -> Result<u64, Error> {
        let key = block_key(&address);
        if self.address_of(&data) != address {
            return Err(Error::Corrupt {
                key: key.to_string(),
                why: "repair refused: the data given is not this block's content".into(),
            });
        }
        let level = self.config.zstd_level();
        let this = self.clone();
        let k2 = key.clone();
        let sealed =
            crate::blocking(move || this.seal(Kind::Block, &k2, &data, level, Some(address.0)))
                .await??;
        let stored = sealed.bytes.len() as u64;
        crate::retry::retry(&self.retry, key.as_ref(), |_| {
            let bytes = Bytes::from(sealed.bytes.clone());
            let key = &key;
            async move { self.store.put(key, PutPayload::from(bytes)).await }
        })
        .await
        .map_err(|e| Error::store(&key, e))?;
        self.get_block(address).await?;
        self.remove_bad_record(&address).await?;
        Ok(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{commit_map, mem};
    use bulwark_blockdiff::{BlockMap, BlockSize, Entry};

    #[tokio::test]
    async fn verify_findings_are_recorded_and_a_repair_heals_and_clears_them() {
        let v = mem().await;
        let bs = BlockSize::new(bulwark_blockdiff::MIN_BLOCK_SIZE).unwrap();
        let a_data = vec![1u8; bs.get() as usize];
        let b_data = vec![2u8; bs.get() as usize];
        let a = v.address_of(&a_data);
        let b = v.address_of(&b_data);
        v.put_block(a, Bytes::from(a_data.clone())).await.unwrap();
        v.put_block(b, Bytes::from(b_data.clone())).await.unwrap();
        let map = BlockMap::new(
            bs,
            2 * bs.bytes(),
            vec![
                Entry::Data {
                    change: 1,
                    address: a,
                },
                Entry::Data {
                    change: 2,
                    address: b,
                },
            ],
        )
        .unwrap();
        let p = commit_map(&v, "vm", &map).await;
        // One block deleted, one corrupted.
        v.store.delete(&block_key(&a)).await.unwrap();
        v.store
            .put(&block_key(&b), PutPayload::from_static(b"BWOB garbage"))
            .await
            .unwrap();
        let report = v.verify(None, &|_, _| {}).await.unwrap();
        assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
        assert_eq!(v.record_bad_blocks(&report).await.unwrap(), 2);
        let known = v.known_bad_blocks().await.unwrap();
        assert_eq!(known.keys().copied().collect::<Vec<_>>(), {
            let mut k = vec![a, b];
            k.sort();
            k
        });
        let rec = &known[&a];
        assert_eq!(rec.points, vec![format!("vm/{}", p.id)]);
        assert!(rec.why.contains("missing"), "{}", rec.why);

        // Wrong data is refused; the right data heals each and clears its record.
        let e = v
            .repair_block(a, Bytes::from(b_data.clone()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("repair refused"), "{e}");
        v.repair_block(a, Bytes::from(a_data)).await.unwrap();
        v.repair_block(b, Bytes::from(b_data)).await.unwrap();
        assert!(v.known_bad_blocks().await.unwrap().is_empty());
        assert!(v.verify(None, &|_, _| {}).await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn an_unreadable_record_still_marks_its_block() {
        let v = mem().await;
        let a = v.address_of(b"x");
        v.store
            .put(&record_key(&a), PutPayload::from_static(b"{not json"))
            .await
            .unwrap();
        let known = v.known_bad_blocks().await.unwrap();
        assert!(known[&a].why.contains("unreadable"), "{:?}", known[&a]);
    }
}
