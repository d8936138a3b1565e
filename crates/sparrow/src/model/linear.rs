//! `Linear`: y = x W^T with W stored (out, in) as in PyTorch / HF checkpoints, either
//! as a tensor (trainable, f32), kept in a ggml block type as a GGUF file ships it
//! (`kernels::qmatmul`: inference only, activations quantized to int8 per block), or in
//! f16 / bf16 (`kernels::hmatmul`: inference only, widened in registers).

pub use super::params::LinearWeight;
use super::params::{Init, Vb};
use crate::error::{Error, Result};
use crate::kernels::const_matmul::ConstWeightMatmul;
use crate::kernels::hmatmul::HalfMatrix;
use crate::kernels::qmatmul::{qxwt, QMatrix};
use candle_core::{Device, Tensor};

#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
}

impl Linear {
    /// `vb` is the module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub fn new(vb: &Vb, in_dim: usize, out_dim: usize, std: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_linear(&[out_dim, in_dim], "weight", Init::Normal(std))?,
        })
    }

    pub fn from_weight(weight: LinearWeight) -> Self {
        Self { weight }
    }

    /// The weight as a tensor (out, in): the parameter itself, or the packed values
    /// widened to f32.
    pub fn weight(&self) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(t) => Ok(t.clone()),
            LinearWeight::Quantized(q) => Ok(Tensor::from_vec(
                q.dequantize(),
                (q.rows, q.cols),
                &Device::Cpu,
            )?),
            LinearWeight::Half(h) => Ok(Tensor::from_vec(
                h.to_f32(),
                (h.rows, h.cols),
                &Device::Cpu,
            )?),
        }
    }

    /// How the weight is held.
    pub fn packed(&self) -> &LinearWeight {
        &self.weight
    }

    /// Whether the weight is a training variable (its values change between calls).
    pub fn is_trainable(&self) -> bool {
        matches!(&self.weight, LinearWeight::Dense(t) if t.is_variable())
    }

    /// Whether the weight is kept quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, LinearWeight::Quantized(_))
    }

    /// Number of weights (out * in).
    pub fn num_parameters(&self) -> usize {
        self.weight.dims().map_or(0, |(r, c)| r * c)
    }

    /// Inference: x (N, in) -> (N, out). Dense: up to [`XWT_MAX_ROWS`] rows (decode
    /// steps) through `kernels::matmul::xwt` (f32 weights and input; no autograd),
    /// whose rows are bit-identical whatever else is in the batch; larger inputs (steps
    /// carrying a prefill chunk) through candle's GEMM, which is faster there. Other
    /// dtypes take [`forward`](Self::forward). Quantized: `kernels::qmatmul::qxwt`;
    /// half: `kernels::hmatmul::xwt`.
    pub fn infer(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => matmul_xwt(x, w),
            LinearWeight::Quantized(q) => quantized_xwt(x, q),
            LinearWeight::Half(h) => half_xwt(x, h),
        }
    }

    /// [`infer`](Self::infer) of several layers on the same input (Q, K and V; gate and
    /// up): quantized weights go through one fused call (x quantized once, one parallel
    /// pass), half-precision ones likewise; others one by one.
    pub fn infer_many(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let all = |pick: fn(&LinearWeight) -> bool| {
            !layers.is_empty() && layers.iter().all(|l| pick(&l.weight))
        };
        if all(|w| matches!(w, LinearWeight::Half(_))) {
            let hs: Vec<&HalfMatrix> = layers
                .iter()
                .filter_map(|l| match &l.weight {
                    LinearWeight::Half(h) => Some(h.as_ref()),
                    _ => None,
                })
                .collect();
            let dims: Vec<(usize, usize)> = hs.iter().map(|h| (h.rows, h.cols)).collect();
            return fused_on_host(x, &dims, "half-precision", |xs, n| {
                crate::kernels::hmatmul::xwt_many(xs, n, &hs)
            });
        }
        if all(|w| matches!(w, LinearWeight::Quantized(_))) {
            let qs: Vec<&QMatrix> = layers
                .iter()
                .filter_map(|l| match &l.weight {
                    LinearWeight::Quantized(q) => Some(q.as_ref()),
                    _ => None,
                })
                .collect();
            let dims: Vec<(usize, usize)> = qs.iter().map(|q| (q.rows, q.cols)).collect();
            return fused_on_host(x, &dims, "quantized", |xs, n| {
                crate::kernels::qmatmul::qxwt_many(xs, n, &qs)
            });
        }
        layers.iter().map(|l| l.infer(x)).collect()
    }

    /// (..., in) -> (..., out)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let n: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((n, in_dim))?;
        let (y, out_dim) = match &self.weight {
            // A frozen weight under a tracked input (training an adapter): only dx.
            LinearWeight::Dense(w) if !w.is_variable() && x2.track_op() && w.device().is_cpu() => {
                (ConstWeightMatmul::new(w)?.apply(&x2)?, w.dim(0)?)
            }
            LinearWeight::Dense(w) => (x2.matmul(&w.t()?)?, w.dim(0)?), // (N, out)
            LinearWeight::Quantized(q) => (quantized_xwt(&x2, q)?, q.rows),
            LinearWeight::Half(h) => (half_xwt(&x2, h)?, h.rows),
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("non-empty dims") = out_dim;
        Ok(y.reshape(out_dims)?)
    }

    /// Rows `ids` of the weight (an embedding lookup): (N, in). `flat` holds the same
    /// ids as `ids` (a (N,) u32 tensor), already checked against the row count.
    pub fn rows(&self, ids: &Tensor, flat: &[u32]) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Ok(w.index_select(ids, 0)?),
            LinearWeight::Quantized(q) => {
                let mut out = vec![0f32; flat.len() * q.cols];
                for (row, &id) in out.chunks_exact_mut(q.cols).zip(flat) {
                    q.dequantize_row(id as usize, row);
                }
                Ok(Tensor::from_vec(out, (flat.len(), q.cols), &Device::Cpu)?)
            }
            LinearWeight::Half(h) => {
                let mut out = vec![0f32; flat.len() * h.cols];
                for (row, &id) in out.chunks_exact_mut(h.cols).zip(flat) {
                    h.row_f32(id as usize, row);
                }
                Ok(Tensor::from_vec(out, (flat.len(), h.cols), &Device::Cpu)?)
            }
        }
    }
}

