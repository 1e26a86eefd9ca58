//! Buffers that start on a cache line.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use bytemuck::{Pod, Zeroable};

/// 64 bytes on a 64-byte boundary.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A zeroed buffer of `T` (f32 unless said) whose first value starts a
/// cache line. A `Vec<f32>` of a few kilobytes or more starts 16 bytes into
/// one (the allocator's header), so every 16-wide load of a row straddled
/// two lines; rows of a multiple of 64 bytes now each start a line.
pub struct LineBuf<T: Pod = f32> {
    lines: Vec<Line>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Pod> Default for LineBuf<T> {
    fn default() -> Self {
        LineBuf { lines: Vec::new(), len: 0, _t: PhantomData }
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
    /// made, as a reallocation of over-aligned memory copies and held both
    /// (a prefill chunk's scratch twice over at the peak).
    pub fn grow(&mut self, len: usize) {
        if len > self.len {
            self.lines = Vec::new();
            self.lines = vec![Line::zeroed(); (len * size_of::<T>()).div_ceil(64)];
            self.len = len;
        }
    }
}

impl<T: Pod> Deref for LineBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &bytemuck::cast_slice(&self.lines)[..self.len]
    }
}

impl<T: Pod> DerefMut for LineBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
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
        let h = LineBuf::<half::bf16>::zeroed(33);
        assert_eq!((h.len(), h.as_ptr() as usize % 64), (33, 0));
    }
}
