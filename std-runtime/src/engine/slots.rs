//! Bookkeeping of the state cache: which sequence owns which fixed-size
//! state slot. The state values themselves live in the session's pool and
//! are read and written in place by slot index.

use std::collections::HashMap;

/// A sequence: request id and sample index (for `n > 1`).
pub type SeqKey = (u64, u32);

/// Claiming when every slot is taken: the scheduler waits, it does not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("all {capacity} state slots are in use")]
pub struct CacheFull {
    pub capacity: usize,
}

/// Free list and owner table of `capacity` slots.
#[derive(Debug)]
pub struct SlotTable {
    free: Vec<usize>,
    owner: HashMap<SeqKey, usize>,
    capacity: usize,
}

impl SlotTable {
    pub fn new(capacity: usize) -> Self {
        // Lowest slot first: pop from the end.
        SlotTable { free: (0..capacity).rev().collect(), owner: HashMap::new(), capacity }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub fn in_use(&self) -> usize {
        self.owner.len()
    }
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// A slot for `key` (the caller zeroes or fills it).
    pub fn claim(&mut self, key: SeqKey) -> Result<usize, CacheFull> {
        if let Some(&s) = self.owner.get(&key) {
            return Ok(s);
        }
        let s = self.free.pop().ok_or(CacheFull { capacity: self.capacity })?;
        self.owner.insert(key, s);
        Ok(s)
    }

    /// Give `key`'s slot back; returns it, if `key` held one.
    pub fn release(&mut self, key: SeqKey) -> Option<usize> {
        let s = self.owner.remove(&key)?;
        self.free.push(s);
        Some(s)
    }

    pub fn slot(&self, key: SeqKey) -> Option<usize> {
        self.owner.get(&key).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_release_and_capacity() {
        let mut t = SlotTable::new(2);
        let a = t.claim((1, 0)).unwrap();
        let b = t.claim((2, 0)).unwrap();
        assert_ne!(a, b);
        assert_eq!(t.claim((3, 0)), Err(CacheFull { capacity: 2 }));
        assert_eq!(t.release((1, 0)), Some(a));
        assert_eq!(t.release((1, 0)), None);
        assert_eq!(t.claim((3, 0)), Ok(a));
        assert_eq!((t.in_use(), t.free()), (2, 0));
    }
}
