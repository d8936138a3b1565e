//! `Linear`: y = x W^T with W stored (out, in) as in PyTorch / HF checkpoints.

use super::params::{Init, Vb};
use crate::error::Result;
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct Linear {
    /// (out, in)
    pub weight: Tensor,
}

impl Linear {
    /// `vb` is the module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub fn new(vb: &Vb, in_dim: usize, out_dim: usize, std: f64) -> Result<Self> {
        let weight = vb.get(&[out_dim, in_dim], "weight", Init::Normal(std))?;
        Ok(Self { weight })
    }

    /// (..., in) -> (..., out)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let n: usize = dims[..dims.len() - 1].iter().product();
        let out_dim = self.weight.dim(0)?;
        let y = x.reshape((n, in_dim))?.matmul(&self.weight.t()?)?; // (N, out)
        let mut out_dims = dims;
        *out_dims.last_mut().expect("non-empty dims") = out_dim;
        Ok(y.reshape(out_dims)?)
    }
}
