//! Buffers that start on a cache line, large ones on 2 MiB pages.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use bytemuck::Pod;

/// Bytes in a cache line.
const LINE: usize = 64;
/// Words (`u64`) in a cache line.
const LINE_WORDS: usize = LINE / 8;

/// Runs of `words` laid out one after another in one buffer, each from a
/// cache line: the word each starts at, and the words in all.
pub fn line_starts(words: impl IntoIterator<Item = usize>) -> (Vec<usize>, usize) {
    let mut total = 0;
    let starts = words
        .into_iter()
        .map(|n| {
            let at = total;
            total += n.next_multiple_of(LINE_WORDS);
            at
        })
        .collect();
    (starts, total)
}

/// Bytes in a transparent huge page (x86-64, and aarch64 with 4 KiB pages).
pub const HUGE_PAGE: usize = 2 << 20;

/// A zeroed buffer of `T` (f32 unless said) whose first value starts a
/// cache line. A `Vec<f32>` of a few kilobytes or more starts 16 bytes into
/// one (the allocator's header), so every 16-wide load of a row straddled
/// two lines; rows of a multiple of 64 bytes now each start a line.
///
/// Weights made with [`LineBuf::zeroed_huge`] (synthetic ones, copies,
/// tables derived at load) start a 2 MiB page once they are [`HUGE_PAGE`]
/// bytes or more, and on Linux their whole 2 MiB pages are asked to be
/// transparent huge pages (`MADV_HUGEPAGE`: with THP set to `madvise`, the
/// common default, a process gets them only by asking). On 4 KiB pages a
/// stream of weights crosses a page, and so a TLB entry and the end of the
/// hardware prefetchers' reach, every 64 lines. Measured on synthetic 130m
/// weights (Zen 4, 2 threads, medians of six runs alternated with 4 KiB
/// pages), batch-1 decode ran 197 -> 227 tok/s in Q8_0, 117 -> 152 in bf16,
/// 144 -> 179 in f16 and 85 -> 98 in f32. The tail past the last whole
/// 2 MiB page keeps small pages, so no buffer is backed beyond what it
/// touches rounded up to its 2 MiB pages. States and scratch stay on small
/// pages: a server's slots are then backed exactly as far as they are used,
/// and at 64 sequences their scan and conv ran no faster on huge pages
/// (within this machine's noise).
///
/// The values are zeros that the kernel backs on first touch (large
/// `calloc` blocks and anonymous mappings alike): like `vec![0.0; n]`,
/// pages are only backed by memory once touched (a server's unused state
/// slots cost nothing), which an over-aligned allocation, zeroed by
/// writing, would lose.
pub struct LineBuf<T: Pod = f32> {
    words: Words,
    /// The first word on a cache line (on a 2 MiB page for [`Words::Huge`]).
    start: usize,
    len: usize,
    _t: PhantomData<T>,
}

/// Where a [`LineBuf`]'s words live.
enum Words {
    Heap(Vec<u64>),
    /// An anonymous mapping, 2 MiB larger than the words, so that they can start a huge page.
    Huge(memmap2::MmapMut),
}

impl Words {
    fn all(&self) -> &[u64] {
        match self {
            Words::Heap(v) => v,
            // A mapping starts a page: aligned for u64, a whole number of words.
            Words::Huge(m) => bytemuck::cast_slice(m),
        }
    }

    fn all_mut(&mut self) -> &mut [u64] {
        match self {
            Words::Heap(v) => v,
            Words::Huge(m) => bytemuck::cast_slice_mut(m),
        }
    }
}

impl<T: Pod> Default for LineBuf<T> {
    fn default() -> Self {
        LineBuf { words: Words::Heap(Vec::new()), start: 0, len: 0, _t: PhantomData }
    }
}

impl<T: Pod> LineBuf<T> {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        let mut b = Self::default();
        b.grow(len);
        b
    }

    /// `len` zeros for weights, which products stream: from [`HUGE_PAGE`]
    /// bytes on, on huge pages (see the type's doc).
    pub fn zeroed_huge(len: usize) -> Self {
        let mut b = Self::default();
        b.make(len, true);
        b
    }

    /// At least `len` values, never shrunk. Growing drops the contents
    /// (all zeros after): the old buffer is freed before the new one is
    /// made, so the two never add up at the peak.
    pub fn grow(&mut self, len: usize) {
        if len > self.len {
            self.make(len, false);
        }
    }

    /// Replace the buffer with `len` zeros, on huge pages if asked and large enough.
    fn make(&mut self, len: usize, huge_pages: bool) {
        const { assert!(align_of::<T>() <= 8 && 8 % size_of::<T>() == 0, "LineBuf holds types that tile a u64") };
        self.words = Words::Heap(Vec::new());
        let n = Self::words_for(len);
        (self.words, self.start) = match huge_pages.then(|| huge(n * 8)).flatten() {
            Some(at) => at,
            None => {
                let v = vec![0u64; n + LINE_WORDS - 1];
                let start = (LINE - v.as_ptr() as usize % LINE) % LINE / 8;
                (Words::Heap(v), start)
            }
        };
        self.len = len;
    }

    fn words_for(len: usize) -> usize {
        (len * size_of::<T>()).div_ceil(8)
    }
}

/// `bytes` of zeros starting a 2 MiB page, their whole 2 MiB pages advised
/// huge, and the word they start at; `None` below [`HUGE_PAGE`], off Linux,
/// or if the mapping fails (the heap then serves, as for small buffers).
fn huge(bytes: usize) -> Option<(Words, usize)> {
    if bytes < HUGE_PAGE || !cfg!(target_os = "linux") {
        return None;
    }
    let map = memmap2::MmapMut::map_anon(bytes.checked_add(HUGE_PAGE)?).ok()?;
    let skip = (HUGE_PAGE - map.as_ptr() as usize % HUGE_PAGE) % HUGE_PAGE;
    #[cfg(target_os = "linux")]
    {
        // A hint: refused (a kernel without THP), the pages are small ones.
        let _ = map.advise_range(memmap2::Advice::HugePage, skip, bytes / HUGE_PAGE * HUGE_PAGE);
    }
    Some((Words::Huge(map), skip / 8))
}

