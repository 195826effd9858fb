//! One pass over a weight matrix in host memory: `B = A·Q` and `W = Aᵀ·B = AᵀA·Q` for a block `Q` of
//! up to a few dozen columns, and on request `Σ a_ij²` in float64, all from a single read of `A`.
//!
//! Why not libtorch's `mm`: a product with an 8-column block is a matrix–vector product in disguise,
//! bound by reading `A`, and on the development machine MKL's `sgemm` reached 10 GB/s for `A·Q` and 2
//! GB/s for `Aᵀ·B` (a transposed operand), where a read runs at 40 GB/s from DRAM. Two such products
//! and the separate float64 norm read `A` three times and wrote W-sized temporaries. Here each group of
//! 4 rows is read from memory once and then, from L1, multiplied by `Q` (giving 4 rows of `B`) and
//! scattered into `W` (`W += A_rowsᵀ · B_rows`).
//!
//! Rounding: products are summed in float32 (float64 for float64 matrices), and the float32 partial
//! sums are folded into float64 every [`SEGMENT`] terms along a row and every [`FOLD_GROUPS`] row groups
//! along a column, so that no float32 sum runs over more than about a thousand terms whatever the shape.
//! The norm squares each element in float64 (exact for float32, bf16 and f16 inputs) and sums in float64.
//!
//! Three code paths compute the same thing: AVX-512F and AVX2+FMA (float32 inputs, chosen at run time;
//! `GAINGUARD_SPECTRA_KERNELS` may name a slower one) and portable Rust (float64, and any CPU). The two
//! SIMD paths read 16 (8) consecutive elements of 4 rows and of 4 (2) columns of the block per step, so
//! that every load feeds several FMAs. bf16 and f16 rows are widened to float32 four at a time into a
//! small per-thread buffer, never as a whole matrix.

use std::marker::PhantomData;
use std::sync::OnceLock;

/// Columns of `Q` in one packed block; the AVX-512 kernels take them four at a time, the AVX2 ones two.
pub(crate) const LANES: usize = 8;
/// Rows of `A` read together; each row of `Q` (or `W`) is loaded once per group.
const R: usize = 4;
/// Products summed in float32 registers along a row before they are folded into float64 (a multiple
/// of 16: the SIMD kernels read lines of 16 or 8).
const SEGMENT: usize = 1024;
/// Row groups accumulated into `W` in float32 before it is folded into float64 (256 rows).
const FOLD_GROUPS: usize = 64;

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

    fn row(&self, i: usize) -> *const u8 {
        // SAFETY: i < rows, so the offset stays inside the matrix.
        unsafe { self.ptr.add(i * self.cols * self.elem.size()) }
    }
}

/// The path float32 passes take, chosen once: the fastest this CPU runs, or a slower one that
/// `GAINGUARD_SPECTRA_KERNELS` names (`avx2` or `portable`; benchmarks use it to time the paths of CPUs
/// without AVX-512 on one that has it). A name this CPU cannot run, or any other value, is ignored.
pub(crate) fn flavour() -> Flavour {
    static FLAVOUR: OnceLock<Flavour> = OnceLock::new();
    *FLAVOUR.get_or_init(|| {
        let asked = match std::env::var("GAINGUARD_SPECTRA_KERNELS").as_deref() {
            Ok("avx2") => Some(Flavour::Avx2),
            Ok("portable") => Some(Flavour::Portable),
            _ => None,
        };
        asked.filter(|f| f.runs_here()).unwrap_or_else(Flavour::detect)
    })
}

/// The name of the code path float32 passes take in this process: `avx512`, `avx2` or `portable`.
pub fn kernels() -> &'static str {
    match flavour() {
        Flavour::Avx512 => "avx512",
        Flavour::Avx2 => "avx2",
        Flavour::Portable => "portable",
    }
}

/// Which SIMD code path computes a float32 pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flavour {
    Portable,
    Avx2,
    Avx512,
}

impl Flavour {
    /// The fastest path this CPU runs.
    pub(crate) fn detect() -> Flavour {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Flavour::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Flavour::Avx2;
            }
        }
        Flavour::Portable
    }

    /// Whether this CPU can run the path.
    pub(crate) fn runs_here(self) -> bool {
        match self {
            Flavour::Portable => true,
            Flavour::Avx2 => matches!(Flavour::detect(), Flavour::Avx2 | Flavour::Avx512),
            Flavour::Avx512 => Flavour::detect() == Flavour::Avx512,
        }
    }

    /// Length of one packed `n × 8` block of `Q` or `W`. The SIMD paths store it column by column, each
    /// column zero-padded to [`column_stride`] (a whole number of registers), so that one load of
    /// consecutive elements of a row meets as many consecutive elements of a column, and a block of 4
    /// columns or fewer (a warm start's) touches only those. The portable path stores rows of 8.
    fn packed_len(self, n: usize) -> usize {
        match self {
            Flavour::Avx512 | Flavour::Avx2 => column_stride(n) * LANES,
            Flavour::Portable => n * LANES,
        }
    }

    /// `f(j, position of (j, col))` for `j < n` in one packed block, in order of `j`.
    #[inline(always)]
    fn each_row(self, col: usize, n: usize, mut f: impl FnMut(usize, usize)) {
        match self {
            Flavour::Avx512 | Flavour::Avx2 => {
                let base = col * column_stride(n);
                for j in 0..n {
                    f(j, base + j);
                }
            }
            _ => {
                for j in 0..n {
                    f(j, j * LANES + col);
                }
            }
        }
    }

    /// The parts of a packed block of `plen` with `live` columns that the kernels touch, as
    /// `(step, take)`: `take` values from every `step`-th one. The SIMD paths touch the first `live` columns.
    fn live_spans(self, plen: usize, live: usize) -> (usize, usize) {
        match self {
            Flavour::Avx512 | Flavour::Avx2 => (plen, live * plen / LANES),
            Flavour::Portable => (plen, plen),
        }
    }
}

/// The distance between two columns of a packed block (SIMD paths): `n` rounded up to 16.
fn column_stride(n: usize) -> usize {
    n.div_ceil(16) * 16
}

