//! RMSNorm with its weight, `y = x / sqrt(mean(x^2) + eps) * w` over the last dimension,
//! as one op with its backward (`model::norm::RmsNorm`).
//!
//! Composed from candle's ops (`reference::rms_norm`) the square, the normalised copy
//! and the weighted output, each the size of x, stay in the autograd graph: three
//! activations per norm, two norms per layer. Here only the output is kept; the
//! backward recomputes each row's rms from x:
//! `dx = (w g - n mean(w g n)) / rms`, `dw = sum over rows of g n`, with n = x / rms.

use super::{add_parts, by_dtype, host, storage_slice};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

/// Rows per rayon task of the weight-gradient pass.
const ROWS_PER_TASK: usize = 64;

/// x (..., C), w (C) -> (..., C).
#[derive(Debug, Clone, Copy)]
pub struct WeightedRmsNorm {
    pub eps: f64,
}

impl WeightedRmsNorm {
    pub fn apply(self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op2(&w.contiguous()?, self)
    }

    fn inv_rms<T: Float>(&self, row: &[T]) -> T {
        let ss = row.iter().fold(T::zero(), |a, &v| a + v * v);
        let c = T::from(row.len()).unwrap_or(T::nan());
        let eps = T::from(self.eps).unwrap_or(T::nan());
        (ss / c + eps).sqrt().recip()
    }

    fn forward<T: Float + Send + Sync>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let mut y = vec![T::zero(); x.len()];
        y.par_chunks_mut(w.len())
            .zip(x.par_chunks(w.len()))
            .for_each(|(yr, xr)| {
                let inv = self.inv_rms(xr);
                for ((o, &v), &wv) in yr.iter_mut().zip(xr).zip(w) {
                    *o = v * inv * wv;
                }
            });
        y
    }

    /// (dx, dw) for the output gradient g.
    fn backward<T: Float + Send + Sync>(&self, x: &[T], w: &[T], g: &[T]) -> (Vec<T>, Vec<T>) {
        let c = w.len();
        let ct = T::from(c).unwrap_or(T::nan());
        let mut dx = vec![T::zero(); x.len()];
        dx.par_chunks_mut(c)
            .zip(x.par_chunks(c).zip(g.par_chunks(c)))
            .for_each(|(dr, (xr, gr))| {
                let inv = self.inv_rms(xr);
                // mean over the row of (w g) * n
                let m = xr
                    .iter()
                    .zip(gr)
                    .zip(w)
                    .fold(T::zero(), |a, ((&xv, &gv), &wv)| a + wv * gv * xv * inv)
                    / ct;
                for (((o, &xv), &gv), &wv) in dr.iter_mut().zip(xr).zip(gr).zip(w) {
                    *o = (wv * gv - xv * inv * m) * inv;
                }
            });
        let dw = x
            .par_chunks(c * ROWS_PER_TASK)
            .zip(g.par_chunks(c * ROWS_PER_TASK))
            .map(|(xs, gs)| {
                let mut acc = vec![T::zero(); c];
                for (xr, gr) in xs.chunks(c).zip(gs.chunks(c)) {
                    let inv = self.inv_rms(xr);
                    for ((a, &xv), &gv) in acc.iter_mut().zip(xr).zip(gr) {
                        *a = *a + gv * xv * inv;
                    }
                }
                acc
            })
            .reduce(|| vec![T::zero(); c], add_parts);
        (dx, dw)
    }
}

impl CustomOp2 for WeightedRmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let fits = matches!((l1.dims().last(), l2.dims()), (Some(&c), &[cw]) if c == cw && c > 0);
        if !fits {
            candle_core::bail!(
                "{name}: x {:?} and weight {:?} (need x (..., C), w (C))",
                l1.dims(),
                l2.dims()
            );
        }
        let out = by_dtype!(name, s1.dtype(), |T| {
            let x = storage_slice::<T>(name, s1, l1)?;
            T::to_cpu_storage_owned(self.forward(x, storage_slice::<T>(name, s2, l2)?))
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dev = x.device();
        let (dx, dw) = by_dtype!(self.name(), x.dtype(), |T| {
            let (dx, dw) = self.backward::<T>(&host(x)?, &host(w)?, &host(g)?);
            (
                Tensor::from_vec(dx, x.shape(), dev)?,
                Tensor::from_vec(dw, w.shape(), dev)?,
            )
        });
        Ok((Some(dx), Some(dw)))
    }
}
