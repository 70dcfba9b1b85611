//! The slot format and write order of the guest writer, and the point-in-time checker.
//!
//! The writer (`bulwark-guest-writer`, run inside the guest) cycles generation numbers over fixed
//! 4 KiB slots on several targets (a raw block device, or a directory of slot files on ext4). Write
//! number `g` (g = 1, 2, 3, ...) goes to one fixed slot, given by [`Layout::slot_of`]: the slots of
//! all targets are visited round-robin, alternating between targets, in one global order. Each
//! write completes (O_DIRECT | O_DSYNC) before the next starts.
//!
//! So an image of all the disks taken at one instant holds the result of a prefix `1..=c` of the
//! writes: every slot holds the newest generation not after the cut `c` that was written to it.
//! [`check`] verifies exactly that, and names the slots that disagree otherwise.

use std::fmt;

/// Size of one slot (one direct-I/O block).
pub const SLOT_SIZE: usize = 4096;
/// Byte offset of slot 0 on a raw block target (1 MiB, clear of partition tables).
pub const BLOCK_BASE: u64 = 1 << 20;
/// Magic at the start of every written slot.
pub const MAGIC: &[u8; 8] = b"BWSLOT01";
/// File name of slot `i` in a directory target.
pub fn slot_file_name(i: u32) -> String {
    format!("slot-{i:05}")
}

/// The targets the writer cycles over, in order, with their slot counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// `(name, slots)` of each target, in writer order (the name is for messages).
    pub targets: Vec<(String, u32)>,
}

impl Layout {
    /// A layout of the given targets.
    pub fn new<S: Into<String>>(targets: impl IntoIterator<Item = (S, u32)>) -> Layout {
        Layout {
            targets: targets.into_iter().map(|(n, s)| (n.into(), s)).collect(),
        }
    }

    /// Total number of slots over all targets: the length of one cycle of the write order.
    pub fn total(&self) -> u64 {
        self.targets.iter().map(|(_, n)| u64::from(*n)).sum()
    }

    /// The write order: position `p` of a cycle is `order()[p]` = (target, slot).
    pub fn order(&self) -> Vec<(usize, u32)> {
        let rounds = self.targets.iter().map(|(_, n)| *n).max().unwrap_or(0);
        let mut out = Vec::new();
        for r in 0..rounds {
            for (t, (_, n)) in self.targets.iter().enumerate() {
                if r < *n {
                    out.push((t, r));
                }
            }
        }
        out
    }

    /// The (target, slot) that write number `generation` (>= 1) goes to.
    pub fn slot_of(&self, order: &[(usize, u32)], generation: u64) -> (usize, u32) {
        let len = order.len() as u64;
        order[((generation - 1) % len) as usize]
    }
}

/// Fills `buf` (one slot) with the content of generation `generation` of `(target, slot)`.
/// Generation 0 is a formatted, never-overwritten slot.
pub fn encode(buf: &mut [u8], generation: u64, target: u32, slot: u32) {
    assert_eq!(buf.len(), SLOT_SIZE);
    buf[..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&generation.to_le_bytes());
    buf[16..20].copy_from_slice(&target.to_le_bytes());
    buf[20..24].copy_from_slice(&slot.to_le_bytes());
    let mut x = generation
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(u64::from(target) << 40 | u64::from(slot) << 8)
        | 1;
    for chunk in buf[24..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// What one slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// All zero: never written (generation 0).
    Zero,
    /// A complete, intact generation.
    Generation(u64),
    /// Anything else: a torn or foreign block.
    Corrupt,
}

impl SlotState {
    /// The generation this state stands for (`Zero` is 0), or None for a corrupt slot.
    pub fn generation(self) -> Option<u64> {
        match self {
            SlotState::Zero => Some(0),
            SlotState::Generation(g) => Some(g),
            SlotState::Corrupt => None,
        }
    }
}

/// Decodes one slot of `(target, slot)`; every byte must match what [`encode`] writes.
pub fn decode(buf: &[u8], target: u32, slot: u32) -> SlotState {
    if buf.len() != SLOT_SIZE {
        return SlotState::Corrupt;
    }
    if buf.iter().all(|&b| b == 0) {
        return SlotState::Zero;
    }
    if &buf[..8] != MAGIC {
        return SlotState::Corrupt;
    }
    let mut g = [0u8; 8];
    g.copy_from_slice(&buf[8..16]);
    let generation = u64::from_le_bytes(g);
    let mut want = vec![0u8; SLOT_SIZE];
    encode(&mut want, generation, target, slot);
    if want == buf {
        SlotState::Generation(generation)
    } else {
        SlotState::Corrupt
    }
}

/// A consistent state: the prefix `1..=cut` of the write order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// The last write included (0: none).
    pub cut: u64,
}

