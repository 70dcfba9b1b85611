//! Mount discovery from `/proc/self/mountinfo` and the freeze order.
//!
//! The agent's configuration normally lists its mounts explicitly; discovery is the fallback
//! ("every local file system that can be frozen, minus a skip list").

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use crate::{Error, Result};

/// File-system types that support FIFREEZE and hold data worth freezing.
pub const FREEZABLE_FS_TYPES: &[&str] = &["ext3", "ext4", "xfs", "btrfs"];

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Mount id.
    pub id: u32,
    /// Parent mount id.
    pub parent: u32,
    /// `major:minor` of the device.
    pub device: String,
    /// Where it is mounted (octal escapes decoded).
    pub mount_point: PathBuf,
    /// Per-mount options, e.g. `rw,relatime`.
    pub mount_options: String,
    /// File-system type, e.g. `ext4`.
    pub fs_type: String,
    /// Mount source, e.g. `/dev/vda1`.
    pub source: String,
}

impl MountInfo {
    /// Whether the mount is read-only.
    pub fn read_only(&self) -> bool {
        self.mount_options.split(',').any(|o| o == "ro")
    }
}

/// Decodes the `\040`-style octal escapes of mountinfo fields.
fn unescape(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Parses the text of `/proc/self/mountinfo`, in mount order.
pub fn parse_mountinfo(text: &str) -> Result<Vec<MountInfo>> {
    let mut mounts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: &str| Error::MountInfo {
            line: n + 1,
            reason: reason.to_string(),
        };
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields
            .iter()
            .position(|f| *f == "-")
            .ok_or_else(|| bad("no ' - ' separator"))?;
        if sep < 6 || fields.len() < sep + 3 {
            return Err(bad("too few fields"));
        }
        mounts.push(MountInfo {
            id: fields[0].parse().map_err(|_| bad("bad mount id"))?,
            parent: fields[1].parse().map_err(|_| bad("bad parent id"))?,
            device: fields[2].to_string(),
            mount_point: unescape(fields[4]),
            mount_options: fields[5].to_string(),
            fs_type: fields[sep + 1].to_string(),
            source: unescape(fields[sep + 2]).to_string_lossy().into_owned(),
        });
    }
    Ok(mounts)
}

/// Reads and parses `/proc/self/mountinfo`.
pub fn read_mountinfo() -> Result<Vec<MountInfo>> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    parse_mountinfo(&text)
}

fn is_skipped(mount_point: &Path, skip: &[PathBuf]) -> bool {
    skip.iter().any(|s| s == mount_point)
}

/// The mounts to freeze among `mounts` (in mount order): writable mounts of a
/// [`FREEZABLE_FS_TYPES`] type whose mount point is not in `skip`, one per device, in reverse
/// mount order (so that a mount is frozen before the mount it is nested in).
pub fn freezable_mounts(mounts: &[MountInfo], skip: &[PathBuf]) -> Vec<PathBuf> {
    let mut seen_devices = HashSet::new();
    let mut seen_points = HashSet::new();
    let mut out = Vec::new();
    for m in mounts.iter().rev() {
        // A later mount on the same point hides the earlier one: only the top one counts.
        if !seen_points.insert(m.mount_point.clone()) {
            continue;
        }
        if !FREEZABLE_FS_TYPES.contains(&m.fs_type.as_str())
            || m.read_only()
            || is_skipped(&m.mount_point, skip)
        {
            continue;
        }
        // Bind mounts of one file system: freezing it once freezes all of them.
        if !seen_devices.insert(m.device.clone()) {
            continue;
        }
        out.push(m.mount_point.clone());
    }
    out
}

/// [`freezable_mounts`] of this process's mount table.
pub fn discover_freezable(skip: &[PathBuf]) -> Result<Vec<PathBuf>> {
    Ok(freezable_mounts(&read_mountinfo()?, skip))
}

fn depth(p: &Path) -> usize {
    p.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count()
}

/// Orders explicitly configured mounts for freezing: deeper paths first (a nested mount before
/// its parent), otherwise in the given order; duplicates removed. Thaw in the reverse order.
pub fn freeze_order<P: AsRef<Path>>(mounts: &[P]) -> Vec<PathBuf> {
    let mut seen = HashSet::new();
    let mut out: Vec<PathBuf> = mounts
        .iter()
        .map(|p| p.as_ref().components().collect::<PathBuf>())
        .filter(|p| seen.insert(p.clone()))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(depth(p)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
23 22 0:21 / /proc rw,nosuid - proc proc rw
24 22 252:2 / /data rw,relatime shared:2 - xfs /dev/vda2 rw,attr2
25 24 252:3 / /data/db rw - btrfs /dev/vda3 rw
26 22 252:4 / /mnt/old rw - ext3 /dev/vda4 rw
27 22 252:5 / /mnt/ro ro,relatime - ext4 /dev/vda5 ro
28 22 252:2 /sub /srv/bind rw - xfs /dev/vda2 rw
29 22 0:30 / /tmp rw - tmpfs tmpfs rw
30 22 252:6 / /mnt/with\\040space rw - ext4 /dev/vda6 rw
";

    #[test]
    fn parses_fields_and_escapes() {
        let m = parse_mountinfo(SAMPLE).unwrap();
        assert_eq!(m.len(), 9);
        assert_eq!(m[2].mount_point, PathBuf::from("/data"));
        assert_eq!(m[2].fs_type, "xfs");
        assert_eq!(m[2].source, "/dev/vda2");
        assert_eq!(m[2].parent, 22);
        assert_eq!(m[8].mount_point, PathBuf::from("/mnt/with space"));
        assert!(m[5].read_only());
    }

    #[test]
    fn optional_fields_are_skipped() {
        let line = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:7 - ext3 /dev/root rw,errors=continue\n";
        let m = parse_mountinfo(line).unwrap();
        assert_eq!(m[0].fs_type, "ext3");
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt2"));
    }

    #[test]
    fn malformed_lines_are_errors() {
        assert!(matches!(
            parse_mountinfo("1 2 3\n"),
            Err(Error::MountInfo { line: 1, .. })
        ));
        assert!(parse_mountinfo("x 1 0:1 / / rw - ext4 /dev/a rw").is_err());
    }

    #[test]
    fn freezable_in_reverse_order_minus_skips_ro_binds_and_other_types() {
        let m = parse_mountinfo(SAMPLE).unwrap();
        let got = freezable_mounts(&m, &[PathBuf::from("/mnt/old")]);
        let want: Vec<PathBuf> = ["/mnt/with space", "/data/db", "/data", "/"]
            .iter()
            .map(PathBuf::from)
            .collect();
        // /srv/bind is the same device as /data and comes later: it is the one kept.
        let want_bind: Vec<PathBuf> = ["/mnt/with space", "/srv/bind", "/data/db", "/"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_ne!(got, want);
        assert_eq!(got, want_bind);
    }

    #[test]
    fn real_mountinfo_parses() {
        let m = read_mountinfo().unwrap();
        assert!(!m.is_empty());
    }

    #[test]
    fn freeze_order_nested_first_and_dedup() {
        let got = freeze_order(&["/", "/data", "/data/db/", "/var", "/data"]);
        let want: Vec<PathBuf> = ["/data/db", "/data", "/var", "/"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(got, want);
    }
}
