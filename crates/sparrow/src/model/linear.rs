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

    /// Inference: x (N, in) -> (N, out). Up to [`XWT_MAX_ROWS`] rows (decode steps)
    /// through `kernels::matmul::xwt` (f32 weights and input; no autograd), whose rows
    /// are bit-identical whatever else is in the batch; larger inputs (steps carrying a
    /// prefill chunk) through candle's GEMM, which is faster there. Other dtypes take
    /// [`forward`](Self::forward).
    pub fn infer(&self, x: &Tensor) -> Result<Tensor> {
        matmul_xwt(x, &self.weight)
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

/// Most rows [`Linear::infer`] sends through the batch-invariant kernel.
pub const XWT_MAX_ROWS: usize = 32;

/// x (N, K) times w^T for w (M_out, K), by the inference kernel when both are f32 and
/// N <= [`XWT_MAX_ROWS`] (see [`Linear::infer`]).
pub fn matmul_xwt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    use candle_core::DType;
    let (n, k) = x.dims2()?;
    let (out, kw) = w.dims2()?;
    if n > XWT_MAX_ROWS
        || x.dtype() != DType::F32
        || w.dtype() != DType::F32
        || !x.device().is_cpu()
        || k != kw
    {
        return Ok(x.matmul(&w.t()?)?);
    }
    let xs: Vec<f32> = x.contiguous()?.flatten_all()?.to_vec1()?;
    let ws = w.contiguous()?;
    let (storage, layout) = ws.storage_and_layout();
    let y = match &*storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) => {
            let wsl = crate::kernels::contiguous_slice("xwt", data, layout)?;
            crate::kernels::matmul::xwt(&xs, wsl, n, k, out)
        }
        _ => return Ok(x.matmul(&w.t()?)?),
    };
    drop(storage);
    Ok(Tensor::from_vec(y, (n, out), x.device())?)
}
