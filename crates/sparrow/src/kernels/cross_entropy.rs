//! Fused cross-entropy: mean over rows of `logsumexp(x_i) - x_i[t_i]` for logits
//! (N, V) and u32 targets (N), one parallel pass per row; backward
//! `dx_i = g / N * (softmax(x_i) - onehot(t_i))`, recomputing the softmax in one more pass
//! instead of keeping an (N, V) intermediate alive.
//!
//! f32 rows take a vectorised `e^x` (`simd::exp512` where the CPU has AVX-512, else
//! `simd::fast_exp` in 16 lanes: relative error < 3e-7) with sums in 16 lanes; f64 rows
//! (the gradient checks) take libm's exp in row order, the plain reference of the two.

use super::simd::{fast_exp, has_avx512};
use super::{by_dtype, contiguous_slice, dtype_name, rows_per_task, storage_slice};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};

/// Mean negative log-likelihood (a scalar tensor).
#[derive(Debug, Clone, Copy)]
pub struct CrossEntropy;

impl CrossEntropy {
    /// logits (N, V) f32/f64, targets (N) u32 -> scalar.
    pub fn apply(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
        logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, CrossEntropy)
    }
}

fn check_targets(targets: &[u32], v: usize) -> candle_core::Result<()> {
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("cross-entropy: target {bad} is outside the vocabulary of {v}");
    }
    Ok(())
}

/// The element types of the kernel and their row operations.
trait Element: Float + Send + Sync + std::iter::Sum {
    /// (max, ln sum exp(x - max)) of a row: logsumexp = max + ln_sum, kept apart so
    /// that `ln_sum - (x_t - max)` does not cancel when x_t is the max.
    fn row_lse(row: &[Self]) -> (Self, Self);
    /// `out[i] = exp(row[i] - max - ln_sum) * scale`.
    fn softmax_scaled(row: &[Self], max: Self, ln_sum: Self, scale: Self, out: &mut [Self]);
    /// `softmax_scaled` with the row as its own output.
    fn softmax_scaled_in_place(row: &mut [Self], max: Self, ln_sum: Self, scale: Self);
}

impl Element for f64 {
    fn row_lse(row: &[f64]) -> (f64, f64) {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
        let sum = row.iter().fold(0.0, |s, &v| s + (v - max).exp());
        (max, sum.ln())
    }

    fn softmax_scaled(row: &[f64], max: f64, ln_sum: f64, scale: f64, out: &mut [f64]) {
        for (o, &a) in out.iter_mut().zip(row) {
            *o = ((a - max) - ln_sum).exp() * scale;
        }
    }

    fn softmax_scaled_in_place(row: &mut [f64], max: f64, ln_sum: f64, scale: f64) {
        for a in row.iter_mut() {
            *a = ((*a - max) - ln_sum).exp() * scale;
        }
    }
}

impl Element for f32 {
    fn row_lse(row: &[f32]) -> (f32, f32) {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: AVX-512F was detected at run time.
            return unsafe { row_lse_avx512(row) };
        }
        row_lse_lanes(row)
    }

    fn softmax_scaled(row: &[f32], max: f32, ln_sum: f32, scale: f32, out: &mut [f32]) {
        assert_eq!(row.len(), out.len());
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: AVX-512F was detected at run time; both pointers cover row.len().
            return unsafe {
                softmax_scaled_avx512(
                    row.as_ptr(),
                    out.as_mut_ptr(),
                    row.len(),
                    max + ln_sum,
                    scale,
                )
            };
        }
        let shift = max + ln_sum;
        for (o, &a) in out.iter_mut().zip(row) {
            *o = fast_exp(a - shift) * scale;
        }
    }

    fn softmax_scaled_in_place(row: &mut [f32], max: f32, ln_sum: f32, scale: f32) {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            let (p, n) = (row.as_mut_ptr(), row.len());
            // SAFETY: AVX-512F was detected at run time; each lane is loaded before the
            // store to the same address, and no reference to the row is alive meanwhile.
            return unsafe { softmax_scaled_avx512(p, p, n, max + ln_sum, scale) };
        }
        let shift = max + ln_sum;
        for a in row.iter_mut() {
            *a = fast_exp(*a - shift) * scale;
        }
    }
}

/// Portable f32 `row_lse`: maxima and sums in 16 lanes (so the loops vectorise), the
/// tail folded in after them.
fn row_lse_lanes(row: &[f32]) -> (f32, f32) {
    const L: usize = 16;
    let chunks = row.chunks_exact(L);
    let tail = chunks.remainder();
    let mut m = [f32::NEG_INFINITY; L];
    for c in chunks.clone() {
        for (m, &v) in m.iter_mut().zip(c) {
            *m = m.max(v);
        }
    }
    let max = m
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    let mut acc = [0f32; L];
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += fast_exp(v - max);
        }
    }
    let sum = acc.iter().sum::<f32>() + tail.iter().map(|&v| fast_exp(v - max)).sum::<f32>();
    (max, sum.ln())
}

