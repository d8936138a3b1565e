//! Fused masked softmax with attention sinks (DeepSeek-V4's attention, whole windows).
//!
//! Inputs: scores x (B, H, T, S), an additive mask m (B, T, S) (0 where the query sees
//! the key, a large negative value elsewhere), one sink logit per head sink (H).
//! Output: `p_j = exp(scale x_j + m_j - M) / (sum_k exp(scale x_k + m_k - M) +
//! exp(sink - M))`, M the row's largest logit, the sink's included: the sink takes its
//! share of the normaliser and adds no value. Backward, with `r = sum_j p_j g_j`:
//! `dx = scale * p * (g - r)` (`softmax::SoftmaxBackward`), `dsink_h = -sum over (b, t)
//! of (1 - sum_j p_j) * r`; the mask gets none.
//!
//! One pass per row, rows in parallel, instead of the mask add, max, subtract, exp,
//! sum and divide over (B, H, T, S) tensors that training would otherwise keep (four
//! of them per layer; `configs/v4-small.json` at 8 x 1024 tokens did not fit 24 GB).
//! [`reference`] is the plain version the tests compare against.

use super::softmax::SoftmaxBackward;
use super::{by_dtype, rows_per_task, storage_slice};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, WithDType, D};
use num_traits::Float;
use rayon::prelude::*;

/// The op; `apply` checks the shapes.
#[derive(Debug, Clone, Copy)]
pub struct SinkSoftmax {
    pub scale: f64,
}

impl SinkSoftmax {
    /// scores (B, H, T, S), mask (B, T, S), sinks (H) -> probabilities (B, H, T, S).
    pub fn apply(
        self,
        scores: &Tensor,
        mask: &Tensor,
        sinks: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, h, t, s) = scores.dims4()?;
        if mask.dims() != [b, t, s] || sinks.dims() != [h] {
            candle_core::bail!(
                "sink-softmax: scores {:?}, mask {:?}, sinks {:?}",
                scores.dims(),
                mask.dims(),
                sinks.dims()
            );
        }
        scores
            .contiguous()?
            .apply_op3(&mask.contiguous()?, &sinks.contiguous()?, self)
    }

    fn forward<T: Float + Send + Sync>(
        &self,
        x: &[T],
        m: &[T],
        sink: &[T],
        dims: [usize; 4],
    ) -> Vec<T> {
        let [_b, h, t, s] = dims;
        let scale = T::from(self.scale).expect("scale fits the dtype");
        let mut y = vec![T::zero(); x.len()];
        y.par_chunks_mut(s)
            .with_min_len(rows_per_task(s))
            .enumerate()
            .for_each(|(r, out)| {
                let (bi, hi, ti) = (r / (h * t), (r / t) % h, r % t);
                let row = &x[r * s..(r + 1) * s];
                let mask = &m[(bi * t + ti) * s..(bi * t + ti + 1) * s];
                let sk = sink[hi];
                let mut max = sk;
                for (&v, &mv) in row.iter().zip(mask) {
                    max = max.max(v * scale + mv);
                }
                let mut sum = (sk - max).exp();
                for ((o, &v), &mv) in out.iter_mut().zip(row).zip(mask) {
                    let e = (v * scale + mv - max).exp();
                    *o = e;
                    sum = sum + e;
                }
                let inv = T::one() / sum;
                out.iter_mut().for_each(|o| *o = *o * inv);
            });
        y
    }
}

impl CustomOp3 for SinkSoftmax {
    fn name(&self) -> &'static str {
        "sink-softmax"
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
        let dims: [usize; 4] = match l1.dims() {
            &[b, h, t, s] => [b, h, t, s],
            other => candle_core::bail!("sink-softmax: scores {other:?} are not 4-d"),
        };
        let name = self.name();
        let out = by_dtype!(name, s1.dtype(), |T| {
            let x = storage_slice::<T>(name, s1, l1)?;
            let m = storage_slice::<T>(name, s2, l2)?;
            let k = storage_slice::<T>(name, s3, l3)?;
            T::to_cpu_storage_owned(self.forward(x, m, k, dims))
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        _sinks: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let p = res.detach().contiguous()?;
        let g = grad_res.contiguous()?;
        let dx = p.apply_op2_no_bwd(&g, &SoftmaxBackward { scale: self.scale })?;
        let r = (&p * &g)?.sum_keepdim(D::Minus1)?; // (B, H, T, 1)
        let sink_share = p.sum_keepdim(D::Minus1)?.affine(-1.0, 1.0)?; // 1 - sum_j p_j
        let dsink = (sink_share * r)?.sum(3)?.sum(2)?.sum(0)?.neg()?; // (H)
        Ok((Some(dx), None, Some(dsink)))
    }
}

/// The plain reference: the same function of scores x (B*H*T*S, row-major), mask
/// (B*T*S) and sinks (H), in f64.
pub fn reference(x: &[f64], m: &[f64], sink: &[f64], dims: [usize; 4], scale: f64) -> Vec<f64> {
    let [b, h, t, s] = dims;
    let mut out = vec![0.0; x.len()];
    for bi in 0..b {
        for (hi, &sk) in sink.iter().enumerate().take(h) {
            for ti in 0..t {
                let r = (bi * h + hi) * t + ti;
                let logits: Vec<f64> = (0..s)
                    .map(|j| x[r * s + j] * scale + m[(bi * t + ti) * s + j])
                    .collect();
                let z: f64 = logits.iter().map(|l| l.exp()).sum::<f64>() + sk.exp();
                for (o, l) in out[r * s..(r + 1) * s].iter_mut().zip(&logits) {
                    *o = l.exp() / z;
                }
            }
        }
    }
    out
}
