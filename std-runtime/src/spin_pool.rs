//! A small persistent thread pool for the core's [`Parallel`] hook, tuned
//! for the decode step: about a hundred parallel calls per token, each tens
//! of microseconds long.
//!
//! The calling thread takes part in every call, and the workers spin on the
//! next call for a while before they sleep, so a call costs no wake-up from
//! the scheduler while work keeps coming (rayon's sleep and wake-ups were
//! about 15% of a 2-thread decode step in a profile). Tasks are handed out
//! through one atomic counter, or, for [`Parallel::for_each_thread`], each
//! thread takes its own index first (the caller 0, worker `w` index `w`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mamba_core::Parallel;

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_millis(2);

/// One call: a borrowed task function, erased to a raw pointer, and the
/// call's own task counters. A worker holding a finished call's `Arc` finds
/// no task left in it, so `f` is never touched after the call returns.
struct Call {
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
    /// A per-thread call: whether index `i` is taken. Each thread takes its
    /// own index first, then any not yet taken, so a late or sleeping
    /// worker's index is run by another thread rather than waited for.
    taken: Option<Vec<AtomicBool>>,
}

// SAFETY: the pointee is `Sync`; it is called only for task indices below
// `n`, all of which are claimed and finished before the publishing caller
// (which keeps it alive) returns from `for_each_task`.
unsafe impl Send for Call {}
unsafe impl Sync for Call {}

impl Call {
    fn new(f: &(dyn Fn(usize) + Sync), n: usize, per_thread: bool) -> Self {
        // SAFETY (of the erased lifetime): see `Call`: `SpinPool::call` does
        // not return before all `n` tasks are done, the last use of `f`.
        let f: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        Call {
            f,
            n,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            taken: per_thread.then(|| (0..n).map(|_| AtomicBool::new(false)).collect()),
        }
    }

    /// Take and run tasks until none are left; thread `me`'s own index
    /// first in a per-thread call.
    fn work(&self, me: usize) {
        match &self.taken {
            None => loop {
                let i = self.next.fetch_add(1, Ordering::AcqRel);
                if i >= self.n {
                    return;
                }
                self.run(i);
            },
            Some(taken) => {
                for i in std::iter::once(me).chain(0..self.n) {
                    if taken.get(i).is_some_and(|t| !t.swap(true, Ordering::AcqRel)) {
                        self.run(i);
                    }
                }
            }
        }
    }

    fn run(&self, i: usize) {
        // SAFETY: see the `Send`/`Sync` impls: task `i < n` is not yet
        // counted done, so the caller is still waiting and `f` is alive.
        let f = unsafe { &*self.f };
        if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
            self.panicked.store(true, Ordering::Release);
        }
        self.done.fetch_add(1, Ordering::AcqRel);
    }
}

struct Shared {
    /// Bumped for every call; workers look at the call when they see it change.
    epoch: AtomicUsize,
    call: Mutex<Option<Arc<Call>>>,
    /// Sleeping workers wait here for a new epoch or shutdown.
    wake: Condvar,
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
}

/// `threads` threads in all: the caller and `threads - 1` workers.
pub struct SpinPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// One call at a time (the hook takes `&self`).
    one: Mutex<()>,
}

impl SpinPool {
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            call: Mutex::new(None),
            wake: Condvar::new(),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
        });
        let mut workers = Vec::new();
        for w in 1..threads.max(1) {
            let s = Arc::clone(&shared);
            workers.push(
                std::thread::Builder::new().name(format!("mamba-worker-{w}")).spawn(move || worker(&s, w))?,
            );
        }
        Ok(SpinPool { shared, workers, one: Mutex::new(()) })
    }
}

/// Worker `me` (1 and up; the caller is 0).
fn worker(s: &Shared, me: usize) {
    // The epoch the pool started at, not the one this thread first sees: a
    // call published before the thread ran is still its to join.
    let mut seen = 0;
    loop {
        let t0 = Instant::now();
        let mut spins = 0u32;
        while s.epoch.load(Ordering::Acquire) == seen && !s.shutdown.load(Ordering::Acquire) {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && t0.elapsed() > SPIN {
                let mut guard = s.call.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::AcqRel);
                while s.epoch.load(Ordering::Acquire) == seen && !s.shutdown.load(Ordering::Acquire) {
                    guard = s.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::AcqRel);
                break;
            }
        }
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        seen = s.epoch.load(Ordering::Acquire);
        let call = s.call.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(call) = call {
            call.work(me);
        }
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _g = self.shared.call.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl SpinPool {
    /// Run `f` over `0..n` on the caller and the workers (per thread: each
    /// its own index first).
    fn call(&self, n: usize, f: &(dyn Fn(usize) + Sync), per_thread: bool) {
        if n <= 1 || self.workers.is_empty() {
            (0..n).for_each(f);
            return;
        }
        let _one = self.one.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        let call = Arc::new(Call::new(f, n, per_thread));
        {
            let mut g = s.call.lock().unwrap_or_else(|e| e.into_inner());
            *g = Some(Arc::clone(&call));
            s.epoch.fetch_add(1, Ordering::AcqRel);
            if s.sleepers.load(Ordering::Acquire) > 0 {
                s.wake.notify_all();
            }
        }
        call.work(0);
        while call.done.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
        }
        *s.call.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if call.panicked.load(Ordering::Acquire) {
            panic!("a task of the thread pool panicked");
        }
    }
}