/// `row_lse` of f32 in AVX-512 lanes; the tail under a mask.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_lse_avx512(row: &[f32]) -> (f32, f32) {
    use super::simd::exp512;
    use std::arch::x86_64::*;
    let full = row.len() / 16 * 16;
    let mask: __mmask16 = ((1u32 << (row.len() - full)) - 1) as u16;
    let p = row.as_ptr();
    // SAFETY: loads at i < full read 16 floats inside the row; the masked tail load
    // touches only the row.len() - full lanes left.
    unsafe {
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..full).step_by(16) {
            m = _mm512_max_ps(m, _mm512_loadu_ps(p.add(i)));
        }
        m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, mask, p.add(full)));
        let max = _mm512_reduce_max_ps(m);
        let vmax = _mm512_set1_ps(max);
        let mut s = _mm512_setzero_ps();
        for i in (0..full).step_by(16) {
            s = _mm512_add_ps(s, exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), vmax)));
        }
        let x = _mm512_maskz_loadu_ps(mask, p.add(full));
        s = _mm512_mask_add_ps(s, mask, s, exp512(_mm512_sub_ps(x, vmax)));
        (max, _mm512_reduce_add_ps(s).ln())
    }
}

/// `o[i] = exp(p[i] - shift) * scale` for `i < len` in AVX-512 lanes, the tail under a
/// mask; `o` may equal `p` (in place: every lane is loaded before it is stored).
///
/// # Safety
/// The CPU must have AVX-512F; `p` is readable and `o` writable for `len` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_scaled_avx512(p: *const f32, o: *mut f32, len: usize, shift: f32, scale: f32) {
    use super::simd::exp512;
    use std::arch::x86_64::*;
    let full = len / 16 * 16;
    let mask: __mmask16 = ((1u32 << (len - full)) - 1) as u16;
    // SAFETY: loads and stores at i < full touch 16 floats inside both buffers; the masked
    // tail touches only the len - full lanes left.
    unsafe {
        let (vs, vk) = (_mm512_set1_ps(shift), _mm512_set1_ps(scale));
        for i in (0..full).step_by(16) {
            let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), vs));
            _mm512_storeu_ps(o.add(i), _mm512_mul_ps(e, vk));
        }
        let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, p.add(full)), vs));
        _mm512_mask_storeu_ps(o.add(full), mask, _mm512_mul_ps(e, vk));
    }
}

/// One row's NLL `ln_sum - (x_t - max)` with the row's (max, ln_sum), for the softmax
/// that may follow.
fn row_loss<T: Element>(row: &[T], target: u32) -> (T, T, T) {
    let (max, ln_sum) = T::row_lse(row);
    (ln_sum - (row[target as usize] - max), max, ln_sum)
}

fn forward<T: Element>(x: &[T], t: &[u32], v: usize) -> T {
    let n = t.len();
    let total: T = x
        .par_chunks(v)
        .with_min_len(rows_per_task(v))
        .zip(t.par_iter())
        .map(|(row, &target)| row_loss(row, target).0)
        .collect::<Vec<T>>()
        .into_iter()
        .sum();
    total / T::from(n.max(1)).expect("count fits")
}

fn backward<T: Element>(x: &[T], t: &[u32], v: usize, scale: f64) -> Vec<T> {
    let scale = T::from(scale).expect("scale fits");
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(v)
        .with_min_len(rows_per_task(v))
        .enumerate()
        .for_each(|(r, out)| {
            let row = &x[r * v..(r + 1) * v];
            let (max, ln_sum) = T::row_lse(row);
            T::softmax_scaled(row, max, ln_sum, scale, out);
            let tgt = t[r] as usize;
            out[tgt] = out[tgt] - scale;
        });
    dx
}

/// Validate (logits, targets) and return the vocabulary size and the targets.
fn targets_of<'a>(
    op: &str,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
) -> candle_core::Result<(usize, &'a [u32])> {
    let (n, v) = l1.shape().dims2()?;
    let nt = l2.shape().dims1()?;
    if nt != n {
        candle_core::bail!("{op}: {n} rows of logits but {nt} targets");
    }
    let CpuStorage::U32(t) = s2 else {
        candle_core::bail!("{op}: targets must be u32, got {}", dtype_name(s2));
    };
    let t = contiguous_slice(op, t, l2)?;
    check_targets(t, v)?;
    Ok((v, t))
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (v, t) = targets_of(self.name(), l1, s2, l2)?;
        let name = self.name();
        let out = by_dtype!(name, s1.dtype(), |T| {
            T::to_cpu_storage_owned(vec![forward(storage_slice::<T>(name, s1, l1)?, t, v)])
        });
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = logits.dim(0)?;
        let g = grad_res.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let op = CrossEntropyBackward {
            scale: g / n.max(1) as f64,
        };
        Ok((
            Some(
                logits
                    .contiguous()?
                    .apply_op2_no_bwd(&targets.contiguous()?, &op)?,
            ),
            None,
        ))
    }
}

