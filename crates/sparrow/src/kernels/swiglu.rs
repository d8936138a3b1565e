//! The SwiGLU activation of every feed-forward, fused: `h = silu(min(g, L)) * clamp(u,
//! -L, L)` with DeepSeek-V4's `swiglu_limit` L (none: `silu(g) * u`), g and u the gate
//! and up projections' outputs.
//!
//! One elementwise pass forward, and one backward pass giving both gradients:
//! `dg = dh * clamp(u) * silu'(min(g, L)) * [g <= L]`, `du = dh * silu(min(g, L)) *
//! [-L <= u <= L]` (the clamp passes the gradient at its bounds, as torch's does), with
//! `silu'(a) = s (1 + a (1 - s))`, `s = sigmoid(a)`. Composed from candle's ops the
//! activation kept five (N, F) tensors per expert in the autograd graph (the clamp's
//! bounds among them, each with a gradient of its own); fused, it keeps its output.

use super::{by_dtype, storage_slice};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 16_384;

/// `silu(min(g, L)) * clamp(u, -L, L)`, elementwise over two tensors of one shape.
#[derive(Debug, Clone, Copy)]
pub struct SwiGlu {
    /// `swiglu_limit`: the clamp L (none: no clamp).
    pub limit: Option<f64>,
}

impl SwiGlu {
    /// Apply to the gate and up projections' outputs g, u (same shape).
    pub fn apply(self, g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
        g.contiguous()?.apply_op2(&u.contiguous()?, self)
    }

    fn bound<T: Float>(&self) -> T {
        T::from(self.limit.unwrap_or(f64::INFINITY)).expect("a limit fits the dtype")
    }

    fn forward<T: Float + Send + Sync>(&self, g: &[T], u: &[T]) -> Vec<T> {
        let l = self.bound::<T>();
        let mut h = vec![T::zero(); g.len()];
        h.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(h, (g, u))| {
                for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
                    let a = g.min(l);
                    *h = a / (T::one() + (-a).exp()) * u.max(-l).min(l);
                }
            });
        h
    }
}

/// `[g <= L]`, `[-L <= u <= L]` and the rest of one element's backward.
#[inline(always)]
fn element_grads<T: Float>(g: T, u: T, dh: T, l: T) -> (T, T) {
    let a = g.min(l);
    let s = T::one() / (T::one() + (-a).exp());
    let silu = a * s;
    let c = u.max(-l).min(l);
    let dg = if g <= l {
        dh * c * s * (T::one() + a * (T::one() - s))
    } else {
        T::zero()
    };
    let du = if u >= -l && u <= l {
        dh * silu
    } else {
        T::zero()
    };
    (dg, du)
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
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
                "swiglu: gate {:?} and up {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let name = self.name();
        let out = by_dtype!(name, s1.dtype(), |T| {
            let g = storage_slice::<T>(name, s1, l1)?;
            T::to_cpu_storage_owned(self.forward(g, storage_slice::<T>(name, s2, l2)?))
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // (2, ...): dg then du, one pass; no autograd graph kept.
        let both = g.detach().apply_op3_no_bwd(
            &u.detach(),
            &grad_res.detach().contiguous()?,
            &SwiGluBackward(*self),
        )?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// The backward of [`SwiGlu`]: (g, u, dh) -> (2, ...) holding dg and du.
#[derive(Debug, Clone, Copy)]
struct SwiGluBackward(SwiGlu);

impl SwiGluBackward {
    fn run<T: Float + Send + Sync>(&self, g: &[T], u: &[T], dh: &[T]) -> Vec<T> {
        let l = self.0.bound::<T>();
        let n = g.len();
        let mut out = vec![T::zero(); 2 * n];
        let (dg, du) = out.split_at_mut(n);
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .zip(dh.par_chunks(CHUNK))
            .for_each(|(((dg, du), (g, u)), dh)| {
                for i in 0..g.len() {
                    (dg[i], du[i]) = element_grads(g[i], u[i], dh[i], l);
                }
            });
        out
    }
}

impl CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
            candle_core::bail!(
                "swiglu-backward: shapes {:?}, {:?}, {:?} differ",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let name = self.name();
        let out = by_dtype!(name, s1.dtype(), |T| {
            let g = storage_slice::<T>(name, s1, l1)?;
            let u = storage_slice::<T>(name, s2, l2)?;
            T::to_cpu_storage_owned(self.run(g, u, storage_slice::<T>(name, s3, l3)?))
        });
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((out, Shape::from(dims)))
    }
}

/// The plain reference, elementwise in f64: `silu(min(g, L)) * clamp(u, -L, L)`.
pub fn reference(g: &[f64], u: &[f64], limit: Option<f64>) -> Vec<f64> {
    let l = limit.unwrap_or(f64::INFINITY);
    g.iter()
        .zip(u)
        .map(|(&g, &u)| {
            let a = g.min(l);
            a / (1.0 + (-a).exp()) * u.clamp(-l, l)
        })
        .collect()
}
