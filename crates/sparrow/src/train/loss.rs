//! The language-modelling loss.

use crate::error::Result;
use crate::kernels::cross_entropy::CrossEntropy;
use candle_core::Tensor;

/// Mean negative log-likelihood of `targets` (N) u32 under `logits` (N, V): the fused
/// kernel (`kernels::cross_entropy`), held to `kernels::reference::cross_entropy` by tests.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(CrossEntropy::apply(logits, targets)?)
}
