//! The AVX-512F and AVX2+FMA kernels for float32 passes (x86-64 only; [`super::layout::Flavour`] picks
//! one at run time).

use super::layout::{column_stride, Prefetch, LANES, R, SEGMENT};
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
