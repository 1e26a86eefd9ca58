//! The prompt-state cache: states after prompt prefixes, keyed by their token
//! ids, evicted least recently used first to stay within a byte budget.
//!
//! A Mamba state has a fixed size whatever the prefix length, so an entry
//! costs the same for a 10-token system prompt as for a 10,000-token
//! document, and resuming from it skips that whole prefill.

use std::collections::HashMap;
use std::sync::Arc;

use crate::engine::PrefixState;

struct Entry {
    state: Arc<[f32]>,
    last_used: u64,
    bytes: usize,
}

/// What a lookup or an insert did (for metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    pub bytes: usize,
}

/// An LRU map from token prefixes to states, bounded by `capacity` bytes.
pub struct PrefixCache {
    capacity: usize,
    used: usize,
    tick: u64,
    entries: HashMap<Vec<u32>, Entry>,
}

impl PrefixCache {
    /// A cache of at most `capacity` bytes (0: disabled, nothing is kept).
    pub fn new(capacity: usize) -> Self {
        PrefixCache { capacity, used: 0, tick: 0, entries: HashMap::new() }
    }

    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats { entries: self.entries.len(), bytes: self.used }
    }

    fn entry_bytes(key: &[u32], state: &[f32]) -> usize {
        std::mem::size_of_val(key) + std::mem::size_of_val(state) + 64
    }

    /// The longest cached key that is a proper prefix of `prompt` (shorter than
    /// it: the last prompt token must still run to give the first logits).
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<PrefixState> {
        let tokens = self
            .entries
            .keys()
            .filter(|k| !k.is_empty() && k.len() < prompt.len() && prompt.starts_with(k))
            .map(Vec::len)
            .max()?;
        self.tick += 1;
        let tick = self.tick;
        let e = self.entries.get_mut(&prompt[..tokens])?;
        e.last_used = tick;
        Some(PrefixState { state: e.state.clone(), tokens })
    }

    /// Keep `state` as the state after `key`. An entry larger than the whole
    /// budget is not kept; older entries are evicted to make room.
    pub fn insert(&mut self, key: Vec<u32>, state: Vec<f32>) {
        if !self.enabled() || key.is_empty() {
            return;
        }
        self.tick += 1;
        let bytes = Self::entry_bytes(&key, &state);
        if let Some(e) = self.entries.get_mut(&key) {
            e.last_used = self.tick;
            return;
        }
        if bytes > self.capacity {
            return;
        }
        while self.used + bytes > self.capacity {
            let Some(oldest) = self.entries.iter().min_by_key(|(_, e)| e.last_used).map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(e) = self.entries.remove(&oldest) {
                self.used -= e.bytes;
            }
        }
        self.used += bytes;
        self.entries.insert(key, Entry { state: state.into(), last_used: self.tick, bytes });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_proper_prefix_wins_and_lru_evicts_within_the_budget() {
        let one = PrefixCache::entry_bytes(&[1, 2], &[0.0; 8]);
        let mut c = PrefixCache::new(2 * one + 8);
        c.insert(vec![1, 2], vec![1.0; 8]);
        c.insert(vec![1, 2, 3, 4], vec![2.0; 8]);
        assert_eq!(c.stats().entries, 2);
        let hit = c.lookup(&[1, 2, 3, 4, 5]).unwrap();
        assert_eq!((hit.tokens, hit.state[0]), (4, 2.0));
        // The whole prompt cached is not a usable prefix: the shorter one is.
        assert_eq!(c.lookup(&[1, 2, 3, 4]).unwrap().tokens, 2);
        assert!(c.lookup(&[2, 1, 3]).is_none());
        assert!(c.lookup(&[1]).is_none());
        // [1,2] was used last: [1,2,3,4] goes when a third entry comes.
        c.insert(vec![7, 8], vec![3.0; 8]);
        assert_eq!(c.stats().entries, 2);
        assert!(c.stats().bytes <= 2 * one + 8);
        assert_eq!(c.lookup(&[1, 2, 3, 4, 5]).unwrap().tokens, 2);
        assert_eq!(c.lookup(&[7, 8, 9]).unwrap().tokens, 2);
        // Too large for the budget, or disabled: nothing kept.
        c.insert(vec![9; 100], vec![0.0; 8]);
        assert!(c.lookup(&[9; 101]).is_none());
        let mut off = PrefixCache::new(0);
        off.insert(vec![1, 2], vec![0.0; 8]);
        assert!(off.lookup(&[1, 2, 3]).is_none());
    }
}