/// The arithmetic type of a pass: float32 for f32/bf16/f16 matrices, float64 for f64 ones.
pub(crate) trait Real: Copy + Default + Send + Sync + std::ops::Add<Output = Self> + std::ops::Mul<Output = Self> + 'static {
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    /// The rows' products with the packed block `q`, each folded into float64. Meanwhile `next` (the
    /// next group's rows, `n` elements of `next_size` bytes each) is prefetched into L2, so that reading
    /// memory overlaps the arithmetic instead of stalling the next group.
    ///
    /// # Safety
    /// Each `rows[i]` points at `n` readable values; `q` at `flavour.packed_len(n)`; `next[i]` at
    /// `n · next_size` bytes (prefetches of them never fault, but must stay inside the allocation).
    /// Columns from `live` on are zero in `q` (and come out zero); a path may skip them.
    unsafe fn dot(flavour: Flavour, rows: &[*const Self; R], n: usize, q: *const Self, live: usize, next: &Prefetch) -> [[f64; LANES]; R];
    /// `w[j] += Σ_i rows[i][j] · b[i]` over the packed block `w`; columns from `live` on are zero in
    /// `b` and may be left alone.
    ///
    /// # Safety
    /// As for [`Real::dot`], with `w` writable.
    unsafe fn axpy(flavour: Flavour, rows: &[*const Self; R], n: usize, b: &[[Self; LANES]; R], live: usize, w: *mut Self);
    /// [`Real::dot`], and `Σ x²` of each row (each square and the sum in float64) added to `squares`:
    /// the first pass's norm read from the same loads as the products, so that the read of W from memory
    /// overlaps the arithmetic (as a loop of its own before the products, it did not: one core waited a
    /// whole read of W for it). The default is the two one after the other.
    ///
    /// # Safety
    /// As for [`Real::dot`].
    unsafe fn dot_squares(flavour: Flavour, rows: &[*const Self; R], n: usize, q: *const Self, live: usize, next: &Prefetch, squares: &mut [f64; R]) -> [[f64; LANES]; R] {
        for (s, row) in squares.iter_mut().zip(rows) {
            *s += Self::sum_squares(flavour, *row, n);
        }
        Self::dot(flavour, rows, n, q, live, next)
    }
    /// `Σ x²` of one row, each square and the sum in float64.
    ///
    /// # Safety
    /// `row` points at `n` readable values.
    unsafe fn sum_squares(flavour: Flavour, row: *const Self, n: usize) -> f64;
    /// `fold += w` in float64, then `w = 0` (slices of one length).
    fn fold(flavour: Flavour, fold: &mut [f64], w: &mut [Self]) {
        let _ = flavour;
        portable::fold(fold, w);
    }
}

impl Real for f32 {
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    unsafe fn dot(flavour: Flavour, rows: &[*const f32; R], n: usize, q: *const f32, live: usize, next: &Prefetch) -> [[f64; LANES]; R] {
        match flavour {
            #[cfg(target_arch = "x86_64")]
            Flavour::Avx512 => x86::dot_avx512(rows, n, q, live, next),
            #[cfg(target_arch = "x86_64")]
            Flavour::Avx2 => x86::dot_avx2(rows, n, q, live, next),
            _ => {
                let _ = next;
                portable::dot(rows, n, q)
            }
        }
    }
    unsafe fn dot_squares(flavour: Flavour, rows: &[*const f32; R], n: usize, q: *const f32, live: usize, next: &Prefetch, squares: &mut [f64; R]) -> [[f64; LANES]; R] {
        match flavour {
            #[cfg(target_arch = "x86_64")]
            Flavour::Avx512 => x86::dot_squares_avx512(rows, n, q, live, next, squares),
            #[cfg(target_arch = "x86_64")]
            Flavour::Avx2 => x86::dot_squares_avx2(rows, n, q, live, next, squares),
            _ => {
                for (s, row) in squares.iter_mut().zip(rows) {
                    *s += Self::sum_squares(flavour, *row, n);
                }
                Self::dot(flavour, rows, n, q, live, next)
            }
        }
    }
    unsafe fn axpy(flavour: Flavour, rows: &[*const f32; R], n: usize, b: &[[f32; LANES]; R], live: usize, w: *mut f32) {
        match flavour {
            #[cfg(target_arch = "x86_64")]
            Flavour::Avx512 => x86::axpy_avx512(rows, n, b, live, w),
            #[cfg(target_arch = "x86_64")]
            Flavour::Avx2 => x86::axpy_avx2(rows, n, b, live, w),
            _ => portable::axpy(rows, n, b, w),
        }
    }
    unsafe fn sum_squares(flavour: Flavour, row: *const f32, n: usize) -> f64 {
        match flavour {
            #[cfg(target_arch = "x86_64")]
            Flavour::Avx512 => x86::sum_squares_avx512(row, n),
            #[cfg(target_arch = "x86_64")]
            Flavour::Avx2 => x86::sum_squares_avx2(row, n),
            _ => portable::sum_squares(row, n),
        }
    }
    fn fold(flavour: Flavour, fold: &mut [f64], w: &mut [f32]) {
        match flavour {
            // SAFETY: the path runs only where the CPU has AVX-512F.
            #[cfg(target_arch = "x86_64")]
            Flavour::Avx512 => unsafe { x86::fold_avx512(fold, w) },
            _ => portable::fold(fold, w),
        }
    }
}

impl Real for f64 {
    fn from_f64(x: f64) -> f64 {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    unsafe fn dot(_: Flavour, rows: &[*const f64; R], n: usize, q: *const f64, _: usize, _: &Prefetch) -> [[f64; LANES]; R] {
        portable::dot(rows, n, q)
    }
    unsafe fn axpy(_: Flavour, rows: &[*const f64; R], n: usize, b: &[[f64; LANES]; R], _: usize, w: *mut f64) {
        portable::axpy(rows, n, b, w)
    }
    unsafe fn sum_squares(_: Flavour, row: *const f64, n: usize) -> f64 {
        portable::sum_squares(row, n)
    }
}

/// The rows of the group after the current one, to prefetch while the current one is multiplied.
pub(crate) struct Prefetch {
    rows: [*const u8; R],
    elem_size: usize,
}

/// What a pass computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `B = A·Q` (kept for a later [`Mode::Backward`]) and `W = Aᵀ·B`.
    Full,
    /// `B = A·Q` only: the last iteration of a warm start needs `BᵀB` and not the next block.
    Forward,
    /// `W = Aᵀ·B` from the `B` of the previous [`Mode::Forward`] pass.
    Backward,
}

/// One pass's request: the block `q` (`a.cols × width`, column-major, float64; ignored by
/// [`Mode::Backward`]), what to compute, whether to sum the squares too, and on how many threads.
#[derive(Clone, Copy)]
pub struct PassRequest<'q> {
    pub q: &'q [f64],
    pub width: usize,
    pub mode: Mode,
    pub norm: bool,
    pub threads: usize,
}

/// What one thread accumulates.
#[derive(Default)]
struct Part<T> {
    w: Vec<T>,
    fold: Vec<f64>,
    bb: Vec<f64>,
    widened: Vec<f32>,
    sum_squares: f64,
}

/// A raw pointer that threads writing disjoint rows may share.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: each thread writes only the rows of B in its own range.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

/// Buffers of the passes over one matrix, reused from call to call.
pub(crate) struct Workspace<T> {
    flavour: Flavour,
    q: Vec<T>,
    /// `B`, one `rows × 8` block per 8 columns.
    b: Vec<T>,
    parts: Vec<Part<T>>,
}

impl<T: Real> Workspace<T> {
    pub(crate) fn new(flavour: Flavour) -> Workspace<T> {
        // The float64 path is portable only; its layout is the plain one.
        let flavour = if std::mem::size_of::<T>() == 8 { Flavour::Portable } else { flavour };
        Workspace { flavour, q: Vec::new(), b: Vec::new(), parts: Vec::new() }
    }

