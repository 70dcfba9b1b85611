//! Bitmap chain safety: the record a point keeps of its dirty bitmap, the rules that decide
//! whether the next backup may trust it, and the conversion of its dirty extents into the
//! unchanged ranges a backup skips.

use std::collections::BTreeMap;
use std::ops::Range;

use bulwark_snapshot::{PreviousDisk, Tracking};

use crate::fleece::{BitmapInfo, FleeceDisk};
use crate::{QemuIdentity, VmDisk};

/// The kind of [`Tracking`] record this crate writes.
pub const KIND: &str = "qemu-dirty-bitmap";

/// What a point records of the dirty bitmap that started at its instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapRecord {
    /// The bitmap's name (`bulwark-bitmap-TOKEN`).
    pub bitmap: String,
    /// The disk's name.
    pub disk: String,
    /// The disk's size at the instant.
    pub size: u64,
    /// Whether the bitmap is stored in the image (qcow2) and survives QEMU restarts.
    pub persistent: bool,
    /// When the bitmap started (the point's instant), in milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// For an in-memory bitmap: the QEMU process holding it.
    pub qemu: Option<QemuIdentity>,
    /// The bitmap's granularity in bytes, when known (offline images record it: a bitmap of
    /// the same name with another granularity is not the one this point started).
    pub granularity: Option<u32>,
    /// The image's backing file (empty: none), when known (offline images record it: a
    /// backing file swapped under the image, `qemu-img rebase -u`, changes what the guest sees
    /// without a write the bitmap could record).
    pub backing: Option<String>,
}

impl BitmapRecord {
    /// The record as a [`Tracking`] for the recovery point.
    pub fn to_tracking(&self) -> Tracking {
        let mut fields = BTreeMap::new();
        fields.insert("bitmap".into(), self.bitmap.clone());
        fields.insert("disk".into(), self.disk.clone());
        fields.insert("size".into(), self.size.to_string());
        fields.insert("persistent".into(), self.persistent.to_string());
        fields.insert("started_at_ms".into(), self.started_at_ms.to_string());
        if let Some(q) = &self.qemu {
            fields.insert("qemu_pid".into(), q.pid.to_string());
            fields.insert("qemu_start_time".into(), q.start_time.to_string());
        }
        if let Some(g) = self.granularity {
            fields.insert("granularity".into(), g.to_string());
        }
        if let Some(b) = &self.backing {
            fields.insert("backing".into(), b.clone());
        }
        Tracking {
            kind: KIND.into(),
            fields,
        }
    }

    /// Reads a record back; the error says what is missing or malformed.
    pub fn from_tracking(t: &Tracking) -> Result<BitmapRecord, String> {
        if t.kind != KIND {
            return Err(format!(
                "the previous point's change tracking is {:?}, not a QEMU dirty bitmap",
                t.kind
            ));
        }
        let field = |k: &str| {
            t.fields
                .get(k)
                .ok_or_else(|| format!("the previous point's bitmap record has no {k}"))
        };
        let number = |k: &str| -> Result<u64, String> {
            field(k)?
                .parse()
                .map_err(|_| format!("the previous point's bitmap record has a bad {k}"))
        };
        let persistent = match field("persistent")?.as_str() {
            "true" => true,
            "false" => false,
            _ => return Err("the previous point's bitmap record has a bad persistent".into()),
        };
        let qemu = match (t.fields.get("qemu_pid"), t.fields.get("qemu_start_time")) {
            (Some(_), Some(_)) => Some(QemuIdentity {
                pid: u32::try_from(number("qemu_pid")?)
                    .map_err(|_| "the previous point's bitmap record has a bad qemu_pid")?,
                start_time: number("qemu_start_time")?,
                owner: None,
            }),
            _ => None,
        };
        let granularity = match t.fields.get("granularity") {
            None => None,
            Some(_) => Some(
                u32::try_from(number("granularity")?)
                    .map_err(|_| "the previous point's bitmap record has a bad granularity")?,
            ),
        };
        Ok(BitmapRecord {
            bitmap: field("bitmap")?.clone(),
            disk: field("disk")?.clone(),
            size: number("size")?,
            persistent,
            started_at_ms: number("started_at_ms")?,
            qemu,
            granularity,
            backing: t.fields.get("backing").cloned(),
        })
    }
}

/// Whether a backup may read only what a bitmap marks dirty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The frozen bitmap of this name holds every change since the previous point.
    Bitmap(String),
    /// It may not: read everything, for this reason.
    Unknown(String),
}

