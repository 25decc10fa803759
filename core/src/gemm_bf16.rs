//! A bfloat16 GEMM for linears on CPUs with AVX-512 BF16 (`vdpbf16ps`): activations
//! rounded to bf16 per call, weights stored in bf16 once at load (half the memory), products
//! summed in f32. No mainstream Rust GEMM crate computes in bf16 (`gemm`, faer and candle
//! widen to f32), so this is a small one: 12 × 32 tiles, the bias as the starting value.
//!
//! Weights are stored once, at load, in the order the kernel reads them ([`in_stored_order`]): for
//! each strip of 32 columns, each pair of rows interleaved (`w[2p][j], w[2p+1][j]` side by
//! side, what one `vdpbf16ps` lane multiplies), so the kernel streams each strip
//! sequentially. A weight whose shape does not fit whole strips and pairs (a column count
//! not a multiple of 32, an odd row count: only tiny test models) stays row-major and the
//! kernel interleaves pairs of rows in registers. [`unstore`] gives the row-major values back.
//!
//! Each output element's sum runs in the same order whatever the number of rows, the thread
//! count or the batch (k in blocks of [`KC`] pairs, f32 partial sums in the output between
//! blocks), so a sample's result never depends on what it is batched with.

#[cfg(target_arch = "x86_64")]
/// Pairs of k per block: a block of the weight's 32-column strip (16 KiB) stays in L1
/// while every row tile passes over it.
const KC: usize = 256;
#[cfg(target_arch = "x86_64")]
/// Rows per tile: 12 × 2 accumulators, two weight vectors, two loads and a broadcast fill
/// 29 of the 32 vector registers.
const MR: usize = 12;
#[cfg(target_arch = "x86_64")]
/// Columns per tile: two vectors of 16 f32.
const NR: usize = 32;

/// Whether this CPU runs the bf16 kernel (x86-64 with AVX-512 BF16, detected at run time).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

use half::bf16;

/// f32 → bf16 bits with round-to-nearest-even (NaN stays NaN), as `vcvtne2ps2bf16` rounds.
#[cfg(target_arch = "x86_64")]
fn to_bf16_bits(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

/// Whether a `[k, n]` weight is stored in strips (else row-major).
fn in_strips(k: usize, n: usize) -> bool {
    n.is_multiple_of(32) && k.is_multiple_of(2)
}

/// A row-major weight `[k, n]` in the order the kernel reads it (see the module's notes),
/// still in f32: rounding it to bf16 (burn's cast, nearest even) gives the stored weight.
pub fn in_stored_order(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    assert_eq!(w.len(), k * n, "a [{k}, {n}] weight");
    if !in_strips(k, n) {
        return w.to_vec();
    }
    // Pairs of rows read in order, each strip's 64 values written where they belong.
    let pairs = k / 2;
    let mut out = vec![0f32; k * n];
    for (p, rows) in w.chunks_exact(2 * n).enumerate() {
        let (first, second) = rows.split_at(n);
        let strips = first.chunks_exact(32).zip(second.chunks_exact(32));
        for (s, (a, b)) in strips.enumerate() {
            let at = (s * pairs + p) * 64;
            for (pair, (&x, &y)) in out[at..at + 64].chunks_exact_mut(2).zip(a.iter().zip(b)) {
                pair[0] = x;
                pair[1] = y;
            }
        }
    }
    out
}

/// A stored weight ([`in_stored_order`]) back as row-major f32 `[k, n]`.
pub fn unstore(w: &[bf16], k: usize, n: usize) -> Vec<f32> {
    assert_eq!(w.len(), k * n, "a [{k}, {n}] weight");
    if !in_strips(k, n) {
        return w.iter().map(|v| v.to_f32()).collect();
    }
    let mut out = vec![0f32; k * n];
    let mut stored = w.iter();
    for n0 in (0..n).step_by(32) {
        for p in 0..k / 2 {
            for j in n0..n0 + 32 {
                for row in [2 * p, 2 * p + 1] {
                    out[row * n + j] = stored.next().expect("k·n values").to_f32();
                }
            }
        }
    }
    out
}

/// `out[r] = bias + bf16(x[r]) · w` for `rows` rows of `k` values (`x_rs` apart) and a
/// bf16 weight `[k, n]` as [`in_stored_order`] lays it out; `out` is `rows × n`, row-major.
/// `parallel` spreads column strips over rayon's threads (natively).
///
/// # Panics
/// When [`available`] is false, or a slice is shorter than the shapes say.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    x: &[f32],
    x_rs: usize,
    rows: usize,
    k: usize,
    w: &[bf16],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    parallel: bool,
) {
    assert!(available(), "the bf16 GEMM needs AVX-512 BF16");
    assert!(rows == 0 || x.len() >= (rows - 1) * x_rs + k);
    assert!(w.len() >= k * n && out.len() >= rows * n);
    assert!(bias.is_none_or(|b| b.len() >= n));
    if rows == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // Activations in bf16, each row padded to an even length (the pairs vdpbf16ps reads).
        let lda = k.next_multiple_of(2);
        let mut a = vec![0u16; rows * lda];
        for (r, row) in a.chunks_exact_mut(lda).enumerate() {
            // SAFETY: the CPU has AVX-512 BF16 (asserted); the row lies inside `x`.
            unsafe { x86::round_row(&x[r * x_rs..r * x_rs + k], row) };
        }
        let strips = n.div_ceil(NR);
        let packed = in_strips(k, n);
        let out_ptr = SharedOut(out.as_mut_ptr());
        let strip = |s: usize| {
            let n0 = s * NR;
            let width = NR.min(n - n0);
            let weight = x86::Weight {
                // Strip s: its k·32 values from s·k·32 when stored in strips, else from
                // column n0 of the rows.
                w: w[if packed { n0 * k } else { n0 }..].as_ptr().cast::<u16>(),
                ldw: n,
                packed,
            };
            // SAFETY: the CPU has AVX-512 BF16; strip s writes only columns n0..n0+width of
            // each output row, which no other strip touches.
            unsafe {
                x86::strip(
                    &a,
                    lda,
                    rows,
                    k,
                    &weight,
                    bias.map(|b| &b[n0..n0 + width]),
                    out_ptr.at(n0),
                    n,
                    width,
                )
            };
        };
        #[cfg(not(target_arch = "wasm32"))]
        if parallel && strips > 1 {
            use rayon::prelude::*;
            (0..strips).into_par_iter().for_each(strip);
            return;
        }
        let _ = parallel;
        (0..strips).for_each(strip);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (x, x_rs, k, w, bias, out, parallel);
}

