//! RMSNorm. candle's fused `rms_norm` drops gradients (DESIGN.md §3): f32 / f64 go
//! through our fused op with its backward (`kernels::rms_norm`, which keeps one
//! activation per norm in the autograd graph instead of three), other dtypes through
//! the same formula from plain tensor ops.

use super::params::{Init, Vb};
use crate::error::Result;
use crate::kernels::rms_norm::WeightedRmsNorm;
use candle_core::{DType, Tensor, D};

#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// (C)
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(vb: &Vb, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get(&[dim], "weight", Init::Ones)?;
        Ok(Self { weight, eps })
    }

    /// x / sqrt(mean(x^2) + eps) * w over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let fused = x.device().is_cpu()
            && x.dtype() == self.weight.dtype()
            && matches!(x.dtype(), DType::F32 | DType::F64);
        if fused {
            return Ok(WeightedRmsNorm { eps: self.eps }.apply(x, &self.weight)?);
        }
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?; // (..., 1)
        let inv = (ms + self.eps)?.sqrt()?.recip()?;
        Ok(x.broadcast_mul(&inv)?.broadcast_mul(&self.weight)?)
    }
}

/// x / sqrt(mean(x^2) + eps) over the last dimension, no weight (DeepSeek-V4's query
/// heads and hyper-connection inputs).
pub fn unweighted_rms(x: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?)
}
