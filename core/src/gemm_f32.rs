//! An f32 GEMM for linears on x86-64 CPUs with FMA (AVX-512 or AVX2) whose sums run in one
//! fixed order: each output element starts at its bias and adds its k products one after
//! another, each a fused multiply-add, whatever the number of rows, the thread count, the batch
//! or the instruction set. A row's result therefore does not depend on what it is multiplied
//! with, so short samples (a prompt's tokens) can share one product per linear and stream each
//! weight from memory once for all of them; the `gemm` crate's blocking, and so its rounding,
//! follows the shapes, which rules that out. AVX-512 and AVX2 give the same bits.
//!
//! The weight stays row-major `[k, n]` (the model's own tensor, shared with burn's path); each
//! block of [`KC`] rows of a column strip (32 columns with AVX-512, 16 with AVX2) is copied
//! into a contiguous buffer that stays in L1 while every row tile of the activations passes
//! over it, one k-block at a time so the activations' block stays in L2.

/// Rows of k per block: a strip's block (32 KiB with AVX-512, 16 KiB with AVX2) stays in L1.
#[cfg(target_arch = "x86_64")]
const KC: usize = 512;

/// At most this many rows read the weight in place rather than from a contiguous copy.
#[cfg(target_arch = "x86_64")]
const DIRECT_ROWS: usize = 24;

/// The instruction set the kernel runs with on this CPU.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Isa {
    /// 12-row × 32-column tiles.
    Avx512,
    /// 6-row × 16-column tiles.
    Avx2,
}

impl Isa {
    #[cfg(target_arch = "x86_64")]
    fn strip_width(self) -> usize {
        match self {
            Isa::Avx512 => 32,
            Isa::Avx2 => 16,
        }
    }
}

fn isa() -> Option<Isa> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Some(Isa::Avx512);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Some(Isa::Avx2);
        }
    }
    None
}

/// Whether this CPU runs the kernel (x86-64 with AVX-512F, or AVX2 and FMA; detected at run
/// time).
pub fn available() -> bool {
    isa().is_some()
}

