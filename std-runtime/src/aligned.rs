//! f32 buffers that start on a cache line.

use std::ops::{Deref, DerefMut};

use bytemuck::{Pod, Zeroable};

/// Sixteen f32 values on a 64-byte boundary.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// A zeroed f32 buffer whose first value starts a cache line. A `Vec<f32>`
/// of this size starts 16 bytes into one (the allocator's header), so every
/// 16-wide vector load of a row straddled two lines; rows a multiple of 16
/// values long now each start a line.
#[derive(Default)]
pub struct LineBuf {
    lines: Vec<Line>,
    len: usize,
}

impl LineBuf {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Self {
        LineBuf { lines: vec![Line::zeroed(); len.div_ceil(16)], len }
    }

    /// At least `len` values: grown with zeros when shorter, never shrunk.
    pub fn grow(&mut self, len: usize) {
        if len > self.len {
            self.lines.resize(len.div_ceil(16), Line::zeroed());
            self.len = len;
        }
    }
}

impl Deref for LineBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &bytemuck::cast_slice(&self.lines)[..self.len]
    }
}

impl DerefMut for LineBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::LineBuf;

    #[test]
    fn starts_a_cache_line_and_keeps_its_length() {
        let mut b = LineBuf::zeroed(5);
        assert_eq!((b.len(), b.as_ptr() as usize % 64), (5, 0));
        b[4] = 1.0;
        b.grow(3);
        assert_eq!(b.len(), 5);
        b.grow(1000);
        assert_eq!((b.len(), b.as_ptr() as usize % 64), (1000, 0));
        assert_eq!((b[4], b[999]), (1.0, 0.0));
        assert!(LineBuf::default().is_empty());
    }
}