    /// One pass over `a` with the block of `req`.
    ///
    /// Writes `W = AᵀA·Q` to `w_out` (column-major, `a.cols × width`) unless the mode is
    /// [`Mode::Forward`], and `BᵀB = QᵀAᵀA·Q` to `bb_out` (`width × width`) unless it is
    /// [`Mode::Backward`]. Returns `Σ a_ij²` when `req.norm` (NaN otherwise); a non-finite sum means a
    /// non-finite element (or, for float64 matrices only, squares that overflow).
    pub(crate) fn pass(&mut self, a: &HostMatrix, req: PassRequest, w_out: &mut [f64], bb_out: &mut [f64]) -> f64 {
        let PassRequest { q, width, mode, norm, threads } = req;
        let (m, n) = (a.rows, a.cols);
        let chunks = width.div_ceil(LANES);
        let plen = self.flavour.packed_len(n);
        if mode != Mode::Backward {
            self.q.clear();
            self.q.resize(chunks * plen, T::default());
            for col in 0..width {
                let (c, k) = (col / LANES, col % LANES);
                let (packed, src) = (&mut self.q[c * plen..(c + 1) * plen], &q[col * n..(col + 1) * n]);
                self.flavour.each_row(k, n, |j, at| packed[at] = T::from_f64(src[j]));
            }
            self.b.clear();
            self.b.resize(chunks * m * LANES, T::default());
        }
        assert_eq!(self.b.len(), chunks * m * LANES, "a backward pass follows a forward pass of the same width");
        // Row ranges per thread, whole groups each; a thread gets at least 16 groups.
        let groups = m.div_ceil(R);
        let threads = threads.clamp(1, groups.div_ceil(16).max(1));
        let per = groups.div_ceil(threads) * R;
        self.parts.resize_with(threads, Part::default);
        for p in &mut self.parts[..threads] {
            // Each thread zeroes the parts of w and fold its pass uses (Job::run), in parallel.
            if mode != Mode::Forward {
                p.w.resize(chunks * plen, T::default());
                p.fold.resize(chunks * plen, 0.0);
            }
            p.bb.clear();
            p.bb.resize(width * width, 0.0);
            p.sum_squares = 0.0;
        }
        let job = Job { a: *a, flavour: self.flavour, q: &self.q, b: Shared(self.b.as_mut_ptr()), chunks, plen, width, mode, norm };
        if threads == 1 {
            job.run(0, m, &mut self.parts[0]);
        } else {
            for_each_part(&mut self.parts[..threads], |i, p| job.run((i * per).min(m), ((i + 1) * per).min(m), p));
        }
        let parts = &self.parts[..threads];
        if mode != Mode::Forward {
            for col in 0..width {
                let (c, k) = (col / LANES, col % LANES);
                let out = &mut w_out[col * n..(col + 1) * n];
                // The parts added in order (the first alone is exact: −0 + x = x).
                for (i, p) in parts.iter().enumerate() {
                    let fold = &p.fold[c * plen..(c + 1) * plen];
                    if i == 0 {
                        self.flavour.each_row(k, n, |j, at| out[j] = fold[at]);
                    } else {
                        self.flavour.each_row(k, n, |j, at| out[j] += fold[at]);
                    }
                }
            }
        }
        if mode != Mode::Backward {
            for x in 0..width {
                for y in x..width {
                    let v: f64 = parts.iter().map(|p| p.bb[x * width + y]).sum();
                    bb_out[x * width + y] = v;
                    bb_out[y * width + x] = v;
                }
            }
        }
        if norm {
            parts.iter().map(|p| p.sum_squares).sum()
        } else {
            f64::NAN
        }
    }
}

/// What every thread of one pass shares.
struct Job<'a, T> {
    a: HostMatrix<'a>,
    flavour: Flavour,
    q: &'a [T],
    b: Shared<T>,
    chunks: usize,
    plen: usize,
    width: usize,
    mode: Mode,
    norm: bool,
}

// SAFETY: the shared B pointer is written at disjoint rows; everything else is read-only.
unsafe impl<T: Sync> Sync for Job<'_, T> {}

impl<T: Real> Job<'_, T> {
    /// Rows `r0..r1` into `part`.
    fn run(&self, r0: usize, r1: usize, part: &mut Part<T>) {
        let (m, n) = (self.a.rows, self.a.cols);
        let widen = self.a.elem == Elem::Bf16 || self.a.elem == Elem::F16;
        debug_assert!(!widen || std::mem::size_of::<T>() == 4, "bf16 and f16 are widened to float32");
        if widen {
            part.widened.resize(R * n, 0.0);
        }
        if self.mode != Mode::Forward {
            self.each_live_span(|a, b| {
                part.w[a..b].fill(T::default());
                part.fold[a..b].fill(0.0);
            });
        }
        let mut groups = 0;
        let mut r = r0;
        while r < r1 {
            let count = R.min(r1 - r);
            let mut rows = [std::ptr::null::<T>(); R];
            for (i, row) in rows.iter_mut().enumerate() {
                // Missing rows of the last group repeat its last row; their B is zero.
                let src = r + i.min(count - 1);
                *row = if widen {
                    // SAFETY: `widened` holds R·n floats; T is f32 whenever the matrix is widened.
                    unsafe { (part.widened.as_ptr() as *const T).add(i.min(count - 1) * n) }
                } else {
                    self.a.row(src) as *const T
                };
            }
            // The next group's rows in memory (the last group prefetches its own rows again).
            let next_start = if r + count < r1 { r + count } else { r };
            let next = Prefetch { rows: std::array::from_fn(|i| self.a.row((next_start + i).min(r1 - 1))), elem_size: self.a.elem.size() };
            if widen {
                for i in 0..count {
                    let s = widen_row(&self.a, r + i, &mut part.widened[i * n..(i + 1) * n]);
                    if self.norm {
                        part.sum_squares += s;
                    }
                }
            } else if self.norm && self.mode == Mode::Backward {
                for row in rows.iter().take(count) {
                    // SAFETY: each row points at n elements of the matrix.
                    part.sum_squares += unsafe { T::sum_squares(self.flavour, *row, n) };
                }
            }
            // The norm of rows read in place comes with the first chunk's products.
            let fuse_norm = self.norm && !widen && self.mode != Mode::Backward;
            for c in 0..self.chunks {
                let live = (self.width - c * LANES).min(LANES);
                // SAFETY: B has chunks·m·8 elements; this thread alone writes rows r..r+count.
                let b_rows = unsafe { self.b.0.add((c * m + r) * LANES) };
                let mut b = [[T::default(); LANES]; R];
                if self.mode == Mode::Backward {
                    for (i, bi) in b.iter_mut().enumerate().take(count) {
                        for (k, v) in bi.iter_mut().enumerate() {
                            // SAFETY: as above.
                            *v = unsafe { *b_rows.add(i * LANES + k) };
                        }
                    }
                } else {
                    // SAFETY: q holds one packed block per chunk.
                    let q = unsafe { self.q.as_ptr().add(c * self.plen) };
                    let d = if fuse_norm && c == 0 {
                        let mut squares = [0f64; R];
                        // SAFETY: rows hold n values each, q one packed block per chunk.
                        let d = unsafe { T::dot_squares(self.flavour, &rows, n, q, live, &next, &mut squares) };
                        // Repeated rows of a short last group are not counted twice.
                        part.sum_squares += squares[..count].iter().sum::<f64>();
                        d
                    } else {
                        // SAFETY: rows hold n values each, q one packed block per chunk.
                        unsafe { T::dot(self.flavour, &rows, n, q, live, &next) }
                    };
                    for i in 0..count {
                        for k in 0..LANES {
                            b[i][k] = T::from_f64(d[i][k]);
                            // SAFETY: as above.
                            unsafe { *b_rows.add(i * LANES + k) = b[i][k] };
                        }
                    }
                }
                if self.mode != Mode::Forward {
                    // SAFETY: part.w holds one packed block per chunk.
                    unsafe { T::axpy(self.flavour, &rows, n, &b, live, part.w.as_mut_ptr().add(c * self.plen)) };
                }
            }
            groups += 1;
            if groups % FOLD_GROUPS == 0 && self.mode != Mode::Forward {
                self.fold(part);
            }
            r += count;
        }
        if self.mode != Mode::Forward {
            self.fold(part);
        }
        if self.mode != Mode::Backward {
            // BᵀB of this thread's rows, in float64.
            let w = self.width;
            let mut row = [0f64; 64];
            let row = &mut row[..w.min(64)];
            if w > 64 {
                // Blocks this wide (top-k of 60 and more) are rare; a heap row then.
                return self.gram_wide(r0, r1, part);
            }
            if w <= 4 {
                return self.gram_block::<4>(r0, r1, part);
            }
            if w <= LANES {
                return self.gram_block::<LANES>(r0, r1, part);
            }
            for r in r0..r1 {
                for (col, v) in row.iter_mut().enumerate() {
                    // SAFETY: rows r0..r1 of B were written above by this thread.
                    *v = unsafe { *self.b.0.add(((col / LANES) * m + r) * LANES + col % LANES) }.to_f64();
                }
                for x in 0..w {
                    let bx = row[x];
                    for y in x..w {
                        part.bb[x * w + y] += bx * row[y];
                    }
                }
            }
        }
    }
}

