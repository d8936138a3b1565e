//! Rotary position embedding, non-interleaved (HF Llama "rotate_half") layout: the
//! first half of each head's dimensions pairs with the second half. Built from plain
//! ops so gradients flow (candle's fused `rope` drops them).

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, D};

#[derive(Debug, Clone)]
pub struct Rope {
    /// (max_pos, D/2)
    cos: Tensor,
    /// (max_pos, D/2)
    sin: Tensor,
    max_pos: usize,
}

impl Rope {
    pub fn new(
        head_dim: usize,
        max_pos: usize,
        theta: f64,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for i in 0..half {
                let inv_freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
                let angle = p as f64 * inv_freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_pos, half), dev)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (max_pos, half), dev)?.to_dtype(dtype)?,
            max_pos,
        })
    }

    /// Rotate x (B, H, T, D) as positions offset..offset+T.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_b, _h, t, d) = x.dims4()?;
        if offset + t > self.max_pos {
            return Err(Error::Invalid(format!(
                "position {} exceeds max_position_embeddings {}",
                offset + t,
                self.max_pos
            )));
        }
        let half = d / 2;
        let cos = self.cos.narrow(0, offset, t)?; // (T, D/2)
        let sin = self.sin.narrow(0, offset, t)?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Ok(Tensor::cat(&[r1, r2], D::Minus1)?)
    }
}