/// A slot that does not hold what the cut needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Target name.
    pub target: String,
    /// Slot index.
    pub slot: u32,
    /// What it holds.
    pub found: SlotState,
    /// The generation the cut needs there.
    pub expected: u64,
}

/// The images are not one point in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckError {
    /// The cut the newest generation found implies.
    pub cut: u64,
    /// Where the newest generation was found.
    pub newest_at: Option<(String, u32)>,
    /// Every slot that disagrees with that cut.
    pub mismatches: Vec<Mismatch>,
    /// A shape problem (wrong number of targets/slots) instead of mismatches.
    pub shape: Option<String>,
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(s) = &self.shape {
            return write!(f, "slot images do not match the layout: {s}");
        }
        write!(
            f,
            "not one point in time: the newest write found is generation {}",
            self.cut
        )?;
        if let Some((t, s)) = &self.newest_at {
            write!(f, " ({t} slot {s})")?;
        }
        write!(
            f,
            ", so every slot must hold the newest generation not after {}; {} slot(s) do not:",
            self.cut,
            self.mismatches.len()
        )?;
        for m in self.mismatches.iter().take(12) {
            let found = match m.found {
                SlotState::Zero => "nothing (zero block)".to_string(),
                SlotState::Generation(g) => format!("generation {g}"),
                SlotState::Corrupt => "a torn or foreign block".to_string(),
            };
            write!(
                f,
                "\n  {} slot {}: holds {found}, expected generation {}",
                m.target, m.slot, m.expected
            )?;
        }
        if self.mismatches.len() > 12 {
            write!(f, "\n  ... and {} more", self.mismatches.len() - 12)?;
        }
        Ok(())
    }
}

impl std::error::Error for CheckError {}

/// The generation that position `p` of the cycle holds after the prefix `1..=cut`.
fn expected_at(p: u64, len: u64, cut: u64) -> u64 {
    let first = p + 1;
    if cut < first {
        0
    } else {
        first + (cut - first) / len * len
    }
}

/// Checks that `observed[t][s]` (the state of slot `s` of target `t`) is the result of one
/// prefix of the write order, and returns that prefix.
pub fn check(layout: &Layout, observed: &[Vec<SlotState>]) -> Result<Cut, CheckError> {
    let shape_err = |s: String| CheckError {
        cut: 0,
        newest_at: None,
        mismatches: Vec::new(),
        shape: Some(s),
    };
    if observed.len() != layout.targets.len() {
        return Err(shape_err(format!(
            "{} targets read, layout has {}",
            observed.len(),
            layout.targets.len()
        )));
    }
    for (t, (name, n)) in layout.targets.iter().enumerate() {
        if observed[t].len() != *n as usize {
            return Err(shape_err(format!(
                "{name}: {} slots read, layout has {n}",
                observed[t].len()
            )));
        }
    }
    let order = layout.order();
    let len = order.len() as u64;
    let mut cut = 0u64;
    let mut newest_at = None;
    for (t, slots) in observed.iter().enumerate() {
        for (s, st) in slots.iter().enumerate() {
            if let SlotState::Generation(g) = st
                && *g > cut
            {
                cut = *g;
                newest_at = Some((layout.targets[t].0.clone(), s as u32));
            }
        }
    }
    let mut mismatches = Vec::new();
    for (p, &(t, s)) in order.iter().enumerate() {
        let expected = expected_at(p as u64, len, cut);
        let found = observed[t][s as usize];
        if found.generation() != Some(expected) {
            mismatches.push(Mismatch {
                target: layout.targets[t].0.clone(),
                slot: s,
                found,
                expected,
            });
        }
    }
    if mismatches.is_empty() {
        Ok(Cut { cut })
    } else {
        Err(CheckError {
            cut,
            newest_at,
            mismatches,
            shape: None,
        })
    }
}
