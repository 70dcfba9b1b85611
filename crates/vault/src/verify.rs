//! `verify`: proves that every committed point restores, reading every object it needs.

use std::collections::{BTreeMap, BTreeSet};

use bulwark_blockdiff::Address;
use futures::StreamExt;

use crate::{Error, ManifestRef, Vault, block_key};

/// Something wrong in the vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The object key at fault.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
    /// The points (`vm/point`) that cannot be restored because of it.
    pub points: Vec<String>,
    /// The disks (`vm/point/disk`) that need it (for a block; empty otherwise).
    pub disks: Vec<String>,
}

/// The result of [`Vault::verify`].
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Points checked.
    pub points: usize,
    /// Manifests checked.
    pub manifests: usize,
    /// Distinct blocks read and verified.
    pub blocks: usize,
    /// Plain bytes of those blocks.
    pub bytes: u64,
    /// Everything found wrong. Empty means every point restores.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The points that cannot be restored.
    pub fn broken_points(&self) -> BTreeSet<&str> {
        self.problems
            .iter()
            .flat_map(|p| p.points.iter().map(String::as_str))
            .collect()
    }
}

impl Vault {
    /// Verifies every point of `vm` (or of the whole vault): reads each point, each manifest it
    /// pins, and each distinct block they reference, checking every digest. `progress` is
    /// called with (blocks verified, blocks to verify).
    pub async fn verify(
        &self,
        vm: Option<&str>,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<VerifyReport, Error> {
        let list = self.list_points(vm).await?;
        let mut report = VerifyReport {
            points: list.points.len() + list.broken.len(),
            ..Default::default()
        };
        for (key, e) in &list.broken {
            let point = key
                .strip_prefix("points/")
                .and_then(|k| k.strip_suffix(".json"))
                .unwrap_or(key)
                .to_string();
            report.problems.push(Problem {
                key: key.clone(),
                message: e.to_string(),
                points: vec![point],
                disks: Vec::new(),
            });
        }
        // Which points, and which of their disks, need which block.
        let mut blocks: BTreeMap<Address, (Vec<String>, Vec<String>)> = BTreeMap::new();
        for p in &list.points {
            let name = format!("{}/{}", p.vm, p.id);
            for d in &p.disks {
                report.manifests += 1;
                let m = ManifestRef {
                    vm: &p.vm,
                    disk: &d.name,
                    point: &p.id,
                };
                match self.get_manifest_of(&m, d).await {
                    Ok(map) => {
                        if map.disk_size() != d.size {
                            report.problems.push(Problem {
                                key: m.to_string(),
                                message: format!(
                                    "manifest is for a disk of {} bytes, the point says {}",
                                    map.disk_size(),
                                    d.size
                                ),
                                points: vec![name.clone()],
                                disks: vec![format!("{name}/{}", d.name)],
                            });
                        }
                        let mine: BTreeSet<Address> = map.addresses().copied().collect();
                        for a in mine {
                            let (points, disks) = blocks.entry(a).or_default();
                            if points.last() != Some(&name) {
                                points.push(name.clone());
                            }
                            disks.push(format!("{name}/{}", d.name));
                        }
                    }
                    Err(e) => report.problems.push(Problem {
                        key: m.to_string(),
                        message: e.to_string(),
                        points: vec![name.clone()],
                        disks: vec![format!("{name}/{}", d.name)],
                    }),
                }
            }
        }
        let total = blocks.len() as u64;
        let mut done = 0u64;
        progress(0, total);
        let mut results = futures::stream::iter(blocks)
            .map(|(address, needed)| async move {
                let r = self.get_block(address).await;
                (address, needed, r)
            })
            .buffer_unordered(self.concurrency());
        while let Some((address, (points, disks), r)) = results.next().await {
            done += 1;
            progress(done, total);
            match r {
                Ok(data) => {
                    report.blocks += 1;
                    report.bytes += data.len() as u64;
                }
                Err(e) => report.problems.push(Problem {
                    key: block_key(&address).to_string(),
                    message: e.to_string(),
                    points,
                    disks,
                }),
            }
        }
        report.problems.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(report)
    }
}
