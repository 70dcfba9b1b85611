//! Discovery of a VM's writable disks (`query-block`).

use crate::{Error, Qmp};

/// One writable disk of a running VM, as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDisk {
    /// The disk's name: the block device name (`-drive id=NAME`), or, for a `-blockdev` disk
    /// with no device name, the id of the guest device it is attached to (or its QOM path).
    pub name: String,
    /// The node name of the disk's top (format) node, where bitmaps live.
    pub node: String,
    /// The format driver (`qcow2`, `raw`, ...).
    pub format: String,
    /// The image file name.
    pub file: String,
    /// The guest-visible size in bytes.
    pub size: u64,
}

impl VmDisk {
    /// Whether dirty bitmaps on this disk persist in the image (qcow2 only).
    pub fn persistent_bitmaps(&self) -> bool {
        self.format == "qcow2"
    }
}

/// The name a disk goes by: the device name, else the device id from the QOM path
/// `/machine/peripheral/ID/...`, else the QOM path itself.
fn disk_name(device: &str, qdev: Option<&str>) -> Option<String> {
    if !device.is_empty() {
        return Some(device.to_string());
    }
    let qdev = qdev?;
    if let Some(rest) = qdev.strip_prefix("/machine/peripheral/")
        && let Some(id) = rest.split('/').next()
        && !id.is_empty()
    {
        return Some(id.to_string());
    }
    Some(qdev.to_string())
}

/// The VM's writable disks with a medium, in QEMU's order.
pub async fn discover(qmp: &Qmp) -> Result<Vec<VmDisk>, Error> {
    let blocks = qmp.run(qapi::qmp::query_block {}, "").await?;
    let mut disks = Vec::new();
    for block in blocks {
        let Some(inserted) = block.inserted else {
            continue;
        };
        if inserted.ro {
            continue;
        }
        let Some(name) = disk_name(&block.device, block.qdev.as_deref()) else {
            continue;
        };
        let disk_err = |reason: String| Error::Disk {
            socket: qmp.socket().to_path_buf(),
            disk: name.clone(),
            reason,
        };
        let node = inserted
            .node_name
            .clone()
            .ok_or_else(|| disk_err("QEMU reports no node name".into()))?;
        let size = u64::try_from(inserted.image.base.virtual_size).map_err(|_| {
            disk_err(format!(
                "negative size {}",
                inserted.image.base.virtual_size
            ))
        })?;
        disks.push(VmDisk {
            name,
            node,
            format: inserted.drv.clone(),
            file: inserted.file.clone(),
            size,
        });
    }
    Ok(disks)
}

/// The disks named in `wanted` (all writable disks when it is empty), with a clear error for a
/// name the VM does not have.
pub fn select(qmp: &Qmp, disks: Vec<VmDisk>, wanted: &[String]) -> Result<Vec<VmDisk>, Error> {
    if disks.is_empty() {
        return Err(Error::NoDisks {
            socket: qmp.socket().to_path_buf(),
        });
    }
    if wanted.is_empty() {
        return Ok(disks);
    }
    let mut chosen = Vec::new();
    for w in wanted {
        match disks.iter().find(|d| &d.name == w) {
            Some(d) => chosen.push(d.clone()),
            None => {
                return Err(Error::NoSuchDisk {
                    socket: qmp.socket().to_path_buf(),
                    disk: w.clone(),
                    known: disks
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_device_or_qdev_id() {
        assert_eq!(disk_name("os", None).as_deref(), Some("os"));
        assert_eq!(
            disk_name("", Some("/machine/peripheral/datadev/virtio-backend")).as_deref(),
            Some("datadev")
        );
        assert_eq!(
            disk_name(
                "",
                Some("/machine/peripheral-anon/device[0]/virtio-backend")
            )
            .as_deref(),
            Some("/machine/peripheral-anon/device[0]/virtio-backend")
        );
        assert_eq!(disk_name("", None), None);
    }
}
