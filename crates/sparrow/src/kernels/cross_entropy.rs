//! Fused cross-entropy: mean over rows of `logsumexp(x_i) - x_i[t_i]` for logits
//! (N, V) and u32 targets (N), one parallel pass per row; backward
//! `dx_i = g / N * (softmax(x_i) - onehot(t_i))`, recomputing the softmax in one more pass
//! instead of keeping an (N, V) intermediate alive.

use super::{contiguous_slice, dtype_name, rows_per_task};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

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

/// (max, ln sum exp(x - max)) of a row: logsumexp = max + ln_sum, kept apart so that
/// `ln_sum - (x_t - max)` does not cancel when x_t is the max.
fn row_lse<T: Float>(row: &[T]) -> (T, T) {
    let max = row.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
    let sum = row.iter().fold(T::zero(), |s, &v| s + (v - max).exp());
    (max, sum.ln())
}

fn forward<T: Float + Send + Sync + std::iter::Sum>(x: &[T], t: &[u32], v: usize) -> T {
    let n = t.len();
    let total: T = x
        .par_chunks(v)
        .with_min_len(rows_per_task(v))
        .zip(t.par_iter())
        .map(|(row, &target)| {
            let (max, ln_sum) = row_lse(row);
            ln_sum - (row[target as usize] - max)
        })
        .collect::<Vec<T>>()
        .into_iter()
        .sum();
    total / T::from(n.max(1)).expect("count fits")
}

fn backward<T: Float + Send + Sync>(x: &[T], t: &[u32], v: usize, scale: f64) -> Vec<T> {
    let scale = T::from(scale).expect("scale fits");
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(v)
        .with_min_len(rows_per_task(v))
        .enumerate()
        .for_each(|(r, out)| {
            let row = &x[r * v..(r + 1) * v];
            let (max, ln_sum) = row_lse(row);
            for (o, &a) in out.iter_mut().zip(row) {
                *o = ((a - max) - ln_sum).exp() * scale;
            }
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
        let out = match s1 {
            CpuStorage::F32(x) => {
                CpuStorage::F32(vec![forward(contiguous_slice(self.name(), x, l1)?, t, v)])
            }
            CpuStorage::F64(x) => {
                CpuStorage::F64(vec![forward(contiguous_slice(self.name(), x, l1)?, t, v)])
            }
            other => candle_core::bail!("cross-entropy: unsupported dtype {}", dtype_name(other)),
        };
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
        let out = match s1 {
            CpuStorage::F32(x) => CpuStorage::F32(backward(
                contiguous_slice(self.name(), x, l1)?,
                t,
                v,
                self.scale,
            )),
            CpuStorage::F64(x) => CpuStorage::F64(backward(
                contiguous_slice(self.name(), x, l1)?,
                t,
                v,
                self.scale,
            )),
            other => candle_core::bail!(
                "cross-entropy-backward: unsupported dtype {}",
                dtype_name(other)
            ),
        };
        Ok((out, l1.shape().clone()))
    }
}