/// x (N, K) through one fused product with several packed weights of (rows, cols)
/// `dims` (`kind` names them in the error): `kernel(x on the host, N)` gives one
/// (N, rows) result per weight.
fn fused_on_host(
    x: &Tensor,
    dims: &[(usize, usize)],
    kind: &str,
    kernel: impl FnOnce(&[f32], usize) -> Vec<Vec<f32>>,
) -> Result<Vec<Tensor>> {
    let (n, k) = x.dims2()?;
    if dims.iter().any(|&(_, cols)| cols != k) {
        return Err(Error::Invalid(format!(
            "input of {k} features for {kind} weights of other widths"
        )));
    }
    kernel(&host_f32(x)?, n)
        .into_iter()
        .zip(dims)
        .map(|(y, &(rows, _))| Ok(Tensor::from_vec(y, (n, rows), x.device())?))
        .collect()
}

/// x (N, K) f32 on the CPU times a half-precision W^T.
fn half_xwt(x: &Tensor, h: &HalfMatrix) -> Result<Tensor> {
    let (n, k) = x.dims2()?;
    if k != h.cols {
        return Err(Error::Invalid(format!(
            "input of {k} features for a {}x{} half-precision weight",
            h.rows, h.cols
        )));
    }
    let y = crate::kernels::hmatmul::xwt(&host_f32(x)?, n, h);
    Ok(Tensor::from_vec(y, (n, h.rows), x.device())?)
}

/// x (N, K) f32 on the CPU times a quantized W^T.
fn quantized_xwt(x: &Tensor, q: &QMatrix) -> Result<Tensor> {
    let (n, k) = x.dims2()?;
    if k != q.cols {
        return Err(Error::Invalid(format!(
            "input of {k} features for a {}x{} quantized weight",
            q.rows, q.cols
        )));
    }
    let y = qxwt(&host_f32(x)?, n, q);
    Ok(Tensor::from_vec(y, (n, q.rows), x.device())?)
}

/// A tensor's values as f32 on the host, detached (what the kernels read).
pub(crate) fn host_f32(x: &Tensor) -> Result<Vec<f32>> {
    Ok(x.detach()
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?)
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
