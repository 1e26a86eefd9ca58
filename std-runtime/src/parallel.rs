//! The core's [`Parallel`] hook on a rayon thread pool.

use mamba_core::Parallel;

pub use crate::spin_pool::SpinPool;
use rayon::prelude::*;

/// Splits chunked work over a rayon pool of a chosen size.
pub struct RayonParallel {
    pool: rayon::ThreadPool,
}

impl RayonParallel {
    /// A pool of `threads` workers (0 = one per physical core).
    pub fn new(threads: usize) -> std::result::Result<Self, rayon::ThreadPoolBuildError> {
        let n = if threads == 0 { default_threads() } else { threads };
        Ok(RayonParallel { pool: rayon::ThreadPoolBuilder::new().num_threads(n).build()? })
    }
}

/// Physical cores where the OS tells them, else logical CPUs.
pub fn default_threads() -> usize {
    physical_cores().unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn physical_cores() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mut cores = std::collections::HashSet::new();
    let (mut phys, mut core) = (None, None);
    for line in text.lines() {
        let val = || line.split(':').nth(1).map(|v| v.trim().to_string());
        if line.starts_with("physical id") {
            phys = val();
        } else if line.starts_with("core id") {
            core = val();
        } else if line.trim().is_empty() {
            if let (Some(p), Some(c)) = (phys.take(), core.take()) {
                cores.insert((p, c));
            }
        }
    }
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    (!cores.is_empty()).then(|| cores.len().min(online))
}

impl Parallel for RayonParallel {
    fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    fn for_each_chunk(&self, data: &mut [f32], chunk: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
        let chunk = chunk.max(1);
        if data.len() <= chunk || self.threads() == 1 {
            for (i, c) in data.chunks_mut(chunk).enumerate() {
                f(i * chunk, c);
            }
            return;
        }
        self.pool.install(|| data.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i * chunk, c)));
    }

    fn for_each_task(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n <= 1 || self.threads() == 1 {
            (0..n).for_each(f);
            return;
        }
        self.pool.install(|| (0..n).into_par_iter().for_each(f));
    }

    fn for_each_thread(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.threads() == 1 {
            return f(0);
        }
        // Index i on the pool's thread i, every call.
        self.pool.broadcast(|ctx| f(ctx.index()));
    }
}

/// The pool the runtime runs on: the [`SpinPool`] unless `MAMBA_POOL=rayon`
/// asks for rayon's (to compare them).
pub enum CpuPool {
    Spin(SpinPool),
    Rayon(RayonParallel),
}

impl CpuPool {
    /// `threads` workers in all (0 = one per physical core).
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let n = if threads == 0 { default_threads() } else { threads };
        if std::env::var("MAMBA_POOL").is_ok_and(|v| v.eq_ignore_ascii_case("rayon")) {
            return RayonParallel::new(n).map(CpuPool::Rayon).map_err(std::io::Error::other);
        }
        SpinPool::new(n).map(CpuPool::Spin)
    }

    /// `spin` or `rayon`.
    pub fn name(&self) -> &'static str {
        match self {
            CpuPool::Spin(_) => "spin",
            CpuPool::Rayon(_) => "rayon",
        }
    }

    fn inner(&self) -> &dyn Parallel {
        match self {
            CpuPool::Spin(p) => p,
            CpuPool::Rayon(p) => p,
        }
    }
}

impl Parallel for CpuPool {
    fn threads(&self) -> usize {
        self.inner().threads()
    }
    fn for_each_chunk(&self, data: &mut [f32], chunk: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
        self.inner().for_each_chunk(data, chunk, f)
    }
    fn for_each_task(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        self.inner().for_each_task(n, f)
    }
    fn for_each_thread(&self, f: &(dyn Fn(usize) + Sync)) {
        self.inner().for_each_thread(f)
    }
}
