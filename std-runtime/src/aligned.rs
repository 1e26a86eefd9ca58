//! Buffers that start on a cache line.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use bytemuck::Pod;

/// Bytes in a cache line.
const LINE: usize = 64;

/// A zeroed buffer of `T` (f32 unless said) whose first value starts a
/// cache line. A `Vec<f32>` of a few kilobytes or more starts 16 bytes into
/// one (the allocator's header), so every 16-wide load of a row straddled
/// two lines; rows of a multiple of 64 bytes now each start a line.
///
/// The values sit a few words into a `Vec<u64>` of zeros from the allocator
/// (`calloc`): like `vec![0.0; n]`, its pages are only backed by memory once
/// touched (a server's unused state slots cost nothing), which an
/// over-aligned allocation, zeroed by writing, would lose.
pub struct LineBuf<T: Pod = f32> {
    words: Vec<u64>,
    /// The first word on a cache line.
    start: usize,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Pod> Default for LineBuf<T> {
    fn default() -> Self {
        LineBuf { words: Vec::new(), start: 0, len: 0, _t: PhantomData }
    }
}

impl<T: Pod> LineBuf<T> {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        let mut b = Self::default();
        b.grow(len);
        b
    }

    /// At least `len` values, never shrunk. Growing drops the contents
    /// (all zeros after): the old buffer is freed before the new one is
    /// made, so the two never add up at the peak.
    pub fn grow(&mut self, len: usize) {
        const { assert!(align_of::<T>() <= 8 && 8 % size_of::<T>() == 0, "LineBuf holds types that tile a u64") };
        if len > self.len {
            self.words = Vec::new();
            self.words = vec![0u64; Self::words_for(len) + LINE / 8 - 1];
            self.start = (LINE - self.words.as_ptr() as usize % LINE) % LINE / 8;
            self.len = len;
        }
    }

    fn words_for(len: usize) -> usize {
        (len * size_of::<T>()).div_ceil(8)
    }
}

impl<T: Pod> Deref for LineBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        let words = &self.words[self.start..self.start + Self::words_for(self.len)];
        &bytemuck::cast_slice(words)[..self.len]
    }
}

impl<T: Pod> DerefMut for LineBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        let n = Self::words_for(self.len);
        let words = &mut self.words[self.start..self.start + n];
        &mut bytemuck::cast_slice_mut(words)[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::LineBuf;

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
