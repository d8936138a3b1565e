//! Plain reference implementations of our kernels, built from candle's composable
//! (autograd-capable) ops. Slow and obviously correct: the tests hold the fused kernels
//! to these.

use candle_core::{DType, Device, Result, Tensor, D};

/// `softmax(scale * x + mask)` with the causal mask of `kernels::softmax::CausalSoftmax`,
/// for scores (..., G, T, S) whose rows cycle through T queries starting at `offset`.
pub fn causal_softmax(x: &Tensor, scale: f64, queries: usize, offset: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let s = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let mask: Vec<f32> = (0..queries)
        .flat_map(|t| {
            (0..s).map(move |j| {
                if j <= offset + t {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (queries, s), &Device::Cpu)?.to_dtype(x.dtype())?;
    let x = (x * scale)?
        .reshape((rows / queries, queries, s))?
        .broadcast_add(&mask)?;
    candle_nn::ops::softmax(&x, D::Minus1)?.reshape(dims)
}

/// Mean negative log-likelihood of `targets` (N) u32 under `logits` (N, V).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (N, 1)
    let picked = shifted.gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?; // (N, 1)
    (lse - picked)?.mean_all()
}
