//! Float buffers of the inference plan that start on a cache line: a vector of 16 floats
//! loaded at a multiple of 16 then never straddles two lines (an allocator's 16-byte
//! alignment would split every such load in two).

use std::ops::{Deref, DerefMut};

/// Floats per cache line of 64 bytes.
const LINE: usize = 16;

/// `len` floats from a 64-byte boundary.
#[derive(Debug, Default)]
pub struct Aligned {
    data: Vec<f32>,
    start: usize,
    len: usize,
}

impl Aligned {
    /// `len` zeros.
    pub fn zeros(len: usize) -> Self {
        let data = vec![0.0; len + LINE];
        let misaligned = data.as_ptr() as usize % (LINE * 4);
        let start = (LINE * 4 - misaligned) % (LINE * 4) / 4;
        Self { data, start, len }
    }

    /// The first `len` floats, the buffer grown when it must (its values are then
    /// zeros) and never shrunk: buffers shared by several values are sized by the largest
    /// once, not cleared at every step.
    pub fn grown(&mut self, len: usize) -> &mut [f32] {
        if self.len < len {
            *self = Self::zeros(len);
        }
        &mut self[..len]
    }
}

impl From<&[f32]> for Aligned {
    fn from(values: &[f32]) -> Self {
        let mut a = Self::zeros(values.len());
        a.copy_from_slice(values);
        a
    }
}

impl From<Vec<f32>> for Aligned {
    fn from(values: Vec<f32>) -> Self {
        Self::from(values.as_slice())
    }
}

/// A clone is a new allocation, aligned again.
impl Clone for Aligned {
    fn clone(&self) -> Self {
        Self::from(&self[..])
    }
}

impl Deref for Aligned {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.data[self.start..self.start + self.len]
    }
}

impl DerefMut for Aligned {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_on_a_cache_line_and_keeps_its_values() {
        for len in [0, 1, 17, 100_000] {
            let values: Vec<f32> = (0..len).map(|i| i as f32).collect();
            let a = Aligned::from(values.as_slice());
            assert_eq!(a.as_ptr() as usize % 64, 0);
            assert_eq!(&a[..], &values[..]);
            let b = a.clone();
            assert_eq!(b.as_ptr() as usize % 64, 0);
            assert_eq!(&b[..], &values[..]);
        }
        let mut a = Aligned::default();
        assert_eq!(a.grown(1000).len(), 1000);
        assert_eq!(a.as_ptr() as usize % 64, 0);
        let p = a.as_ptr();
        assert_eq!(a.grown(10).len(), 10);
        assert_eq!(a.as_ptr(), p, "never shrinks");
    }
}