/// Decides whether the bitmap the previous point recorded covers every change since it, as
/// QEMU reported the disk's bitmaps just before this point's instant. `qemu` is the identity
/// of the QEMU process now.
pub fn judge(previous: &PreviousDisk, disk: &FleeceDisk, qemu: Option<&QemuIdentity>) -> Trust {
    judge_bitmaps(previous, &disk.disk, &disk.frozen, &disk.inconsistent, qemu)
}

/// [`judge`] from its parts: the disk now, the `bulwark-` bitmaps QEMU reported recording
/// (`frozen`) and those it marked inconsistent (and that were removed).
pub fn judge_bitmaps(
    previous: &PreviousDisk,
    disk: &VmDisk,
    frozen: &[BitmapInfo],
    inconsistent: &[String],
    qemu: Option<&QemuIdentity>,
) -> Trust {
    let Some(tracking) = &previous.tracking else {
        return Trust::Unknown(format!(
            "the previous point {} recorded no dirty bitmap for this disk",
            previous.point
        ));
    };
    let record = match BitmapRecord::from_tracking(tracking) {
        Ok(r) => r,
        Err(reason) => return Trust::Unknown(reason),
    };
    if record.disk != disk.name {
        return Trust::Unknown(format!(
            "the previous point's bitmap was of disk {:?}, not {:?}",
            record.disk, disk.name
        ));
    }
    if record.size != disk.size || previous.size != disk.size {
        return Trust::Unknown(format!(
            "the disk was resized: {} bytes at the previous point, {} now",
            if record.size != disk.size {
                record.size
            } else {
                previous.size
            },
            disk.size
        ));
    }
    if !record.persistent {
        let same = match (&record.qemu, qemu) {
            (Some(a), Some(b)) => a.pid == b.pid && a.start_time == b.start_time,
            _ => false,
        };
        if !same {
            return Trust::Unknown(format!(
                "QEMU was restarted since the previous point (the in-memory bitmap {} of a {} disk died with it)",
                record.bitmap, disk.format
            ));
        }
    }
    if inconsistent.contains(&record.bitmap) {
        return Trust::Unknown(format!(
            "QEMU marks the bitmap {} inconsistent (QEMU stopped without saving it); it was removed",
            record.bitmap
        ));
    }
    let Some(info) = frozen.iter().find(|b| b.name == record.bitmap) else {
        return Trust::Unknown(format!(
            "the bitmap {} of the previous point is not a recording bitmap of this disk in QEMU (removed, disabled, or lost in a restart)",
            record.bitmap
        ));
    };
    if info.persistent != record.persistent {
        return Trust::Unknown(format!(
            "the bitmap {} changed from persistent={} to persistent={}",
            record.bitmap, record.persistent, info.persistent
        ));
    }
    if let Some(g) = record.granularity
        && g != info.granularity
    {
        return Trust::Unknown(format!(
            "the bitmap {} has granularity {} bytes, the previous point recorded {g}: not the bitmap it started",
            record.bitmap, info.granularity
        ));
    }
    Trust::Bitmap(record.bitmap)
}

/// Builds the unchanged ranges of a disk of `size` bytes from a bitmap's extents in order
/// (`(offset, length, dirty)`), holding at most `max_ranges` ranges whatever the bitmap looks
/// like: past that, the shortest clean ranges are given up (read again), never the other way.
/// Extents that overlap, go backwards or past `size` end the map early; the rest is left
/// changed.
pub fn unchanged_ranges(
    size: u64,
    extents: impl IntoIterator<Item = (u64, u64, bool)>,
    max_ranges: usize,
) -> Vec<Range<u64>> {
    let mut builder = UnchangedBuilder::new(size, max_ranges);
    for (offset, len, dirty) in extents {
        if !builder.push(offset, len, dirty) {
            break;
        }
    }
    builder.finish()
}

/// [`unchanged_ranges`], fed one extent at a time (as block status replies come).
#[derive(Debug)]
pub struct UnchangedBuilder {
    size: u64,
    max_ranges: usize,
    out: Vec<Range<u64>>,
    min_len: u64,
    pos: u64,
}

impl UnchangedBuilder {
    /// For a disk of `size` bytes, keeping at most `max_ranges` ranges.
    pub fn new(size: u64, max_ranges: usize) -> Self {
        UnchangedBuilder {
            size,
            max_ranges: max_ranges.max(1),
            out: Vec::new(),
            min_len: 1,
            pos: 0,
        }
    }