/// `out[r] = bias + x[r] · w` for `rows` rows of `k` values (`x_rs` apart) and a row-major
/// weight `[k, n]`; `out` is `rows × n`, row-major. `parallel` spreads column strips over
/// rayon's threads (natively).
///
/// # Panics
/// When [`available`] is false, or a slice is shorter than the shapes say.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    x: &[f32],
    x_rs: usize,
    rows: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    parallel: bool,
) {
    let isa = isa().expect("the f32 GEMM needs AVX-512, or AVX2 and FMA");
    assert!(rows == 0 || x.len() >= (rows - 1) * x_rs + k);
    assert!(w.len() >= k * n && out.len() >= rows * n);
    assert!(bias.is_none_or(|b| b.len() >= n));
    if rows == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let nr = isa.strip_width();
        let strips = n.div_ceil(nr);
        let out_ptr = SharedOut(out.as_mut_ptr());
        // The activations' block is copied into rows one cache line longer than the block,
        // so a tile's rows fall in different L1 sets (rows whose stride is a multiple of
        // 4 KiB would share sets with each other and the weight block, and evict both).
        let mut a = Vec::new();
        // k = 0 still writes the starting value.
        let blocks = k.div_ceil(KC).max(1);
        for kb in 0..blocks {
            let k0 = (kb * KC).min(k);
            let kc = KC.min(k - k0);
            let lda = kc + 16;
            a.clear();
            a.resize(rows * lda, 0.0);
            for (r, dst) in a.chunks_exact_mut(lda).enumerate() {
                dst[..kc].copy_from_slice(&x[r * x_rs + k0..][..kc]);
            }
            let a = &a;
            let strip = |s: usize, packed: &mut Vec<f32>| {
                let n0 = s * nr;
                let width = nr.min(n - n0);
                // The strip's block: read in place by a few rows (each weight value is used
                // once or twice, so a copy would cost as much as the products), else copied
                // contiguous, kc rows of nr (zero past `width`).
                let (block, ldw) = if rows <= DIRECT_ROWS && width == nr {
                    (w[(k0 * n + n0).min(w.len())..].as_ptr(), n)
                } else {
                    packed.clear();
                    packed.resize(kc * nr, 0.0);
                    for (i, dst) in packed.chunks_exact_mut(nr).enumerate() {
                        let row = (k0 + i) * n + n0;
                        // Full strips copy a constant length, which compiles to a few vector
                        // moves instead of a call to memcpy per 64 or 128 bytes.
                        match width {
                            32 => dst[..32].copy_from_slice(&w[row..row + 32]),
                            16 => dst[..16].copy_from_slice(&w[row..row + 16]),
                            _ => dst[..width].copy_from_slice(&w[row..row + width]),
                        }
                    }
                    (packed.as_ptr(), nr)
                };
                let mut start = [0f32; 32];
                if let Some(bias) = bias {
                    start[..width].copy_from_slice(&bias[n0..n0 + width]);
                }
                let strip = Strip {
                    x: a.as_ptr(),
                    x_rs: lda,
                    rows,
                    w: block,
                    ldw,
                    kc,
                    start: (k0 == 0).then_some(&start),
                    out: out_ptr.at(n0),
                    ldo: n,
                    width,
                };
                // SAFETY: the CPU has the instruction set (detected); strip s writes only
                // columns n0..n0+width of each output row, which no other strip touches; `a`
                // holds rows × kc values lda apart; the block, kc rows of nr values ldw apart.
                unsafe {
                    match isa {
                        Isa::Avx512 => avx512::strip(&strip),
                        Isa::Avx2 => avx2::strip(&strip),
                    }
                }
            };
            #[cfg(not(target_arch = "wasm32"))]
            if parallel && strips > 1 {
                use rayon::prelude::*;
                (0..strips)
                    .into_par_iter()
                    .for_each_init(Vec::new, |packed, s| strip(s, packed));
                continue;
            }
            let _ = parallel;
            let mut packed = Vec::with_capacity(KC * nr);
            (0..strips).for_each(|s| strip(s, &mut packed));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (isa, x, x_rs, k, w, bias, out, parallel);
}

/// One k-block of one column strip, for every row.
#[cfg(target_arch = "x86_64")]
struct Strip<'a> {
    /// Row 0's first value of the block; rows are `x_rs` apart.
    x: *const f32,
    x_rs: usize,
    rows: usize,
    /// The weight block: `kc` rows of the strip's full width, `ldw` apart.
    w: *const f32,
    ldw: usize,
    kc: usize,
    /// The first block's starting value (bias or zero); later blocks add to the output.
    start: Option<&'a [f32; 32]>,
    /// Row 0's first column of the strip; rows are `ldo` apart.
    out: *mut f32,
    ldo: usize,
    /// The strip's valid columns.
    width: usize,
}

#[cfg(target_arch = "x86_64")]
use crate::gemm_bf16::SharedOut;

