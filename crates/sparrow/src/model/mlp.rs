//! SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used as the dense FFN, as each
//! routed expert and as the shared experts. DeepSeek-V4 clamps it (`swiglu_limit`):
//! down(silu(min(gate(x), L)) * clamp(up(x), -L, L)).

use super::linear::Linear;
use super::params::Vb;
use crate::error::Result;
use crate::kernels::swiglu::SwiGlu;
use candle_core::{DType, Tensor};

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    /// `swiglu_limit`: the clamp L, if any.
    limit: Option<f64>,
}

impl Mlp {
    /// `out_std` initialises the down projection (scaled for depth).
    pub fn new(vb: &Vb, hidden: usize, width: usize, std: f64, out_std: f64) -> Result<Self> {
        Ok(Self {
            gate_proj: Linear::new(&vb.pp("gate_proj"), hidden, width, std)?,
            up_proj: Linear::new(&vb.pp("up_proj"), hidden, width, std)?,
            down_proj: Linear::new(&vb.pp("down_proj"), width, hidden, out_std)?,
            limit: None,
        })
    }

    /// This SwiGLU clamped at `limit` (none: unclamped).
    pub fn clamped(mut self, limit: Option<f64>) -> Self {
        self.limit = limit;
        self
    }

    /// silu(gate) * up, clamped first when the layer has a limit: one fused op
    /// (`kernels::swiglu`) in f32 / f64, candle's ops for the half types.
    fn gated(&self, g: &Tensor, u: &Tensor) -> Result<Tensor> {
        if matches!(g.dtype(), DType::F32 | DType::F64) {
            return Ok(SwiGlu { limit: self.limit }.apply(g, u)?);
        }
        Ok(match self.limit {
            Some(l) => (candle_nn::ops::silu(&g.minimum(l)?)? * u.clamp(-l, l)?)?,
            None => (candle_nn::ops::silu(g)? * u)?,
        })
    }

    /// (..., C) -> (..., C)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate_proj.forward(x)?;
        let u = self.up_proj.forward(x)?;
        let h = self.gated(&g, &u)?;
        self.down_proj.forward(&h)
    }

    /// Scalars in the three projections.
    pub fn num_parameters(&self) -> usize {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
            .iter()
            .map(|l| l.num_parameters())
            .sum()
    }

    /// Inference over rows x (N, C) with the batch-invariant kernel (`Linear::infer`).
    pub fn infer(&self, x: &Tensor) -> Result<Tensor> {
        let gu = Linear::infer_many(&[&self.gate_proj, &self.up_proj], x)?;
        let h = self.gated(&gu[0], &gu[1])?;
        self.down_proj.infer(&h)
    }
}