impl<T: Real> Job<'_, T> {
    /// `BᵀB` of rows `r0..r1` for a block of at most `K ≤ 8` columns (one block of `B`, whose unused
    /// columns are zero): the sums in registers, each over the rows in order, as in the wider paths.
    fn gram_block<const K: usize>(&self, r0: usize, r1: usize, part: &mut Part<T>) {
        let w = self.width;
        let mut acc = [[0f64; K]; K];
        for r in r0..r1 {
            // SAFETY: rows r0..r1 of B were written by this thread.
            let br: [f64; K] = std::array::from_fn(|k| unsafe { *self.b.0.add(r * LANES + k) }.to_f64());
            for (x, ax) in acc.iter_mut().enumerate() {
                for (y, v) in ax.iter_mut().enumerate() {
                    *v += br[x] * br[y];
                }
            }
        }
        for x in 0..w {
            for y in x..w {
                part.bb[x * w + y] += acc[x][y];
            }
        }
    }

    /// `BᵀB` of rows `r0..r1` for blocks wider than 64 columns.
    fn gram_wide(&self, r0: usize, r1: usize, part: &mut Part<T>) {
        let (m, w) = (self.a.rows, self.width);
        let mut row = vec![0f64; w];
        for r in r0..r1 {
            for (col, v) in row.iter_mut().enumerate() {
                // SAFETY: rows r0..r1 of B were written by this thread.
                *v = unsafe { *self.b.0.add(((col / LANES) * m + r) * LANES + col % LANES) }.to_f64();
            }
            for x in 0..w {
                for y in x..w {
                    part.bb[x * w + y] += row[x] * row[y];
                }
            }
        }
    }
}

impl<T: Real> Job<'_, T> {
    /// `f(start, end)` for every range of a packed block of `W` that the kernels touch.
    fn each_live_span(&self, mut f: impl FnMut(usize, usize)) {
        for c in 0..self.chunks {
            let (step, take) = self.flavour.live_spans(self.plen, (self.width - c * LANES).min(LANES));
            let mut at = c * self.plen;
            while at < (c + 1) * self.plen {
                f(at, at + take);
                at += step;
            }
        }
    }

    /// Adds the float32 `W` into the float64 one and zeroes it.
    fn fold(&self, part: &mut Part<T>) {
        let (w, fold) = (&mut part.w, &mut part.fold);
        self.each_live_span(|a, b| T::fold(self.flavour, &mut fold[a..b], &mut w[a..b]));
    }
}

/// Widens row `i` of a bf16 or f16 matrix into `out`; returns its `Σ x²` in float64.
fn widen_row(a: &HostMatrix, i: usize, out: &mut [f32]) -> f64 {
    let p = a.row(i) as *const u16;
    let mut s = 0.0;
    for (j, o) in out.iter_mut().enumerate() {
        // SAFETY: the row holds a.cols 16-bit values.
        let bits = unsafe { p.add(j).read_unaligned() };
        let x = match a.elem {
            Elem::Bf16 => f32::from_bits((bits as u32) << 16),
            _ => half::f16::from_bits(bits).to_f32(),
        };
        *o = x;
        s += (x as f64) * (x as f64);
    }
    s
}

/// Row `i` of `a` in float64.
pub(crate) fn read_row_f64(a: &HostMatrix, i: usize, out: &mut [f64]) {
    let p = a.row(i);
    for (j, o) in out[..a.cols].iter_mut().enumerate() {
        // SAFETY: the row holds a.cols elements of a.elem, read unaligned.
        *o = unsafe {
            match a.elem {
                Elem::F32 => (p as *const f32).add(j).read_unaligned() as f64,
                Elem::F64 => (p as *const f64).add(j).read_unaligned(),
                Elem::Bf16 => f32::from_bits(((p as *const u16).add(j).read_unaligned() as u32) << 16) as f64,
                Elem::F16 => half::f16::from_bits((p as *const u16).add(j).read_unaligned()).to_f64(),
            }
        };
    }
}

/// Whether every element of a float64 matrix is finite (its sum of squares may overflow when they all
/// are; narrower types cannot, so for them a finite sum of squares already says so).
pub(crate) fn all_finite(a: &HostMatrix) -> bool {
    let mut row = vec![0f64; a.cols];
    (0..a.rows).all(|i| {
        read_row_f64(a, i, &mut row);
        row.iter().all(|x| x.is_finite())
    })
}

/// `Σ x²` in float64 of every element of `a`, with `threads` threads (one pass, no temporaries).
pub fn sum_squares(a: &HostMatrix, threads: usize) -> f64 {
    let flavour = Flavour::detect();
    let part = |r0: usize, r1: usize| -> f64 {
        let mut s = 0.0;
        let mut buf = Vec::new();
        for r in r0..r1 {
            s += unsafe {
                // SAFETY: each row holds a.cols elements of a.elem.
                match a.elem {
                    Elem::F32 => f32::sum_squares(flavour, a.row(r) as *const f32, a.cols),
                    Elem::F64 => f64::sum_squares(flavour, a.row(r) as *const f64, a.cols),
                    Elem::Bf16 | Elem::F16 => {
                        buf.resize(a.cols, 0.0);
                        widen_row(a, r, &mut buf)
                    }
                }
            };
        }
        s
    };
    split_rows(a.rows, threads, a.cols, part)
}

