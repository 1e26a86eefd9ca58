//! How a matrix product's output features are shared out between threads.
//!
//! Thread `t` owns a contiguous `1 / threads` of the features and claims
//! all but an eighth of them at once: one long stream of weight rows in
//! address order, which the panel prefetch of the blocked product carries
//! from panel to panel. The eighth left is the tail that evens the threads
//! out: its owner claims it the same way when done, while a thread that has
//! run out of its own features takes halves from the back of the others'
//! (a late worker's whole share, or the tails), so threads that stream at
//! different rates still finish together.
//!
//! This replaced tasks of shrinking size handed out in turn from one
//! counter (about 20 a product, each starting on a cold panel). Measured
//! with `bench --profile` (130m, 2 threads, five pairs alternated), the
//! products' time a step at batch 16 fell from 23.3-24.7 to 21.3-21.7 ms in
//! Q8_0 and from 24.2-24.4 to 22.3-22.6 in bf16; f32 at batch 64 moved
//! 88.9-89.8 -> 86.7-88.2; batch 1 did not move. Claiming by halves from
//! the owner's front as well (six or seven claims a share) gained nothing
//! over the old tasks: the long claims are what pays.

use core::ops::Range;
use core::sync::atomic::{AtomicUsize, Ordering};

/// Features are claimed in units of this many rows: a multiple of the
/// tiles' 3 rows and their 4 tokens.
pub(crate) const UNIT: usize = 12;

/// Shares this many threads can own; a thread past them only takes from
/// the others.
pub(crate) const MAX_SHARES: usize = 64;

/// A share's unclaimed units `front..back`, packed into one word (`front`
/// in the low half) so both ends move by one compare-and-swap. On its own
/// cache line: its owner claims from it while the others run their own.
#[repr(align(64))]
struct Share(AtomicUsize);

const HALF: u32 = usize::BITS / 2;
const LOW: usize = (1 << HALF) - 1;

fn pack(front: usize, back: usize) -> usize {
    front | (back << HALF)
}

fn unpack(v: usize) -> (usize, usize) {
    (v & LOW, v >> HALF)
}

/// The features `0..n` of one product, shared out between `threads`.
pub(crate) struct FeatureShares {
    shares: [Share; MAX_SHARES],
    owners: usize,
    /// Rows a unit (a multiple of [`UNIT`], larger only when `n` has more
    /// units than a half word counts).
    unit: usize,
    n: usize,
}

/// Which end of a share a claim takes.
#[derive(Clone, Copy)]
enum End {
    Front,
    Back,
}

impl FeatureShares {
    pub(crate) fn new(n: usize, threads: usize) -> Self {
        let unit = n.div_ceil(LOW).next_multiple_of(UNIT).max(UNIT);
        let units = n.div_ceil(unit);
        let owners = threads.clamp(1, MAX_SHARES);
        let shares = core::array::from_fn(|t| {
            let (a, b) = (units * t / owners, units * (t + 1) / owners);
            Share(AtomicUsize::new(if t < owners { pack(a, b) } else { 0 }))
        });
        FeatureShares { shares, owners, unit, n }
    }

    /// Thread `t`'s next features: from the front of its own share, else
    /// from the back of another's; `None` when every feature is claimed.
    pub(crate) fn next(&self, t: usize) -> Option<Range<usize>> {
        if t < self.owners {
            if let Some(r) = self.claim(t, End::Front) {
                return Some(r);
            }
        }
        (1..=self.owners).find_map(|i| self.claim((t + i) % self.owners, End::Back))
    }

    fn claim(&self, share: usize, end: End) -> Option<Range<usize>> {
        let cell = &self.shares[share].0;
        let mut cur = cell.load(Ordering::Acquire);
        loop {
            let (front, back) = unpack(cur);
            if front >= back {
                return None;
            }
            let left = back - front;
            let take = match end {
                End::Front => left - left / 8,
                End::Back => left / 2,
            };
            let take = take.max(2).min(left);
            let (units, new) = match end {
                End::Front => (front..front + take, pack(front + take, back)),
                End::Back => (back - take..back, pack(front, back - take)),
            };
            match cell.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(units.start * self.unit..(units.end * self.unit).min(self.n)),
                Err(now) => cur = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::{FeatureShares, MAX_SHARES, UNIT};
    use std::{format, vec, vec::Vec};

    /// A small generator for the interleavings (no dependencies in core).
    fn lcg(s: &mut u64) -> usize {
        *s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*s >> 33) as usize
    }

    #[test]
    fn claims_cover_the_features_once_in_units_and_owners_stream_in_order() {
        let mut seed = 7u64;
        for n in [0, 1, 11, 12, 13, 24, 100, 3072, 50280, 1_000_000] {
            for threads in [1, 2, 3, 4, 16, 65] {
                for _ in 0..4 {
                    let shares = FeatureShares::new(n, threads);
                    let mut seen = vec![0u8; n];
                    let mut claims = vec![Vec::new(); threads];
                    let mut live: Vec<usize> = (0..threads).collect();
                    // Threads step in a random order; one retires when it
                    // finds nothing left, as a pool's thread would.
                    while !live.is_empty() {
                        let k = lcg(&mut seed) % live.len();
                        let t = live[k];
                        let Some(r) = shares.next(t) else {
                            live.swap_remove(k);
                            continue;
                        };
                        let ctx = format!("n={n} threads={threads} thread {t}: {r:?}");
                        assert!(!r.is_empty() && r.end <= n, "{ctx}");
                        let unit = shares.unit;
                        assert!(unit.is_multiple_of(UNIT) && r.start.is_multiple_of(unit), "{ctx}");
                        assert!(r.end.is_multiple_of(unit) || r.end == n, "{ctx}");
                        seen[r.clone()].iter_mut().for_each(|v| *v += 1);
                        claims[t].push(r);
                    }
                    assert!(seen.iter().all(|&v| v == 1), "n={n} threads={threads}");
                    // What an owner claimed inside its own share is one run
                    // from the share's start, in order.
                    let (unit, owners) = (shares.unit, threads.min(MAX_SHARES));
                    let units = n.div_ceil(unit);
                    for (t, claims) in claims.iter().enumerate().take(owners) {
                        let own = units * t / owners * unit..(units * (t + 1) / owners * unit).min(n);
                        let mut at = own.start;
                        for r in claims.iter().filter(|r| own.contains(&r.start)) {
                            assert_eq!(r.start, at, "n={n} threads={threads} thread {t}: {claims:?}");
                            at = r.end;
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_lone_thread_claims_its_share_in_order_then_takes_the_rest() {
        let shares = FeatureShares::new(1200, 2);
        let claims: Vec<_> = core::iter::from_fn(|| shares.next(0)).collect();
        // Its own half in two claims, then thread 1's from the back in halves.
        let want = [0..528, 528..600, 900..1200, 756..900, 684..756, 648..684];
        assert_eq!(&claims[..want.len()], &want[..], "{claims:?}");
        assert_eq!(claims.iter().map(|r| r.len()).sum::<usize>(), 1200);
        assert_eq!(shares.next(1), None);
    }
}