/// `scale * (softmax(x) - onehot(t))` per row.
#[derive(Debug, Clone, Copy)]
pub struct CrossEntropyBackward {
    pub scale: f64,
}

impl CustomOp2 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (v, t) = targets_of(self.name(), l1, s2, l2)?;
        let name = self.name();
        let out = by_dtype!(name, s1.dtype(), |T| {
            let x = storage_slice::<T>(name, s1, l1)?;
            T::to_cpu_storage_owned(backward(x, t, v, self.scale))
        });
        Ok((out, l1.shape().clone()))
    }
}

/// Logits (R, V) turned in place into `scale * (softmax - onehot(t))`, row by row, with
/// the rows' summed loss recorded: the per-chunk pass of the fused LM head
/// (`kernels::linear_cross_entropy`).
#[derive(Debug)]
pub struct CrossEntropyGradInPlace {
    scale: f64,
    /// The rows' summed loss, as f64 bits (set by the op, read by `apply`).
    loss_sum: AtomicU64,
}

impl CrossEntropyGradInPlace {
    pub fn new(scale: f64) -> Self {
        Self {
            scale,
            loss_sum: AtomicU64::new(0),
        }
    }

    /// Rewrites `logits` (R, V), contiguous and not shared, and returns the summed loss
    /// of its rows under `targets` (R) u32.
    pub fn apply(&self, logits: &Tensor, targets: &Tensor) -> candle_core::Result<f64> {
        logits.inplace_op2(&targets.contiguous()?, self)?;
        Ok(f64::from_bits(self.loss_sum.load(Ordering::Relaxed)))
    }
}

fn grad_in_place<T: Element>(x: &mut [T], t: &[u32], v: usize, scale: f64) -> f64 {
    let scale = T::from(scale).expect("scale fits");
    x.par_chunks_mut(v)
        .with_min_len(rows_per_task(v))
        .zip(t.par_iter())
        .map(|(row, &target)| {
            let (loss, max, ln_sum) = row_loss(row, target);
            let target = target as usize;
            T::softmax_scaled_in_place(row, max, ln_sum, scale);
            row[target] = row[target] - scale;
            loss.to_f64().expect("loss fits f64")
        })
        .collect::<Vec<f64>>()
        .into_iter()
        .sum()
}

impl candle_core::InplaceOp2 for CrossEntropyGradInPlace {
    fn name(&self) -> &'static str {
        "cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (v, t) = targets_of(self.name(), l1, s2, l2)?;
        let Some((start, end)) = l1.contiguous_offsets() else {
            candle_core::bail!("cross-entropy-grad: logits must be contiguous")
        };
        let loss = match s1 {
            CpuStorage::F32(x) => grad_in_place(&mut x[start..end], t, v, self.scale),
            CpuStorage::F64(x) => grad_in_place(&mut x[start..end], t, v, self.scale),
            other => candle_core::bail!(
                "cross-entropy-grad: unsupported dtype {}",
                dtype_name(other)
            ),
        };
        self.loss_sum.store(loss.to_bits(), Ordering::Relaxed);
        Ok(())
    }
}

/// Per-row NLL `logsumexp(x_i) - x_i[t_i]` of logits (R, V) under targets (R) u32, in
/// f64 (evaluation: perplexity per position); f32 and f64 logits as they are, half
/// precision widened to f32.
pub fn row_nll(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Vec<f64>> {
    let logits = match logits.dtype() {
        DType::F32 | DType::F64 => logits.contiguous()?,
        _ => logits.to_dtype(DType::F32)?,
    };
    let targets = targets.contiguous()?;
    let (s1, l1) = logits.storage_and_layout();
    let (s2, l2) = targets.storage_and_layout();
    let (candle_core::Storage::Cpu(s1), candle_core::Storage::Cpu(s2)) = (&*s1, &*s2) else {
        candle_core::bail!("row-nll: CPU tensors only")
    };
    let (v, t) = targets_of("row-nll", l1, s2, l2)?;
    fn rows<T: Element>(x: &[T], t: &[u32], v: usize) -> Vec<f64> {
        x.par_chunks(v)
            .with_min_len(rows_per_task(v))
            .zip(t.par_iter())
            .map(|(row, &target)| row_loss(row, target).0.to_f64().expect("loss fits f64"))
            .collect()
    }
    Ok(by_dtype!("row-nll", s1.dtype(), |T| {
        rows(storage_slice::<T>("row-nll", s1, l1)?, t, v)
    }))
}
