//! Fused causal softmax for attention scores.
//!
//! Input: scores (..., T, S) laid out so that row `r` (over all leading dimensions) is
//! the query at position `offset + r % T`; key `j` is visible iff `j <= offset + r % T`.
//! Output: `y = softmax(scale * x)` over the visible keys, exactly 0 on masked ones.
//! Backward: `dx = scale * y * (g - sum_j g_j y_j)`.
//!
//! One pass per row (max, exp-sum, normalise in cache), rows in parallel with rayon,
//! instead of the seven full-tensor passes of mul, mask-add, max, sub, exp, sum and div.

use super::{by_dtype, rows_per_task, storage_slice};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

/// `softmax(scale * x + causal_mask)` over the last dimension.
#[derive(Debug, Clone, Copy)]
pub struct CausalSoftmax {
    pub scale: f64,
    /// Queries per group of rows (T): row r is query r % T.
    pub queries: usize,
    /// Position of the first query (cached tokens before it).
    pub offset: usize,
}

impl CausalSoftmax {
    /// Apply to scores (..., T, S) (any leading dims whose rows cycle through T queries).
    pub fn apply(self, scores: &Tensor) -> candle_core::Result<Tensor> {
        scores.contiguous()?.apply_op1(self)
    }

    /// Keys visible to row `r`.
    fn visible(&self, r: usize, s: usize) -> usize {
        (self.offset + r % self.queries.max(1) + 1).min(s)
    }

    fn forward<T: Float + Send + Sync>(&self, x: &[T], s: usize) -> Vec<T> {
        let mut y = vec![T::zero(); x.len()];
        let scale = T::from(self.scale).expect("scale fits the dtype");
        y.par_chunks_mut(s)
            .with_min_len(rows_per_task(s))
            .enumerate()
            .for_each(|(r, out)| {
                let row = &x[r * s..(r + 1) * s];
                let n = self.visible(r, s);
                let mut max = T::neg_infinity();
                for &v in &row[..n] {
                    max = max.max(v * scale);
                }
                let mut sum = T::zero();
                for (o, &v) in out[..n].iter_mut().zip(&row[..n]) {
                    let e = (v * scale - max).exp();
                    *o = e;
                    sum = sum + e;
                }
                let inv = T::one() / sum;
                for o in &mut out[..n] {
                    *o = *o * inv;
                }
            });
        y
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = *layout.dims().last().unwrap_or(&1);
        let name = self.name();
        let out = by_dtype!(name, storage.dtype(), |T| {
            T::to_cpu_storage_owned(self.forward(storage_slice::<T>(name, storage, layout)?, s))
        });
        Ok((out, layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(res.contiguous()?.apply_op2_no_bwd(
            &g,
            &SoftmaxBackward { scale: self.scale },
        )?))
    }
}

/// `dx = scale * y * (g - <g, y>)` per row, from the softmax output y and its gradient g.
#[derive(Debug, Clone, Copy)]
pub struct SoftmaxBackward {
    pub scale: f64,
}

impl SoftmaxBackward {
    fn run<T: Float + Send + Sync>(&self, y: &[T], g: &[T], s: usize) -> Vec<T> {
        let scale = T::from(self.scale).expect("scale fits the dtype");
        let mut dx = vec![T::zero(); y.len()];
        dx.par_chunks_mut(s)
            .with_min_len(rows_per_task(s))
            .enumerate()
            .for_each(|(r, out)| {
                let yr = &y[r * s..(r + 1) * s];
                let gr = &g[r * s..(r + 1) * s];
                let mut dot = T::zero();
                for (&a, &b) in yr.iter().zip(gr) {
                    dot = dot + a * b;
                }
                for ((o, &a), &b) in out.iter_mut().zip(yr).zip(gr) {
                    *o = scale * a * (b - dot);
                }
            });
        dx
    }
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "softmax-backward: shapes {:?} and {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let s = *l1.dims().last().unwrap_or(&1);
        let name = self.name();
        let out = by_dtype!(name, s1.dtype(), |T| {
            let y = storage_slice::<T>(name, s1, l1)?;
            T::to_cpu_storage_owned(self.run(y, storage_slice::<T>(name, s2, l2)?, s))
        });
        Ok((out, l1.shape().clone()))
    }
}