/// `Σ (a_ij − b_ij)²` in float64, one pass over both (same shape and element type).
pub fn distance_squares(a: &HostMatrix, b: &HostMatrix, threads: usize) -> f64 {
    debug_assert!(a.rows == b.rows && a.cols == b.cols && a.elem == b.elem);
    let part = |r0: usize, r1: usize| -> f64 {
        let mut s = 0.0;
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for r in r0..r1 {
            match a.elem {
                Elem::F32 | Elem::F64 => {
                    for j in 0..a.cols {
                        // SAFETY: j < cols of row r in both matrices.
                        let d = unsafe {
                            if a.elem == Elem::F32 {
                                (a.row(r) as *const f32).add(j).read_unaligned() as f64 - (b.row(r) as *const f32).add(j).read_unaligned() as f64
                            } else {
                                (a.row(r) as *const f64).add(j).read_unaligned() - (b.row(r) as *const f64).add(j).read_unaligned()
                            }
                        };
                        s += d * d;
                    }
                }
                Elem::Bf16 | Elem::F16 => {
                    x.resize(a.cols, 0.0);
                    y.resize(a.cols, 0.0);
                    widen_row(a, r, &mut x);
                    widen_row(b, r, &mut y);
                    s += x.iter().zip(&y).map(|(p, q)| (*p as f64 - *q as f64).powi(2)).sum::<f64>();
                }
            }
        }
        s
    };
    split_rows(a.rows, threads, a.cols, part)
}

/// Runs `part` over row ranges on up to `threads` threads (each at least 1 MiB of work) and sums.
fn split_rows(rows: usize, threads: usize, cols: usize, part: impl Fn(usize, usize) -> f64 + Sync) -> f64 {
    let threads = threads.clamp(1, (rows * cols / (1 << 18)).max(1)).min(rows);
    if threads == 1 {
        return part(0, rows);
    }
    let per = rows.div_ceil(threads);
    let mut sums = vec![0.0; threads];
    for_each_part(&mut sums, |i, out| *out = part((i * per).min(rows), ((i + 1) * per).min(rows)));
    sums.iter().sum()
}

/// Runs `f(i)` for every `i < count`, in parallel, returning when all are done: the shape of a hook
/// ([`set_parallel_runner`]) that a program embedding this crate may install to run passes on its own
/// thread pool.
pub type ParallelRunner = fn(count: usize, f: &(dyn Fn(usize) + Sync));

static RUNNER: OnceLock<ParallelRunner> = OnceLock::new();

/// Runs the threaded parts of every later pass with `runner` instead of rayon's pool. A trainer linked
/// with libtorch installs libgomp's (gainguard does): libgomp's workers spin for a while after each
/// parallel region, and on a 2-core machine threads of another pool would wait behind them after every
/// libtorch call (a cold estimate took seconds instead of 50 ms that way). The first call wins; returns
/// whether this one did.
pub fn set_parallel_runner(runner: ParallelRunner) -> bool {
    RUNNER.set(runner).is_ok()
}

fn rayon_runner(count: usize, f: &(dyn Fn(usize) + Sync)) {
    rayon::in_place_scope(|s| {
        for i in 1..count {
            s.spawn(move |_| f(i));
        }
        f(0);
    });
}

/// A pointer to the parts that the threads of one region share, each touching only its own index.
struct PartsPtr<P>(*mut P);
// SAFETY: every thread dereferences a different index (see for_each_part).
unsafe impl<P: Send> Sync for PartsPtr<P> {}

/// Runs `f(i, &mut parts[i])` for every part, in parallel, on the installed runner.
fn for_each_part<P: Send>(parts: &mut [P], f: impl Fn(usize, &mut P) + Sync) {
    let runner = RUNNER.get().copied().unwrap_or(rayon_runner);
    let len = parts.len();
    let base = PartsPtr(parts.as_mut_ptr());
    let base = &base;
    runner(len, &|i| {
        assert!(i < len, "a parallel runner called part {i} of {len}");
        // SAFETY: a runner calls each index once, so no two threads hold the same part, and `parts`
        // outlives the call.
        f(i, unsafe { &mut *base.0.add(i) })
    });
}

mod portable {
    use super::{Real, LANES, R, SEGMENT};

