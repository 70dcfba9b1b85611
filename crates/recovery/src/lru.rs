//! A small least-recently-used map of block index → block bytes, bounded in bytes.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

/// LRU cache of whole blocks. Holds at most `capacity` bytes (always at least one block).
#[derive(Debug)]
pub(crate) struct BlockLru {
    capacity: u64,
    held: u64,
    tick: u64,
    blocks: HashMap<u64, (Bytes, u64)>,
    by_age: BTreeMap<u64, u64>,
}

impl BlockLru {
    pub(crate) fn new(capacity: u64) -> BlockLru {
        BlockLru {
            capacity,
            held: 0,
            tick: 0,
            blocks: HashMap::new(),
            by_age: BTreeMap::new(),
        }
    }

    /// The block, marked as just used.
    pub(crate) fn get(&mut self, index: u64) -> Option<Bytes> {
        self.tick += 1;
        let tick = self.tick;
        let (data, age) = self.blocks.get_mut(&index)?;
        self.by_age.remove(age);
        *age = tick;
        self.by_age.insert(tick, index);
        Some(data.clone())
    }

    /// Whether the block is cached (without marking it used).
    pub(crate) fn contains(&self, index: u64) -> bool {
        self.blocks.contains_key(&index)
    }

    /// Inserts a block, evicting the least recently used ones beyond the capacity.
    pub(crate) fn insert(&mut self, index: u64, data: Bytes) {
        self.tick += 1;
        let len = data.len() as u64;
        if let Some((old, age)) = self.blocks.insert(index, (data, self.tick)) {
            self.by_age.remove(&age);
            self.held -= old.len() as u64;
        }
        self.by_age.insert(self.tick, index);
        self.held += len;
        while self.held > self.capacity && self.blocks.len() > 1 {
            let Some((_, oldest)) = self.by_age.pop_first() else {
                break;
            };
            if let Some((old, _)) = self.blocks.remove(&oldest) {
                self.held -= old.len() as u64;
            }
        }
    }

    /// Bytes held.
    pub(crate) fn held(&self) -> u64 {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_within_capacity() {
        let mut lru = BlockLru::new(3 * 10);
        for i in 0..3 {
            lru.insert(i, Bytes::from(vec![0u8; 10]));
        }
        assert!(lru.get(0).is_some()); // 1 is now the oldest
        lru.insert(3, Bytes::from(vec![0u8; 10]));
        assert!(lru.contains(0));
        assert!(!lru.contains(1));
        assert!(lru.contains(2));
        assert!(lru.contains(3));
        assert_eq!(lru.held(), 30);
        // Re-inserting a block replaces it without double counting.
        lru.insert(3, Bytes::from(vec![0u8; 10]));
        assert_eq!(lru.held(), 30);
    }
}