    /// Where the next extent must start.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Adds the next extent; false (and nothing added) when it does not continue the map.
    pub fn push(&mut self, offset: u64, len: u64, dirty: bool) -> bool {
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        if offset != self.pos || end > self.size || len == 0 {
            return false;
        }
        self.pos = end;
        if dirty {
            return true;
        }
        match self.out.last_mut() {
            Some(last) if last.end == offset => last.end = end,
            _ => self.out.push(offset..end),
        }
        while self.out.len() > self.max_ranges {
            self.min_len = self.min_len.saturating_mul(2);
            // The last range may still grow: keep it whatever its length.
            let keep_last = self.out.pop();
            let min_len = self.min_len;
            self.out.retain(|r| r.end - r.start >= min_len);
            self.out.extend(keep_last);
        }
        true
    }

    /// The unchanged ranges (sorted, disjoint, at most `max_ranges`).
    pub fn finish(mut self) -> Vec<Range<u64>> {
        let min_len = self.min_len;
        self.out.retain(|r| r.end - r.start >= min_len);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn disk(format: &str, frozen: &[(&str, bool)]) -> FleeceDisk {
        FleeceDisk {
            disk: VmDisk {
                name: "os".into(),
                node: "n".into(),
                format: format.into(),
                file: "/x".into(),
                size: 1 << 30,
            },
            fleece_node: String::new(),
            fleece_file: Default::default(),
            job: String::new(),
            export: String::new(),
            new_bitmap: "bulwark-bitmap-new".into(),
            frozen: frozen
                .iter()
                .map(|(n, p)| BitmapInfo {
                    name: n.to_string(),
                    recording: true,
                    persistent: *p,
                    inconsistent: false,
                    busy: false,
                    granularity: 65536,
                    count: 0,
                })
                .collect(),
            inconsistent: vec![],
            persistent: format == "qcow2",
            taken_at_ms: 1,
        }
    }

    fn previous(record: &BitmapRecord) -> PreviousDisk {
        PreviousDisk {
            point: "p1".into(),
            manifest_digest: String::new(),
            size: record.size,
            tracking: Some(record.to_tracking()),
        }
    }

    fn record(persistent: bool) -> BitmapRecord {
        BitmapRecord {
            bitmap: "bulwark-bitmap-a".into(),
            disk: "os".into(),
            size: 1 << 30,
            persistent,
            started_at_ms: 5,
            qemu: Some(QemuIdentity {
                pid: 7,
                start_time: 9,
                owner: None,
            }),
            granularity: None,
            backing: None,
        }
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let r = record(false);
        assert_eq!(BitmapRecord::from_tracking(&r.to_tracking()).unwrap(), r);
        let mut t = r.to_tracking();
        t.fields.insert("size".into(), "-1".into());
        assert!(
            BitmapRecord::from_tracking(&t)
                .unwrap_err()
                .contains("size")
        );
        t.kind = "reflink".into();
        assert!(
            BitmapRecord::from_tracking(&t)
                .unwrap_err()
                .contains("reflink")
        );
    }

    #[test]
    fn trust_needs_every_condition() {
        let me = QemuIdentity {
            pid: 7,
            start_time: 9,
            owner: None,
        };
        let other = QemuIdentity {
            pid: 7,
            start_time: 10,
            owner: None,
        };
        let qcow = disk("qcow2", &[("bulwark-bitmap-a", true)]);
        let raw = disk("raw", &[("bulwark-bitmap-a", false)]);
        assert_eq!(
            judge(&previous(&record(true)), &qcow, Some(&other)),
            Trust::Bitmap("bulwark-bitmap-a".into())
        );
        assert_eq!(
            judge(&previous(&record(false)), &raw, Some(&me)),
            Trust::Bitmap("bulwark-bitmap-a".into())
        );
        let unknown = |t: Trust, word: &str| match t {
            Trust::Unknown(r) => assert!(r.contains(word), "{r}"),
            t => panic!("trusted: {t:?}"),
        };
        unknown(
            judge(&previous(&record(false)), &raw, Some(&other)),
            "restarted",
        );
        unknown(judge(&previous(&record(false)), &raw, None), "restarted");
        let mut p = previous(&record(true));
        p.tracking = None;
        unknown(judge(&p, &qcow, None), "no dirty bitmap");
        let mut p = previous(&record(true));
        p.size += 1;
        unknown(judge(&p, &qcow, None), "resized");
        let mut r = record(true);
        r.bitmap = "bulwark-bitmap-b".into();
        unknown(judge(&previous(&r), &qcow, None), "not a recording bitmap");
        let mut bad = qcow.clone();
        bad.inconsistent = vec!["bulwark-bitmap-a".into()];
        bad.frozen.clear();
        unknown(judge(&previous(&record(true)), &bad, None), "inconsistent");
        unknown(
            judge(&previous(&record(false)), &qcow, Some(&me)),
            "persistent",
        );
        let mut r = record(true);
        r.disk = "data".into();
        unknown(judge(&previous(&r), &qcow, None), "disk");
        let mut r = record(true);
        r.granularity = Some(65536);
        r.backing = Some(String::new());
        assert_eq!(BitmapRecord::from_tracking(&r.to_tracking()).unwrap(), r);
        assert_eq!(
            judge(&previous(&r), &qcow, None),
            Trust::Bitmap("bulwark-bitmap-a".into())
        );
        r.granularity = Some(131072);
        unknown(judge(&previous(&r), &qcow, None), "granularity");
    }

    #[test]
    fn unchanged_ranges_merge_clean_extents() {
        let e = [
            (0, 10, false),
            (10, 5, false),
            (15, 5, true),
            (20, 30, false),
        ];
        assert_eq!(unchanged_ranges(50, e, 10), vec![0..15, 20..50]);
        // A gap or an extent past the end stops the map: the rest counts as changed.
        assert_eq!(
            unchanged_ranges(50, [(0, 10, false), (20, 5, false)], 10),
            vec![0..10]
        );
        assert_eq!(
            unchanged_ranges(50, [(0, 60, false)], 10),
            Vec::<Range<u64>>::new()
        );
        assert_eq!(
            unchanged_ranges(50, [(0, u64::MAX, false)], 10),
            Vec::<Range<u64>>::new()
        );
    }

    proptest! {
        /// Any record, however mangled, is read back or refused with a reason: never a panic.
        #[test]
        fn any_record_is_read_or_refused(
            kind in prop_oneof![Just(KIND.to_string()), ".{0,12}"],
            fields in proptest::collection::btree_map(
                prop_oneof![
                    Just("bitmap".to_string()), Just("disk".to_string()), Just("size".to_string()),
                    Just("persistent".to_string()), Just("started_at_ms".to_string()),
                    Just("qemu_pid".to_string()), Just("qemu_start_time".to_string()),
                    Just("granularity".to_string()), Just("backing".to_string()), ".{0,8}",
                ],
                prop_oneof![".{0,24}", any::<u64>().prop_map(|n| n.to_string()), Just("true".to_string())],
                0..9,
            ),
        ) {
            let t = Tracking { kind, fields };
            match BitmapRecord::from_tracking(&t) {
                Ok(r) => prop_assert_eq!(BitmapRecord::from_tracking(&r.to_tracking()).unwrap(), r),
                Err(reason) => prop_assert!(!reason.is_empty()),
            }
        }

        /// Whatever the extents: at most `max` ranges, sorted, disjoint, and never a dirty byte
        /// inside an unchanged range.
        #[test]
        fn unchanged_ranges_are_bounded_and_never_cover_a_dirty_byte(
            lens in proptest::collection::vec((1u64..5000, any::<bool>()), 0..400),
            max in 1usize..20,
        ) {
            let mut extents = Vec::new();
            let mut pos = 0;
            for (len, dirty) in &lens {
                extents.push((pos, *len, *dirty));
                pos += len;
            }
            let out = unchanged_ranges(pos, extents.clone(), max);
            prop_assert!(out.len() <= max);
            for w in out.windows(2) {
                prop_assert!(w[0].end < w[1].start);
            }
            for r in &out {
                prop_assert!(r.start < r.end && r.end <= pos);
                for (o, l, dirty) in &extents {
                    if *dirty {
                        prop_assert!(r.end <= *o || o + l <= r.start, "{r:?} covers dirty {o}+{l}");
                    }
                }
            }
            if max >= lens.len() {
                let clean: u64 = extents.iter().filter(|e| !e.2).map(|e| e.1).sum();
                prop_assert_eq!(out.iter().map(|r| r.end - r.start).sum::<u64>(), clean);
            }
        }
    }
}
