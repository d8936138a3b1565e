//! The LM head and the cross-entropy as one op for training: mean over rows of the NLL
//! of `targets` under `x W^T`, without the (N, V) logits living in the autograd graph.
//!
//! Unfused, a training step of `configs/routers.json` (2048 tokens, vocabulary 8192)
//! writes 64 MB of logits, then 64 MB of their gradient, which candle's backward adds to
//! a zero-filled 64 MB buffer before the two head GEMMs read it: a quarter of the step
//! went to element-wise passes, zero fills and fresh pages. Here the rows go through in
//! chunks of at most [`CHUNK_LOGITS`] logits: each chunk's logits are computed, turned in
//! place into their gradient `(softmax - onehot) / N` (`CrossEntropyGradInPlace`, the
//! loss summed on the way), and multiplied straight into `dx` (the chunk's rows) and
//! `dW` (summed over chunks). The gradients are thus computed in the forward (the loss
//! is the graph's end, so its incoming gradient is a scalar) and the backward scales
//! them. The reference is `reference::cross_entropy(x.matmul(w.t()), targets)`.

use super::cross_entropy::{row_nll, CrossEntropyGradInPlace};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

/// Most logits one chunk holds (16 MB in f32): a vocabulary of 8192 goes 512 rows at a
/// time, 49152 (SmolLM2) 85 rows.
pub const CHUNK_LOGITS: usize = 1 << 22;

/// Mean NLL of `targets` (N) u32 under `x` (N, C) times `w` (V, C) transposed; a scalar
/// of x's dtype (f32 or f64), differentiable in `x` and `w`.
pub fn linear_cross_entropy(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
) -> candle_core::Result<Tensor> {
    linear_cross_entropy_chunked(x, w, targets, chunk_rows(w.dim(0)?))
}

/// Rows per chunk for a vocabulary of `vocab`: as many as [`CHUNK_LOGITS`] holds, at
/// least one.
pub fn chunk_rows(vocab: usize) -> usize {
    (CHUNK_LOGITS / vocab.max(1)).max(1)
}

/// [`linear_cross_entropy`] with `chunk_rows` rows per chunk (the tests force several).
pub fn linear_cross_entropy_chunked(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunk_rows: usize,
) -> candle_core::Result<Tensor> {
    let (n, c) = x.dims2()?;
    let (_, cw) = w.dims2()?;
    let nt = targets.dims1()?;
    if c != cw || nt != n || n == 0 || chunk_rows == 0 {
        candle_core::bail!(
            "linear-cross-entropy: x {:?}, w {:?}, targets {:?}, {chunk_rows} rows per chunk \
             (need x (N, C), w (V, C), N targets, N > 0)",
            x.dims(),
            w.dims(),
            targets.dims()
        );
    }
    if x.dtype() != w.dtype() {
        candle_core::bail!(
            "linear-cross-entropy: x is {:?}, w {:?}",
            x.dtype(),
            w.dtype()
        );
    }
    // Only the gradients something trainable depends on: a frozen head (an adapter's
    // run) needs no (V, C) dW, a constant input no dx.
    let (want_dx, want_dw) = (x.track_op(), w.track_op());
    let want_grads = want_dx || want_dw;
    let (xd, wd) = (x.detach().contiguous()?, w.detach());
    let wt = wd.t()?; // (C, V)
    let targets = targets.contiguous()?;
    let mut loss_sum = 0.0;
    let mut dx_parts = Vec::new();
    let mut dw: Option<Tensor> = None;
    for start in (0..n).step_by(chunk_rows) {
        let rows = chunk_rows.min(n - start);
        let xc = xd.narrow(0, start, rows)?; // (R, C)
        let logits = xc.matmul(&wt)?; // (R, V)
        let tc = targets.narrow(0, start, rows)?;
        if !want_grads {
            loss_sum += row_nll(&logits, &tc)?.iter().sum::<f64>();
        } else {
            loss_sum += CrossEntropyGradInPlace::new(1.0 / n as f64).apply(&logits, &tc)?;
            // `logits` now holds d loss / d logits for these rows.
            if want_dx {
                dx_parts.push(logits.matmul(&wd)?); // (R, C)
            }
            if want_dw {
                let part = logits.t()?.matmul(&xc)?; // (V, C)
                dw = Some(match dw {
                    None => part,
                    Some(acc) => (acc + part)?,
                });
            }
        }
    }
    let loss = loss_sum / n as f64;
    if !want_grads {
        return Tensor::new(loss, x.device())?.to_dtype(x.dtype());
    }
    let dx = if want_dx {
        Some(Tensor::cat(&dx_parts, 0)?)
    } else {
        None
    };
    x.apply_op2(w, PrecomputedGrads { loss, dx, dw })
}

/// The loss with its gradients already computed: forward returns the loss, backward
/// scales the gradients by the incoming one.
struct PrecomputedGrads {
    loss: f64,
    /// (N, C) and (V, C) for an incoming gradient of 1 (None: not needed).
    dx: Option<Tensor>,
    dw: Option<Tensor>,
}

impl CustomOp2 for PrecomputedGrads {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(vec![self.loss as f32]),
            CpuStorage::F64(_) => CpuStorage::F64(vec![self.loss]),
            _ => candle_core::bail!("linear-cross-entropy: f32 or f64 only"),
        };
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad_res.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let scaled = |t: &Option<Tensor>| -> candle_core::Result<Option<Tensor>> {
            match t {
                Some(t) if g != 1.0 => Ok(Some(t.affine(g, 0.0)?)),
                t => Ok(t.clone()),
            }
        };
        Ok((scaled(&self.dx)?, scaled(&self.dw)?))
    }
}