    pub(super) unsafe fn dot<T: Real>(rows: &[*const T; R], n: usize, q: *const T) -> [[f64; LANES]; R] {
        let mut out = [[0f64; LANES]; R];
        let mut j0 = 0;
        while j0 < n {
            let j1 = n.min(j0 + SEGMENT);
            let mut acc = [[T::default(); LANES]; R];
            for j in j0..j1 {
                let qj = q.add(j * LANES);
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let a = rows[i].add(j).read_unaligned();
                    for (k, s) in acc_i.iter_mut().enumerate() {
                        *s = *s + a * *qj.add(k);
                    }
                }
            }
            for (o, a) in out.iter_mut().zip(&acc) {
                for (x, y) in o.iter_mut().zip(a) {
                    *x += y.to_f64();
                }
            }
            j0 = j1;
        }
        out
    }

    pub(super) unsafe fn axpy<T: Real>(rows: &[*const T; R], n: usize, b: &[[T; LANES]; R], w: *mut T) {
        for j in 0..n {
            let wj = w.add(j * LANES);
            let a: [T; R] = std::array::from_fn(|i| rows[i].add(j).read_unaligned());
            for k in 0..LANES {
                *wj.add(k) = *wj.add(k) + (a[0] * b[0][k] + a[1] * b[1][k]) + (a[2] * b[2][k] + a[3] * b[3][k]);
            }
        }
    }

    #[inline(always)]
    pub(super) fn fold<T: Real>(fold: &mut [f64], w: &mut [T]) {
        for (f, x) in fold.iter_mut().zip(w.iter_mut()) {
            *f += x.to_f64();
            *x = T::default();
        }
    }

    pub(super) unsafe fn sum_squares<T: Real>(row: *const T, n: usize) -> f64 {
        let mut acc = [0f64; 4];
        let mut j = 0;
        while j + 4 <= n {
            for (k, s) in acc.iter_mut().enumerate() {
                let x = row.add(j + k).read_unaligned().to_f64();
                *s += x * x;
            }
            j += 4;
        }
        let mut s: f64 = acc.iter().sum();
        while j < n {
            let x = row.add(j).read_unaligned().to_f64();
            s += x * x;
            j += 1;
        }
        s
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{column_stride, Prefetch, LANES, R, SEGMENT};
    use std::arch::x86_64::*;

    /// Prefetches the next group's data at column `j` (one call per 16 columns: a line of f32).
    #[inline(always)]
    unsafe fn prefetch(next: &Prefetch, j: usize) {
        for row in next.rows {
            _mm_prefetch(row.wrapping_add(j * next.elem_size) as *const i8, _MM_HINT_T1);
        }
    }

    #[inline(always)]
    unsafe fn load1(p: *const f32) -> f32 {
        p.read_unaligned()
    }

    /// An AVX2 load mask of the first `len < 8` lanes: a row's last, partial line.
    #[inline(always)]
    unsafe fn tail_mask8(len: usize) -> __m256i {
        _mm256_cmpgt_epi32(_mm256_set1_epi32(len as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    }

    /// The eight accumulators of four rows × two columns (`v[2i + c]`) reduced together: lane `2i + c` of
    /// the result holds the sum of `v[2i + c]`'s lanes.
    #[inline(always)]
    unsafe fn reduce8(v: &[__m256; 8]) -> __m256 {
        let h01 = _mm256_hadd_ps(v[0], v[1]);
        let h23 = _mm256_hadd_ps(v[2], v[3]);
        let h45 = _mm256_hadd_ps(v[4], v[5]);
        let h67 = _mm256_hadd_ps(v[6], v[7]);
        // Per 128-bit half: [Σ v0, Σ v1, Σ v2, Σ v3] of that half's lanes (then v4..v7).
        let lo = _mm256_hadd_ps(h01, h23);
        let hi = _mm256_hadd_ps(h45, h67);
        _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31))
    }

    /// The AVX2 form of the AVX-512 kernels' scheme (same packed layout): eight accumulators, four rows ×
    /// two columns, each taking 8 consecutive elements of its row per FMA; a block of more than two
    /// columns reads the segment's rows again for each further pair, from L1. With `SQ`, each row's
    /// float64 sum of squares from the first pair's sweep.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn dot_pairs<const SQ: bool>(rows: &[*const f32; R], n: usize, q: *const f32, live: usize, next: &Prefetch, squares: &mut [f64; R]) -> [[f64; LANES]; R] {
        let stride = column_stride(n);
        let mut out = [[0f64; LANES]; R];
        // Low and high halves of the lines apart: two chains of float64 FMAs per row.
        let mut sq = [_mm256_setzero_pd(); 2 * R];
        let mut j0 = 0;
        while j0 < n {
            let j1 = n.min(j0 + SEGMENT);
            for p in 0..live.div_ceil(2) {
                let cols = [q.add(2 * p * stride), q.add((2 * p + 1) * stride)];
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut j = j0;
                while j + 8 <= j1 {
                    if p == 0 && j % 16 == 0 {
                        prefetch(next, j);
                    }
                    let a: [__m256; R] = std::array::from_fn(|i| _mm256_loadu_ps(rows[i].add(j)));
                    pair_line(&a, &cols, j, &mut acc);
                    if SQ && p == 0 {
                        for i in 0..R {
                            let lo = _mm256_cvtps_pd(_mm_loadu_ps(rows[i].add(j)));
                            let hi = _mm256_cvtps_pd(_mm_loadu_ps(rows[i].add(j + 4)));
                            sq[2 * i] = _mm256_fmadd_pd(lo, lo, sq[2 * i]);
                            sq[2 * i + 1] = _mm256_fmadd_pd(hi, hi, sq[2 * i + 1]);
                        }
                    }
                    j += 8;
                }
                if j < j1 {
                    let k = tail_mask8(j1 - j);
                    let a: [__m256; R] = std::array::from_fn(|i| _mm256_maskload_ps(rows[i].add(j), k));
                    pair_line(&a, &cols, j, &mut acc);
                    if SQ && p == 0 {
                        for i in 0..R {
                            // Masked-off lanes are zero.
                            let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(a[i]));
                            let hi = _mm256_cvtps_pd(_mm256_extractf128_ps(a[i], 1));
                            sq[2 * i] = _mm256_fmadd_pd(lo, lo, sq[2 * i]);
                            sq[2 * i + 1] = _mm256_fmadd_pd(hi, hi, sq[2 * i + 1]);
                        }
                    }
                }
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), reduce8(&acc));
                for i in 0..R {
                    for c in 0..2 {
                        out[i][2 * p + c] += lanes[2 * i + c] as f64;
                    }
                }
            }
            j0 = j1;
        }
        if SQ {
            for i in 0..R {
                let mut lanes = [0f64; 4];
                _mm256_storeu_pd(lanes.as_mut_ptr(), _mm256_add_pd(sq[2 * i], sq[2 * i + 1]));
                squares[i] += (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
            }
        }
        out
    }

    /// 8 elements `a` of each row from `j` into the accumulators, times the two columns `cols`.
    #[inline(always)]
    unsafe fn pair_line(a: &[__m256; R], cols: &[*const f32; 2], j: usize, acc: &mut [__m256; 8]) {
        for (c, col) in cols.iter().enumerate() {
            // Packed columns are zero-padded to the stride: whole loads.
            let qc = _mm256_loadu_ps(col.add(j));
            for i in 0..R {
                acc[2 * i + c] = _mm256_fmadd_ps(a[i], qc, acc[2 * i + c]);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_avx2(rows: &[*const f32; R], n: usize, q: *const f32, live: usize, next: &Prefetch) -> [[f64; LANES]; R] {
        let mut unused = [0f64; R];
        dot_pairs::<false>(rows, n, q, live, next, &mut unused)
    }

    /// [`dot_avx2`], adding each row's `Σ x²` (squares and sums in float64) to `squares`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_squares_avx2(rows: &[*const f32; R], n: usize, q: *const f32, live: usize, next: &Prefetch, squares: &mut [f64; R]) -> [[f64; LANES]; R] {
        dot_pairs::<true>(rows, n, q, live, next, squares)
    }

    /// `w[c][j] += Σ_i a_i[j] · b[i][c]` for the live columns of the packed block `w`, two at a time.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy_avx2(rows: &[*const f32; R], n: usize, b: &[[f32; LANES]; R], live: usize, w: *mut f32) {
        let stride = column_stride(n);
        for p in 0..live.div_ceil(2) {
            let count = (live - 2 * p).min(2);
            let bv: [[__m256; 2]; R] = std::array::from_fn(|i| std::array::from_fn(|c| _mm256_set1_ps(b[i][2 * p + c])));
            let cols = [w.add(2 * p * stride), w.add((2 * p + 1) * stride)];
            let mut j = 0;
            while j + 8 <= n {
                let a: [__m256; R] = std::array::from_fn(|i| _mm256_loadu_ps(rows[i].add(j)));
                axpy_pair_line(&a, &bv, &cols, count, j);
                j += 8;
            }
            if j < n {
                let k = tail_mask8(n - j);
                let a: [__m256; R] = std::array::from_fn(|i| _mm256_maskload_ps(rows[i].add(j), k));
                // The padding past n gets zeros added (masked rows): it stays zero.
                axpy_pair_line(&a, &bv, &cols, count, j);
            }
        }
    }

    /// 8 elements `a` of each row from `j`, times `bv`, into the first `count` of the columns `cols`.
    #[inline(always)]
    unsafe fn axpy_pair_line(a: &[__m256; R], bv: &[[__m256; 2]; R], cols: &[*mut f32; 2], count: usize, j: usize) {
        for (c, col) in cols.iter().enumerate().take(count) {
            let p = col.add(j);
            let mut s = _mm256_loadu_ps(p);
            for i in 0..R {
                s = _mm256_fmadd_ps(a[i], bv[i][c], s);
            }
            _mm256_storeu_ps(p, s);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn sum_squares_avx2(row: *const f32, n: usize) -> f64 {
        let mut s0 = _mm256_setzero_pd();
        let mut s1 = _mm256_setzero_pd();
        let mut j = 0;
        while j + 8 <= n {
            let v = _mm256_loadu_ps(row.add(j));
            let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
            let hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
            s0 = _mm256_fmadd_pd(lo, lo, s0);
            s1 = _mm256_fmadd_pd(hi, hi, s1);
            j += 8;
        }
        let mut lanes = [0f64; 4];
        _mm256_storeu_pd(lanes.as_mut_ptr(), _mm256_add_pd(s0, s1));
        let mut s: f64 = lanes.iter().sum();
        while j < n {
            let x = load1(row.add(j)) as f64;
            s += x * x;
            j += 1;
        }
        s
    }

    /// The first `len < 16` lanes: a row's last, partial line.
    #[inline(always)]
    fn tail_mask(len: usize) -> __mmask16 {
        ((1u32 << len) - 1) as __mmask16
    }

    /// The sixteen accumulators of four rows × four columns (`v[4i + c]`) reduced together: lane `4c` of
    /// the `i`-th result holds the sum of `v[4i + c]`'s lanes. 52 instructions, where sixteen separate
    /// reductions take about 160.
    #[inline(always)]
    unsafe fn reduce16(v: &[__m512; 16]) -> [__m512; R] {
        // Pairs of vectors, 256-bit halves added: lanes 0–7 hold v[2p]'s partial sums, 8–15 v[2p+1]'s.
        let halves: [__m512; 8] = std::array::from_fn(|p| {
            let (x, y) = (v[2 * p], v[2 * p + 1]);
            _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE))
        });
        // Then 128-bit quarters: block t of the i-th vector holds v[4i + t]'s four partial sums.
        std::array::from_fn(|i| {
            let (x, y) = (halves[2 * i], halves[2 * i + 1]);
            let s = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
            // Within each block: lane 4t gets the block's sum.
            let s = _mm512_add_ps(s, _mm512_permute_ps(s, 0xB1));
            _mm512_add_ps(s, _mm512_permute_ps(s, 0x4E))
        })
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_avx512(rows: &[*const f32; R], n: usize, q: *const f32, live: usize, next: &Prefetch) -> [[f64; LANES]; R] {
        let mut unused = [0f64; R];
        dot_quads::<false>(rows, n, q, live, next, &mut unused)
    }

    /// [`dot_avx512`], adding each row's `Σ x²` (squares and sums in float64) to `squares`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_squares_avx512(rows: &[*const f32; R], n: usize, q: *const f32, live: usize, next: &Prefetch, squares: &mut [f64; R]) -> [[f64; LANES]; R] {
        dot_quads::<true>(rows, n, q, live, next, squares)
    }

    /// The dot products of four rows with the live columns of the packed block, four columns at a time:
    /// sixteen accumulators (row × column), each taking 16 consecutive elements of its row per FMA, so
    /// that one load of a row feeds four FMAs and one load of a column four more. With `SQ`, also each
    /// row's sum of squares from the same lines (loaded again from L1 as float64). A block of more than
    /// four columns reads the segment's rows again for the next four, from L1.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn dot_quads<const SQ: bool>(rows: &[*const f32; R], n: usize, q: *const f32, live: usize, next: &Prefetch, squares: &mut [f64; R]) -> [[f64; LANES]; R] {
        let stride = column_stride(n);
        let mut out = [[0f64; LANES]; R];
        // Low and high halves of the lines apart: two chains of float64 FMAs per row, not one of twice the length.
        let mut sq = [_mm512_setzero_pd(); 2 * R];
        let mut j0 = 0;
        while j0 < n {
            // SEGMENT is a multiple of 16, so only a row's last segment has a partial line.
            let j1 = n.min(j0 + SEGMENT);
            for h in 0..live.div_ceil(4) {
                let cols: [*const f32; 4] = std::array::from_fn(|c| q.add((4 * h + c) * stride));
                let mut acc = [_mm512_setzero_ps(); 16];
                let mut j = j0;
                while j + 16 <= j1 {
                    if h == 0 {
                        prefetch(next, j);
                    }
                    let a: [__m512; R] = std::array::from_fn(|i| _mm512_loadu_ps(rows[i].add(j)));
                    dot_line(&a, &cols, j, &mut acc);
                    if SQ && h == 0 {
                        for i in 0..R {
                            // Converted as they are loaded again (from L1): cheaper than splitting `a`.
                            let lo = _mm512_cvtps_pd(_mm256_loadu_ps(rows[i].add(j)));
                            let hi = _mm512_cvtps_pd(_mm256_loadu_ps(rows[i].add(j + 8)));
                            sq[2 * i] = _mm512_fmadd_pd(lo, lo, sq[2 * i]);
                            sq[2 * i + 1] = _mm512_fmadd_pd(hi, hi, sq[2 * i + 1]);
                        }
                    }
                    j += 16;
                }
                if j < j1 {
                    let k = tail_mask(j1 - j);
                    let a: [__m512; R] = std::array::from_fn(|i| _mm512_maskz_loadu_ps(k, rows[i].add(j)));
                    dot_line(&a, &cols, j, &mut acc);
                    if SQ && h == 0 {
                        for i in 0..R {
                            // Masked-off lanes are zero.
                            let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(a[i]));
                            let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[i]), 1)));
                            sq[2 * i] = _mm512_fmadd_pd(lo, lo, sq[2 * i]);
                            sq[2 * i + 1] = _mm512_fmadd_pd(hi, hi, sq[2 * i + 1]);
                        }
                    }
                }
                let sums = reduce16(&acc);
                for (i, s) in sums.iter().enumerate() {
                    let mut lanes = [0f32; 16];
                    _mm512_storeu_ps(lanes.as_mut_ptr(), *s);
                    for c in 0..4 {
                        out[i][4 * h + c] += lanes[4 * c] as f64;
                    }
                }
            }
            j0 = j1;
        }
        if SQ {
            for i in 0..R {
                squares[i] += _mm512_reduce_add_pd(_mm512_add_pd(sq[2 * i], sq[2 * i + 1]));
            }
        }
        out
    }

    /// 16 elements `a` of each row from `j` into the accumulators, times the four columns `cols`.
    #[inline(always)]
    unsafe fn dot_line(a: &[__m512; R], cols: &[*const f32; 4], j: usize, acc: &mut [__m512; 16]) {
        for (c, col) in cols.iter().enumerate() {
            // Packed columns are zero-padded to the stride: whole loads.
            let qc = _mm512_loadu_ps(col.add(j));
            for i in 0..R {
                acc[4 * i + c] = _mm512_fmadd_ps(a[i], qc, acc[4 * i + c]);
            }
        }
    }

    /// `w[c][j] += Σ_i a_i[j] · b[i][c]` for the live columns of the packed block `w`, four columns at a
    /// time: each load of 16 elements of a row feeds one FMA per column, and each column of `w` is read
    /// and written once per group of rows.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn axpy_avx512(rows: &[*const f32; R], n: usize, b: &[[f32; LANES]; R], live: usize, w: *mut f32) {
        let stride = column_stride(n);
        for h in 0..live.div_ceil(4) {
            let bv: [[__m512; 4]; R] = std::array::from_fn(|i| std::array::from_fn(|c| _mm512_set1_ps(b[i][4 * h + c])));
            let cols: [*mut f32; 4] = std::array::from_fn(|c| w.add((4 * h + c) * stride));
            let count = (live - 4 * h).min(4);
            let mut j = 0;
            while j + 16 <= n {
                let a: [__m512; R] = std::array::from_fn(|i| _mm512_loadu_ps(rows[i].add(j)));
                axpy_line(&a, &bv, &cols, count, j);
                j += 16;
            }
            if j < n {
                let k = tail_mask(n - j);
                let a: [__m512; R] = std::array::from_fn(|i| _mm512_maskz_loadu_ps(k, rows[i].add(j)));
                // The padding past n gets zeros added (masked rows): it stays zero.
                axpy_line(&a, &bv, &cols, count, j);
            }
        }
    }

    /// 16 elements `a` of each row from `j`, times `bv`, into the first `count` columns `cols` of `w`.
    #[inline(always)]
    unsafe fn axpy_line(a: &[__m512; R], bv: &[[__m512; 4]; R], cols: &[*mut f32; 4], count: usize, j: usize) {
        for (c, col) in cols.iter().enumerate().take(count) {
            let p = col.add(j);
            let mut s = _mm512_loadu_ps(p);
            for i in 0..R {
                s = _mm512_fmadd_ps(a[i], bv[i][c], s);
            }
            _mm512_storeu_ps(p, s);
        }
    }

    /// The portable fold, compiled for AVX-512 (16 floats widened per instruction).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fold_avx512(fold: &mut [f64], w: &mut [f32]) {
        super::portable::fold(fold, w)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sum_squares_avx512(row: *const f32, n: usize) -> f64 {
        let mut s0 = _mm512_setzero_pd();
        let mut s1 = _mm512_setzero_pd();
        let mut j = 0;
        while j + 16 <= n {
            let lo = _mm512_cvtps_pd(_mm256_loadu_ps(row.add(j)));
            let hi = _mm512_cvtps_pd(_mm256_loadu_ps(row.add(j + 8)));
            s0 = _mm512_fmadd_pd(lo, lo, s0);
            s1 = _mm512_fmadd_pd(hi, hi, s1);
            j += 16;
        }
        let mut s = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
        while j < n {
            let x = load1(row.add(j)) as f64;
            s += x * x;
            j += 1;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    /// A contiguous CPU tensor's elements as a host matrix (the plugin's `host_matrix` does this for
    /// every layout; libtorch is the reference here only).
    pub(crate) fn host(t: &Tensor) -> HostMatrix<'_> {
        assert!(t.is_contiguous() && t.dim() == 2);
        let elem = match t.kind() {
            Kind::Float => Elem::F32,
            Kind::Double => Elem::F64,
            Kind::BFloat16 => Elem::Bf16,
            Kind::Half => Elem::F16,
            k => panic!("no host element type for {k:?}"),
        };
        // SAFETY: a contiguous tensor holds rows·cols elements from data_ptr(), borrowed with it.
        unsafe { HostMatrix::from_raw(t.data_ptr() as *const u8, t.size()[0] as usize, t.size()[1] as usize, elem) }
    }

    /// The pass against libtorch's float64 products, on every path this CPU runs, for shapes whose
    /// rows and columns are not multiples of the group, segment or pair sizes.
    #[test]
    fn every_code_path_matches_float64_products() {
        for flavour in [Flavour::Portable, Flavour::Avx2, Flavour::Avx512].into_iter().filter(|f| f.runs_here()) {
            for (m, n, width) in [(37i64, 23i64, 8usize), (5, 1031, 3), (300, 2051, 12), (2100, 41, 8), (9, 1026, 4), (64, 50, 6)] {
                for kind in [Kind::Float, Kind::BFloat16, Kind::Double] {
                    let a = Tensor::randn([m, n], (Kind::Float, Device::Cpu)).to_kind(kind);
                    let q = Tensor::randn([n, width as i64], (Kind::Double, Device::Cpu));
                    let q_cols: Vec<f64> = Vec::try_from(&q.tr().contiguous().view([-1])).unwrap();
                    let a64 = a.to_kind(Kind::Double);
                    let b = a64.mm(&q);
                    let w_ref = Vec::<f64>::try_from(&a64.tr().mm(&b).tr().contiguous().view([-1])).unwrap();
                    let bb_ref = Vec::<f64>::try_from(&b.tr().mm(&b).contiguous().view([-1])).unwrap();
                    let ss_ref = a64.square().sum(Kind::Double).double_value(&[]);
                    let host = host(&a);
                    let (wn, bn) = (n as usize * width, width * width);
                    let scale = |v: &[f64]| v.iter().fold(0f64, |x, y| x.max(y.abs()));
                    let tol = if kind == Kind::Double { 1e-12 } else { 1e-5 };
                    for threads in [1, 3] {
                        let mut ws = Workspace::<f32>::new(flavour);
                        let mut ws64 = Workspace::<f64>::new(flavour);
                        let (mut w, mut bb) = (vec![0.0; wn], vec![0.0; bn]);
                        let ss = if kind == Kind::Double {
                            ws64.pass(&host, PassRequest { q: &q_cols, width, mode: Mode::Full, norm: true, threads }, &mut w, &mut bb)
                        } else {
                            ws.pass(&host, PassRequest { q: &q_cols, width, mode: Mode::Full, norm: true, threads }, &mut w, &mut bb)
                        };
                        let what = format!("{flavour:?} {m}x{n} width {width} {kind:?} threads {threads}");
                        assert!((ss - ss_ref).abs() <= 1e-13 * ss_ref, "{what}: sum of squares {ss} vs {ss_ref}");
                        let (sw, sb) = (scale(&w_ref), scale(&bb_ref));
                        for (x, y) in w.iter().zip(&w_ref) {
                            assert!((x - y).abs() <= tol * sw, "{what}: W {x} vs {y}");
                        }
                        for (x, y) in bb.iter().zip(&bb_ref) {
                            assert!((x - y).abs() <= tol * sb, "{what}: BᵀB {x} vs {y}");
                        }
                        // Forward then backward gives the same W.
                        if kind != Kind::Double {
                            let (mut w2, mut bb2) = (vec![0.0; wn], vec![0.0; bn]);
                            ws.pass(&host, PassRequest { q: &q_cols, width, mode: Mode::Forward, norm: false, threads }, &mut w2, &mut bb2);
                            ws.pass(&host, PassRequest { q: &q_cols, width, mode: Mode::Backward, norm: false, threads }, &mut w2, &mut vec![0.0; bn]);
                            assert_eq!(bb2, bb, "{what}: forward BᵀB");
                            for (x, y) in w2.iter().zip(&w) {
                                assert!((x - y).abs() <= 1e-6 * sw, "{what}: backward W {x} vs {y}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn sums_of_squares_and_distances_square_in_float64() {
        let a = Tensor::randn([333, 257], (Kind::Float, Device::Cpu));
        let b = &a + Tensor::randn([333, 257], (Kind::Float, Device::Cpu)) * 1e-3;
        let (ha, hb) = (host(&a), host(&b));
        let want = a.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[]);
        let d = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).square().sum(Kind::Double).double_value(&[]);
        for threads in [1, 2] {
            assert!((sum_squares(&ha, threads) - want).abs() <= 1e-13 * want);
            assert!((distance_squares(&ha, &hb, threads) - d).abs() <= 1e-12 * d);
        }
    }
}