impl<T: Pod> Deref for LineBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        let words = &self.words.all()[self.start..self.start + Self::words_for(self.len)];
        &bytemuck::cast_slice(words)[..self.len]
    }
}

impl<T: Pod> DerefMut for LineBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        let n = Self::words_for(self.len);
        let words = &mut self.words.all_mut()[self.start..self.start + n];
        &mut bytemuck::cast_slice_mut(words)[..self.len]
    }
}

/// Whether the mapping holding `p` asked for huge pages (`hg` in its
/// `VmFlags`); `None` (and a note) where the kernel has no transparent
/// huge pages to ask for.
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn advised_huge<T>(p: *const T) -> Option<bool> {
    if !thp_kernel() {
        eprintln!("skipped the MADV_HUGEPAGE check: this kernel has no transparent huge pages");
        return None;
    }
    let flags = vm_flags(p).expect("the mapping in /proc/self/smaps");
    Some(flags.split(' ').any(|f| f == "hg"))
}

/// Whether this kernel has transparent huge pages (so `MADV_HUGEPAGE` marks a mapping).
#[cfg(all(test, target_os = "linux"))]
fn thp_kernel() -> bool {
    std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists()
}

/// The `VmFlags` of this process's mapping that holds `p` (`hg`: asked for
/// huge pages), from `/proc/self/smaps`.
#[cfg(all(test, target_os = "linux"))]
fn vm_flags<T>(p: *const T) -> Option<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let addr = p as usize;
    let mut inside = false;
    for line in smaps.lines() {
        let range = line.split(' ').next().and_then(|r| r.split_once('-'));
        if let Some((a, b)) = range
            .and_then(|(a, b)| Some((usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?)))
        {
            inside = (a..b).contains(&addr);
        } else if let Some(flags) = line.strip_prefix("VmFlags:").filter(|_| inside) {
            return Some(flags.trim().to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    use super::{advised_huge, thp_kernel};
    use super::{line_starts, LineBuf, HUGE_PAGE};

    #[test]
    fn starts_a_cache_line_keeps_its_length_and_grows_zeroed() {
        let mut b = LineBuf::<f32>::zeroed(5);
        assert_eq!((b.len(), b.as_ptr() as usize % 64), (5, 0));
        b[4] = 1.0;
        b.grow(3);
        assert_eq!(b.len(), 5);
        assert_eq!(b[4], 1.0);
        b.grow(1000);
        assert_eq!((b.len(), b.as_ptr() as usize % 64), (1000, 0));
        assert!(b.iter().all(|&v| v == 0.0));
        assert!(LineBuf::<f32>::default().is_empty());
        for n in [1, 33, 4096, 1 << 20] {
            let h = LineBuf::<half::bf16>::zeroed(n);
            assert_eq!((h.len(), h.as_ptr() as usize % 64), (n, 0));
            let w = LineBuf::<u64>::zeroed(n);
            assert_eq!((w.len(), w.as_ptr() as usize % 64), (n, 0));
        }
    }

    #[test]
    fn runs_laid_out_from_cache_lines() {
        assert_eq!(line_starts([3, 8, 0, 9, 1]), (vec![0, 8, 16, 16, 32], 40));
        assert_eq!(line_starts([]), (vec![], 0));
    }

    #[test]
    fn large_weights_start_a_huge_page_and_ask_for_huge_pages() {
        // Just under, at and over one 2 MiB page.
        for bytes in [HUGE_PAGE - 64, HUGE_PAGE, 3 * HUGE_PAGE + 8] {
            let mut b = LineBuf::<u8>::zeroed_huge(bytes);
            assert_eq!(b.len(), bytes);
            let at = b.as_ptr() as usize;
            assert_eq!(at % 64, 0);
            assert!(b.iter().all(|&v| v == 0));
            b[bytes - 1] = 7;
            assert_eq!(b[bytes - 1], 7);
            if bytes < HUGE_PAGE {
                continue;
            }
            assert_eq!(at % HUGE_PAGE, 0, "{bytes} bytes do not start a 2 MiB page");
            #[cfg(target_os = "linux")]
            assert_eq!(advised_huge(b.as_ptr()), thp_kernel().then_some(true), "{bytes} bytes");
        }
        // States and scratch (grown) stay on small pages.
        let mut b = LineBuf::<f32>::zeroed(16);
        b[3] = 2.0;
        b.grow(HUGE_PAGE);
        assert_eq!((b.len(), b.as_ptr() as usize % 64), (HUGE_PAGE, 0));
        assert!(b.iter().all(|&v| v == 0.0));
        #[cfg(target_os = "linux")]
        assert_eq!(advised_huge(b.as_ptr()), thp_kernel().then_some(false));
    }

    /// Resident bytes of this process.
    #[cfg(target_os = "linux")]
    fn resident() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        statm.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap() * 4096
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn untouched_values_take_no_memory() {
        // 1 GiB of zeros: a buffer zeroed by writing would be resident at once.
        let before = resident();
        let b = LineBuf::<f32>::zeroed(1 << 28);
        let grown = resident().saturating_sub(before);
        assert!(grown < 256 << 20, "{grown} bytes resident after allocating 1 GiB");
        assert_eq!((b[0], b[(1 << 28) - 1]), (0.0, 0.0));
    }
}
