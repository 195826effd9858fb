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
//! sums are folded into float64 every [`layout::SEGMENT`] terms along a row and every [`layout::FOLD_GROUPS`] row groups
//! along a column, so that no float32 sum runs over more than about a thousand terms whatever the shape.
//! The norm squares each element in float64 (exact for float32, bf16 and f16 inputs) and sums in float64.
//!
//! Three code paths compute the same thing: AVX-512F and AVX2+FMA (float32 inputs, chosen at run time;
//! `GAINGUARD_SPECTRA_KERNELS` may name a slower one) and portable Rust (float64, and any CPU). The two
//! SIMD paths read 16 (8) consecutive elements of 4 rows and of 4 (2) columns of the block per step, so
//! that every load feeds several FMAs. bf16 and f16 rows are widened to float32 four at a time into a
//! small per-thread buffer, never as a whole matrix.
//!
//! The files: this one holds the pass itself (its request, its workspace, one thread's rows); `layout` the
//! sizes and the code path, `real` what a kernel computes, `portable` and `x86` the kernels, `matrix` the
//! matrix in memory, `sums` the other whole-matrix reads, `runner` the thread pool.

mod layout;
mod matrix;
mod portable;
mod real;
mod runner;
mod sums;
#[cfg(target_arch = "x86_64")]
mod x86;

pub(crate) use layout::{flavour, Flavour};
pub use matrix::{Elem, HostMatrix};
pub use runner::{set_parallel_runner, ParallelRunner};
pub(crate) use sums::{all_finite, read_row_f64};
pub use sums::{distance_squares, sum_squares};

use layout::{Prefetch, FOLD_GROUPS, LANES, R};
use real::Real;
use runner::for_each_part;
use sums::widen_row;

/// The name of the code path float32 passes take in this process: `avx512`, `avx2` or `portable`.
pub fn kernels() -> &'static str {
    match flavour() {
        Flavour::Avx512 => "avx512",
        Flavour::Avx2 => "avx2",
        Flavour::Portable => "portable",
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
    fn fold(_: Flavour, fold: &mut [f64], w: &mut [f64]) {
        portable::fold(fold, w);
    }
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