#[cfg(target_arch = "x86_64")]
/// The output's base pointer, shared by the strips (each writes its own columns); the f32
/// GEMM's strips share theirs the same way.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: strips write disjoint columns.
#[cfg(target_arch = "x86_64")]
unsafe impl Send for SharedOut {}
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for SharedOut {}
#[cfg(target_arch = "x86_64")]
impl SharedOut {
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        // SAFETY: callers stay inside the output.
        unsafe { self.0.add(i) }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{KC, MR, NR};
    use std::arch::x86_64::*;

    /// One row of f32 to bf16 (round to nearest even), zero-padded to `out`'s length.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn round_row(x: &[f32], out: &mut [u16]) {
        let mut i = 0;
        while i + 32 <= x.len() {
            // SAFETY: 32 values from i lie inside x; 32 u16 inside out.
            unsafe {
                let lo = _mm512_loadu_ps(x.as_ptr().add(i));
                let hi = _mm512_loadu_ps(x.as_ptr().add(i + 16));
                let packed = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(out.as_mut_ptr().add(i).cast(), packed);
            }
            i += 32;
        }
        for (o, &v) in out[i..x.len()].iter_mut().zip(&x[i..]) {
            *o = super::to_bf16_bits(v);
        }
        out[x.len()..].fill(0);
    }

    /// For a row-major weight, interleaving two rows with unpacklo/unpackhi works within
    /// 128-bit lanes, so the accumulators hold the strip's columns out of order. These indices put columns back in order (for
    /// `permutex2var(first, idx, second)`) and take them out of order (from `out0, out1`).
    const TO_ORDER: [[i32; 16]; 2] = [
        [0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23],
        [8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31],
    ];
    const FROM_ORDER: [[i32; 16]; 2] = [
        [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27],
        [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31],
    ];

    /// One strip's weight: where it starts, the row stride (row-major only) and its layout.
    pub(super) struct Weight {
        pub(super) w: *const u16,
        pub(super) ldw: usize,
        pub(super) packed: bool,
    }

    /// One strip of `width` ≤ 32 columns for every row: k in blocks of KC pairs, rows in
    /// tiles of MR.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn strip(
        a: &[u16],
        lda: usize,
        rows: usize,
        k: usize,
        weight: &Weight,
        bias: Option<&[f32]>,
        out: *mut f32,
        ldo: usize,
        width: usize,
    ) {
        let mask = if width >= NR {
            u32::MAX
        } else {
            (1u32 << width) - 1
        };
        let pairs = k.div_ceil(2);
        // The starting value (bias or zero), in the accumulators' column order.
        let start = {
            let mut b = [0f32; NR];
            if let Some(bias) = bias {
                b[..width].copy_from_slice(&bias[..width]);
            }
            // SAFETY: b holds 32 values.
            let (b0, b1) = unsafe {
                (
                    _mm512_loadu_ps(b.as_ptr()),
                    _mm512_loadu_ps(b.as_ptr().add(16)),
                )
            };
            if weight.packed {
                [b0, b1]
            } else {
                unsafe { scatter(b0, b1) }
            }
        };
        let mut p0 = 0;
        while p0 < pairs {
            let kc = KC.min(pairs - p0);
            // SAFETY: pair p0 of the strip exists: 64 values a pair when packed, two rows
            // otherwise.
            let w = unsafe {
                weight.w.add(if weight.packed {
                    64 * p0
                } else {
                    2 * p0 * weight.ldw
                })
            };
            let block = Block {
                w,
                ldw: weight.ldw,
                // The last pair of an odd k has no second weight row.
                half_pair: 2 * (p0 + kc) > k,
                kc,
                mask,
            };
            let mut r = 0;
            while r < rows {
                let m = MR.min(rows - r);
                // SAFETY: row r of `a` and of the output exist.
                let tile = Tile {
                    a: unsafe { a.as_ptr().add(r * lda + 2 * p0) },
                    lda,
                    out: unsafe { out.add(r * ldo) },
                    ldo,
                    start: (p0 == 0).then_some(start),
                };
                macro_rules! run {
                    ($($m:literal)*) => {
                        match (m, weight.packed) {
                            $(
                                // SAFETY: rows r..r+m of `a` and `out` exist; the block lies
                                // inside the weight.
                                ($m, true) => unsafe { tile.run::<$m, true>(&block) },
                                ($m, false) => unsafe { tile.run::<$m, false>(&block) },
                            )*
                            _ => unreachable!("1 ≤ m ≤ MR"),
                        }
                    };
                }
                run!(1 2 3 4 5 6 7 8 9 10 11 12);
                r += m;
            }
            p0 += kc;
        }
    }

    /// 32 bf16 values, as `vdpbf16ps` takes them.
    #[inline(always)]
    fn as_bf16(v: __m512i) -> __m512bh {
        // SAFETY: both are 64 bytes of plain bits.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// 32 columns in order (two registers) → the accumulators' order.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn scatter(c0: __m512, c1: __m512) -> [__m512; 2] {
        // SAFETY: plain loads of 16 i32.
        let (i0, i1) = unsafe {
            (
                _mm512_loadu_si512(FROM_ORDER[0].as_ptr().cast()),
                _mm512_loadu_si512(FROM_ORDER[1].as_ptr().cast()),
            )
        };
        [
            _mm512_permutex2var_ps(c0, i0, c1),
            _mm512_permutex2var_ps(c0, i1, c1),
        ]
    }

    /// The accumulators' order → 32 columns in order.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn gather(acc: [__m512; 2]) -> [__m512; 2] {
        // SAFETY: plain loads of 16 i32.
        let (i0, i1) = unsafe {
            (
                _mm512_loadu_si512(TO_ORDER[0].as_ptr().cast()),
                _mm512_loadu_si512(TO_ORDER[1].as_ptr().cast()),
            )
        };
        [
            _mm512_permutex2var_ps(acc[0], i0, acc[1]),
            _mm512_permutex2var_ps(acc[0], i1, acc[1]),
        ]
    }

    /// KC pairs of weight rows of one strip (packed: 64 values a pair).
    struct Block {
        w: *const u16,
        ldw: usize,
        half_pair: bool,
        kc: usize,
        /// The strip's valid columns.
        mask: u32,
    }

    /// Up to MR rows of one strip over one block.
    struct Tile {
        a: *const u16,
        lda: usize,
        out: *mut f32,
        ldo: usize,
        /// The first block's starting value (bias), in accumulator order; later blocks add
        /// to the output.
        start: Option<[__m512; 2]>,
    }

    impl Tile {
        /// `PACKED`: the weight is stored in strips, and the accumulators hold columns in
        /// order; else two row-major weight rows are interleaved in registers, which
        /// leaves the columns out of order (see [`TO_ORDER`]).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        unsafe fn run<const M: usize, const PACKED: bool>(&self, block: &Block) {
            let (lo_mask, hi_mask) = (block.mask as u16, (block.mask >> 16) as u16);
            let mut acc = [[_mm512_setzero_ps(); 2]; M];
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = match self.start {
                    Some(start) => start,
                    // SAFETY: row r of the output holds the strip's valid columns.
                    None => unsafe {
                        let row = self.out.add(r * self.ldo);
                        let (c0, c1) = (
                            _mm512_maskz_loadu_ps(lo_mask, row),
                            _mm512_maskz_loadu_ps(hi_mask, row.add(16)),
                        );
                        if PACKED { [c0, c1] } else { scatter(c0, c1) }
                    },
                };
            }
            // The last pair of an odd k has no second weight row: it reads zeros instead
            // (a mask of no columns), so the loop has no branch.
            let full = block.kc - usize::from(block.half_pair);
            for p in 0..block.kc {
                // SAFETY: pair p of the block: 64 packed values, or weight rows 2p and
                // 2p+1 (the second only when it exists: a zero mask reads nothing), masked
                // to the strip's columns.
                let (b0, b1): (__m512bh, __m512bh) = unsafe {
                    if PACKED {
                        let pair = block.w.add(64 * p);
                        (
                            as_bf16(_mm512_loadu_si512(pair.cast())),
                            as_bf16(_mm512_loadu_si512(pair.add(32).cast())),
                        )
                    } else {
                        let second = if p < full { block.mask } else { 0 };
                        let row = block.w.add(2 * p * block.ldw);
                        let w0 = _mm512_maskz_loadu_epi16(block.mask, row.cast());
                        let w1 = _mm512_maskz_loadu_epi16(second, row.add(block.ldw).cast());
                        (
                            as_bf16(_mm512_unpacklo_epi16(w0, w1)),
                            as_bf16(_mm512_unpackhi_epi16(w0, w1)),
                        )
                    }
                };
                for (r, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: pair p of row r (rows are padded to even lengths).
                    let pair = unsafe {
                        self.a
                            .add(r * self.lda + 2 * p)
                            .cast::<i32>()
                            .read_unaligned()
                    };
                    let x = as_bf16(_mm512_set1_epi32(pair));
                    acc[0] = _mm512_dpbf16_ps(acc[0], x, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], x, b1);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let [c0, c1] = if PACKED {
                    *acc
                } else {
                    unsafe { gather(*acc) }
                };
                // SAFETY: row r of the output, the strip's valid columns.
                unsafe {
                    let row = self.out.add(r * self.ldo);
                    _mm512_mask_storeu_ps(row, lo_mask, c0);
                    _mm512_mask_storeu_ps(row.add(16), hi_mask, c1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row-major f32 weight as the kernel stores it.
    fn store(w: &[f32], k: usize, n: usize) -> Vec<bf16> {
        in_stored_order(w, k, n)
            .into_iter()
            .map(bf16::from_f32)
            .collect()
    }

    /// The same sum in f64 from the bf16-rounded operands.
    fn reference(x: &[f32], rows: usize, k: usize, w: &[bf16], n: usize, bias: &[f32]) -> Vec<f64> {
        let w = unstore(w, k, n);
        let wf = |i: usize| f64::from(w[i]);
        let xf = |i: usize| f64::from(bf16::from_f32(x[i]).to_f32());
        let mut out = vec![0f64; rows * n];
        for r in 0..rows {
            for c in 0..n {
                out[r * n + c] =
                    f64::from(bias[c]) + (0..k).map(|i| xf(r * k + i) * wf(i * n + c)).sum::<f64>();
            }
        }
        out
    }

    fn values(seed: u64, len: usize) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_a_wide_sum_of_the_rounded_operands_on_every_edge() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        // Odd k, k across several KC blocks, partial strips and row tiles.
        for (rows, k, n) in [
            (1, 1, 1),
            (13, 7, 33),
            (25, 768, 64),
            (5, 2 * KC + 3, 70),
            (12, 64, 32),
        ] {
            let x = values(1, rows * k);
            let w = store(&values(2, k * n), k, n);
            let bias = values(3, n);
            let mut out = vec![f32::NAN; rows * n];
            gemm(&x, k, rows, k, &w, n, Some(&bias), &mut out, rows > 8);
            let want = reference(&x, rows, k, &w, n, &bias);
            for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                // f32 sums of k products of magnitude ≤ 1.
                let tol = 1e-6 * (k as f64).sqrt() * 8.0 + 1e-6;
                assert!(
                    (f64::from(got) - want).abs() <= tol,
                    "rows {rows} k {k} n {n}: element {i} is {got}, want {want}"
                );
            }
        }
    }

    #[test]
    fn stored_weights_round_trip() {
        for (k, n) in [(3, 5), (4, 64), (6, 33), (2, 32)] {
            let w: Vec<f32> = values(6, k * n)
                .into_iter()
                .map(|v| bf16::from_f32(v).to_f32())
                .collect();
            assert_eq!(unstore(&store(&w, k, n), k, n), w, "[{k}, {n}]");
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_a_batch() {
        if !available() {
            return;
        }
        for (rows, k, n) in [(29, 300, 45), (29, 300, 64)] {
            let x = values(4, rows * k);
            let w = store(&values(5, k * n), k, n);
            let mut all = vec![0f32; rows * n];
            gemm(&x, k, rows, k, &w, n, None, &mut all, true);
            for r in [0, 11, 12, 28] {
                let mut one = vec![0f32; n];
                gemm(&x[r * k..], k, 1, k, &w, n, None, &mut one, false);
                assert_eq!(one, all[r * n..(r + 1) * n], "row {r}");
            }
        }
    }
}
