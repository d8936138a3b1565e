//! Cross-entropy from plain ops (differentiable; no fused log-softmax).

use crate::error::Result;
use candle_core::{Tensor, D};

/// Mean negative log-likelihood of `targets` (N) u32 under `logits` (N, V).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach(); // constant shift: no gradient needed
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (N, 1)
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?; // (N, 1)
    Ok((lse - picked)?.mean_all()?)
}