impl Parallel for SpinPool {
    fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    fn for_each_task(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        self.call(n, f, false)
    }

    fn for_each_thread(&self, f: &(dyn Fn(usize) + Sync)) {
        self.call(self.threads(), f, true)
    }

    fn for_each_chunk(&self, data: &mut [f32], chunk: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
        let chunk = chunk.max(1);
        let len = data.len();
        let base = data.as_mut_ptr() as usize;
        self.for_each_task(len.div_ceil(chunk), &|i| {
            let start = i * chunk;
            let end = (start + chunk).min(len);
            // SAFETY: task i alone gets `start..end`; the ranges of distinct
            // tasks do not overlap, all lie inside `data`, and `data` is
            // exclusively borrowed until every task is done.
            let part = unsafe { std::slice::from_raw_parts_mut((base as *mut f32).add(start), end - start) };
            f(start, part)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_and_chunks_cover_the_buffer() {
        let pool = SpinPool::new(3).unwrap();
        assert_eq!(pool.threads(), 3);
        for n in [0usize, 1, 2, 7, 100, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.for_each_task(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n = {n}");
        }
        let mut data = vec![0.0f32; 1001];
        pool.for_each_chunk(&mut data, 64, &|start, part| {
            for (j, v) in part.iter_mut().enumerate() {
                *v += (start + j) as f32;
            }
        });
        assert!(data.iter().enumerate().all(|(i, &v)| v == i as f32));
    }

    #[test]
    fn a_thread_takes_its_own_index_first_then_any_left() {
        let order = Mutex::new(Vec::new());
        let f = |i: usize| order.lock().unwrap().push(i);
        let call = Call::new(&f, 4, true);
        call.work(2);
        assert_eq!(std::mem::take(&mut *order.lock().unwrap()), [2, 0, 1, 3]);
        assert_eq!(call.done.load(Ordering::Acquire), 4);
        // Indices already taken (here 1, by its own thread) are not run again.
        let call = Call::new(&f, 3, true);
        call.taken.as_ref().unwrap()[1].store(true, Ordering::Release);
        call.work(0);
        assert_eq!(std::mem::take(&mut *order.lock().unwrap()), [0, 2]);
        // A plain call hands out tasks in order, whoever asks.
        Call::new(&f, 3, false).work(2);
        assert_eq!(order.into_inner().unwrap(), [0, 1, 2]);
    }

    #[test]
    fn per_thread_calls_run_every_index_once_awake_or_woken() {
        let pool = SpinPool::new(3).unwrap();
        for round in 0..50 {
            let runs: Vec<Mutex<Vec<std::thread::ThreadId>>> = (0..3).map(|_| Mutex::default()).collect();
            let done = AtomicUsize::new(0);
            pool.for_each_thread(&|i| {
                if i == 0 {
                    // Busy until the other indices are done: whoever runs
                    // it cannot also wait for them, so they must be taken.
                    let t0 = Instant::now();
                    while done.load(Ordering::Acquire) < 2 && t0.elapsed() < Duration::from_secs(10) {
                        std::hint::spin_loop();
                    }
                } else {
                    done.fetch_add(1, Ordering::AcqRel);
                }
                runs[i].lock().unwrap().push(std::thread::current().id());
            });
            let runs: Vec<Vec<_>> = runs.into_iter().map(|m| m.into_inner().unwrap()).collect();
            assert!(runs.iter().all(|r| r.len() == 1), "round {round}: {runs:?}");
            if round % 10 == 0 {
                // Let the workers fall asleep: the next call wakes them.
                std::thread::sleep(SPIN * 3);
            }
        }
    }

    #[test]
    fn workers_sleep_and_wake_and_a_panic_reaches_the_caller() {
        let pool = SpinPool::new(2).unwrap();
        std::thread::sleep(SPIN * 3);
        let count = AtomicUsize::new(0);
        pool.for_each_task(50, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 50);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.for_each_task(8, &|i| assert!(i != 5, "task five fails"));
        }));
        assert!(r.is_err());
        // The pool still works after a panicking call.
        count.store(0, Ordering::Relaxed);
        pool.for_each_task(9, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 9);
    }
}
