//! A matrix in host memory as a pass reads it: its element type and a borrowed, possibly unaligned,
//! row-major buffer.

use std::marker::PhantomData;

/// Element type of a matrix in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    F32,
    F64,
    Bf16,
    F16,
}

impl Elem {
    pub fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::F64 => 8,
            Elem::Bf16 | Elem::F16 => 2,
        }
    }
}

/// A dense row-major matrix in host memory, borrowed for `'a`. The data may be unaligned (a tensor
/// inside a memory-mapped safetensors file): it is read with unaligned loads only.
#[derive(Clone, Copy)]
pub struct HostMatrix<'a> {
    ptr: *const u8,
    pub rows: usize,
    pub cols: usize,
    pub elem: Elem,
    _data: PhantomData<&'a [u8]>,
}

// SAFETY: a HostMatrix only reads memory that its creator guarantees stays valid and unwritten for 'a.
unsafe impl Send for HostMatrix<'_> {}
unsafe impl Sync for HostMatrix<'_> {}

impl<'a> HostMatrix<'a> {
    /// # Safety
    /// `ptr` must be valid for reads of `rows · cols · elem.size()` bytes, and not written, for `'a`.
    pub unsafe fn from_raw(ptr: *const u8, rows: usize, cols: usize, elem: Elem) -> HostMatrix<'a> {
        HostMatrix { ptr, rows, cols, elem, _data: PhantomData }
    }

    pub(crate) fn row(&self, i: usize) -> *const u8 {
        // SAFETY: i < rows, so the offset stays inside the matrix.
        unsafe { self.ptr.add(i * self.cols * self.elem.size()) }
    }
}