/// Rows in tiles of `$mr` (a `run::<M>` per tile height), for a strip module's `Tile`.
#[cfg(target_arch = "x86_64")]
macro_rules! tiles {
    ($strip:expr, $tile:expr, $mr:expr, [$($m:literal)*]) => {{
        let (strip, tile) = ($strip, $tile);
        let mut r = 0;
        while r < strip.rows {
            let m = ($mr).min(strip.rows - r);
            // SAFETY: rows r..r+m of `x` and `out` exist (the strip's contract).
            let (x, out) = unsafe { (strip.x.add(r * strip.x_rs), strip.out.add(r * strip.ldo)) };
            match m {
                // SAFETY: as the strip's contract.
                $($m => unsafe { tile.run::<$m>(x, out) },)*
                _ => unreachable!("1 ≤ m ≤ MR"),
            }
            r += m;
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Strip;
    use std::arch::x86_64::*;

    const MR: usize = 12;
    const NR: usize = 32;

    /// # Safety
    /// AVX-512F; the strip's pointers as [`Strip`] describes them.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn strip(strip: &Strip) {
        let mask = if strip.width >= NR {
            u32::MAX
        } else {
            (1u32 << strip.width) - 1
        };
        let tile = Tile {
            // SAFETY: start holds 32 values.
            start: strip.start.map(|s| unsafe {
                [
                    _mm512_loadu_ps(s.as_ptr()),
                    _mm512_loadu_ps(s.as_ptr().add(16)),
                ]
            }),
            masks: [mask as u16, (mask >> 16) as u16],
            w: strip.w,
            ldw: strip.ldw,
            kc: strip.kc,
            x_rs: strip.x_rs,
            ldo: strip.ldo,
        };
        tiles!(strip, tile, MR, [1 2 3 4 5 6 7 8 9 10 11 12]);
    }

    struct Tile {
        start: Option<[__m512; 2]>,
        /// The strip's valid columns in each half.
        masks: [u16; 2],
        w: *const f32,
        ldw: usize,
        kc: usize,
        x_rs: usize,
        ldo: usize,
    }

    impl Tile {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn run<const M: usize>(&self, x: *const f32, out: *mut f32) {
            let [lo, hi] = self.masks;
            let mut acc = [[_mm512_setzero_ps(); 2]; M];
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = match self.start {
                    Some(start) => start,
                    // SAFETY: row r of the output holds the strip's valid columns.
                    None => unsafe {
                        let row = out.add(r * self.ldo);
                        [
                            _mm512_maskz_loadu_ps(lo, row),
                            _mm512_maskz_loadu_ps(hi, row.add(16)),
                        ]
                    },
                };
            }
            for p in 0..self.kc {
                // SAFETY: row p of the weight block (32 values); value p of each row of x.
                unsafe {
                    let b0 = _mm512_loadu_ps(self.w.add(self.ldw * p));
                    let b1 = _mm512_loadu_ps(self.w.add(self.ldw * p + 16));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let ar = _mm512_set1_ps(*x.add(r * self.x_rs + p));
                        acc[0] = _mm512_fmadd_ps(ar, b0, acc[0]);
                        acc[1] = _mm512_fmadd_ps(ar, b1, acc[1]);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                // SAFETY: row r of the output, the strip's valid columns.
                unsafe {
                    let row = out.add(r * self.ldo);
                    _mm512_mask_storeu_ps(row, lo, acc[0]);
                    _mm512_mask_storeu_ps(row.add(16), hi, acc[1]);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Strip;
    use std::arch::x86_64::*;

    const MR: usize = 6;
    const NR: usize = 16;

    /// # Safety
    /// AVX2 and FMA; the strip's pointers as [`Strip`] describes them.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn strip(strip: &Strip) {
        // Lane i of a half is valid when i < the half's width: maskload/maskstore read the
        // lanes whose sign bit is set.
        let lane_mask = |from: usize| {
            let lanes: [i32; 8] =
                std::array::from_fn(|i| if from + i < strip.width { -1 } else { 0 });
            // SAFETY: 8 i32.
            unsafe { _mm256_loadu_si256(lanes.as_ptr().cast()) }
        };
        let tile = Tile {
            // SAFETY: start holds 32 values.
            start: strip.start.map(|s| unsafe {
                [
                    _mm256_loadu_ps(s.as_ptr()),
                    _mm256_loadu_ps(s.as_ptr().add(8)),
                ]
            }),
            full: strip.width >= NR,
            masks: [lane_mask(0), lane_mask(8)],
            w: strip.w,
            ldw: strip.ldw,
            kc: strip.kc,
            x_rs: strip.x_rs,
            ldo: strip.ldo,
        };
        tiles!(strip, tile, MR, [1 2 3 4 5 6]);
    }

    struct Tile {
        start: Option<[__m256; 2]>,
        /// All 16 columns are valid (plain loads and stores).
        full: bool,
        /// Otherwise the valid lanes of each half.
        masks: [__m256i; 2],
        w: *const f32,
        ldw: usize,
        kc: usize,
        x_rs: usize,
        ldo: usize,
    }

    impl Tile {
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run<const M: usize>(&self, x: *const f32, out: *mut f32) {
            let [lo, hi] = self.masks;
            let mut acc = [[_mm256_setzero_ps(); 2]; M];
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = match self.start {
                    Some(start) => start,
                    // SAFETY: row r of the output holds the strip's valid columns.
                    None => unsafe {
                        let row = out.add(r * self.ldo);
                        if self.full {
                            [_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8))]
                        } else {
                            [
                                _mm256_maskload_ps(row, lo),
                                _mm256_maskload_ps(row.add(8), hi),
                            ]
                        }
                    },
                };
            }
            for p in 0..self.kc {
                // SAFETY: row p of the weight block (16 values); value p of each row of x.
                unsafe {
                    let b0 = _mm256_loadu_ps(self.w.add(self.ldw * p));
                    let b1 = _mm256_loadu_ps(self.w.add(self.ldw * p + 8));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let ar = _mm256_set1_ps(*x.add(r * self.x_rs + p));
                        acc[0] = _mm256_fmadd_ps(ar, b0, acc[0]);
                        acc[1] = _mm256_fmadd_ps(ar, b1, acc[1]);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                // SAFETY: row r of the output, the strip's valid columns.
                unsafe {
                    let row = out.add(r * self.ldo);
                    if self.full {
                        _mm256_storeu_ps(row, acc[0]);
                        _mm256_storeu_ps(row.add(8), acc[1]);
                    } else {
                        _mm256_maskstore_ps(row, lo, acc[0]);
                        _mm256_maskstore_ps(row.add(8), hi, acc[1]);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The same sums in order, one fused multiply-add at a time: the kernel's exact bits.
    fn in_order(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize, bias: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; rows * n];
        for r in 0..rows {
            for c in 0..n {
                let mut acc = bias[c];
                for i in 0..k {
                    acc = x[r * k + i].mul_add(w[i * n + c], acc);
                }
                out[r * n + c] = acc;
            }
        }
        out
    }

    #[test]
    fn sums_in_order_on_every_edge() {
        if !available() {
            eprintln!("skipped: this CPU has neither AVX-512 nor AVX2 with FMA");
            return;
        }
        // k = 0, k across several blocks, partial strips and row tiles.
        for (rows, k, n) in [
            (1, 0, 5),
            (1, 1, 1),
            (13, 7, 33),
            (25, 768, 64),
            (5, 2 * KC + 3, 70),
            (12, 64, 32),
        ] {
            let x = values(1, rows * k);
            let w = values(2, k * n);
            let bias = values(3, n);
            let mut out = vec![f32::NAN; rows * n];
            gemm(&x, k, rows, k, &w, n, Some(&bias), &mut out, rows > 8);
            assert_eq!(out, in_order(&x, rows, k, &w, n, &bias), "{rows}×{k}×{n}");
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_a_batch() {
        if !available() {
            return;
        }
        let (rows, k, n) = (29, 300, 64);
        let x = values(4, rows * k);
        let w = values(5, k * n);
        let mut all = vec![0f32; rows * n];
        gemm(&x, k, rows, k, &w, n, None, &mut all, true);
        for r in [0, 11, 12, 28] {
            let mut one = vec![0f32; n];
            gemm(&x[r * k..], k, 1, k, &w, n, None, &mut one, false);
            assert_eq!(one, all[r * n..(r + 1) * n], "row {r}");
        }
    }
}
