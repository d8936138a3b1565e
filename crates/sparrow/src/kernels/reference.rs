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

/// Sparse attention as masked dense attention: q (B, T, H, D), k, v (B, KV, S, D),
/// `idx` (B, T, K) selected positions (`topk::NONE` = unused), optional per-slot weight
/// multipliers `mult` (B, T, K) (the straight-through gate; 1 = plain attention).
/// Returns (B, T, H, D). Differentiable in q, k, v and `mult`.
pub fn sparse_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    idx: &[u32],
    mult: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, t, h, _d) = q.dims4()?;
    let (_, kv, s, _) = k.dims4()?;
    let kk = idx.len() / (b * t).max(1);
    let dev = q.device();
    // mask (B, 1, T, S): 0 on selected positions, -inf elsewhere.
    let mut mask = vec![f32::NEG_INFINITY; b * t * s];
    for (r, row) in idx.chunks(kk.max(1)).enumerate() {
        for &i in row {
            if i != super::topk::NONE {
                mask[r * s + i as usize] = 0.0;
            }
        }
    }
    let mask = Tensor::from_vec(mask, (b, 1, t, s), dev)?.to_dtype(q.dtype())?;
    let heads: Vec<u32> = (0..h).map(|x| (x / (h / kv)) as u32).collect();
    let heads = Tensor::from_vec(heads, h, dev)?;
    let k = k.index_select(&heads, 1)?; // (B, H, S, D)
    let v = v.index_select(&heads, 1)?;
    let q = q.transpose(1, 2)?.contiguous()?; // (B, H, T, D)
    let logits = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&mask)?;
    let mut p = candle_nn::ops::softmax(&logits, D::Minus1)?; // (B, H, T, S)
    if let Some(m) = mult {
        // Scatter the (B, T, K) multipliers onto (B, 1, T, S).
        let mut onehot = vec![0f32; b * t * kk * s];
        for (r, row) in idx.chunks(kk.max(1)).enumerate() {
            for (slot, &i) in row.iter().enumerate() {
                if i != super::topk::NONE {
                    onehot[(r * kk + slot) * s + i as usize] = 1.0;
                }
            }
        }
        let onehot = Tensor::from_vec(onehot, (b * t, kk, s), dev)?.to_dtype(q.dtype())?;
        let m_full = m
            .reshape((b * t, 1, kk))?
            .matmul(&onehot)?
            .reshape((b, 1, t, s))?;
        p = p.broadcast_mul(&m_full)?;
    }
    p.matmul(&v.contiguous()?)?.transpose(1, 2)?.contiguous()
}

/// Reference of `experts::GatherRows`: `x.index_select(token_of)`, (M, C).
pub fn moe_gather_reference(x: &Tensor, plan: &super::experts::Dispatch) -> Result<Tensor> {
    let idx = Tensor::from_slice(&plan.token_of, plan.rows(), x.device())?;
    x.index_select(&idx, 0)
}

/// Reference of `experts::CombineSlots`: weight each grouped row by its slot's weight and
/// `index_add` it onto its token, (N, C).
pub fn moe_combine_reference(
    ys: &Tensor,
    w: &Tensor,
    plan: &super::experts::Dispatch,
) -> Result<Tensor> {
    let dev = ys.device();
    let c = ys.dim(1)?;
    let zeros = Tensor::zeros((plan.n_tokens, c), ys.dtype(), dev)?;
    if plan.rows() == 0 {
        return Ok(zeros);
    }
    let slots = Tensor::from_slice(&plan.slot_of, plan.rows(), dev)?;
    let tokens = Tensor::from_slice(&plan.token_of, plan.rows(), dev)?;
    let wg = w.flatten_all()?.index_select(&slots, 0)?.unsqueeze(1)?; // (M, 1)
    zeros.index_add(&tokens, &ys.broadcast_mul(&wg)?, 0)
}

/// One AdamW update written as candle tensor ops (the optimizer's code before
/// `kernels::adamw`): returns the new parameter and moments `(p, m, v)`.
pub fn adamw_update(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    s: &super::adamw::AdamWStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    let g = if s.grad_scale != 1.0 {
        g.affine(s.grad_scale, 0.0)?
    } else {
        g.clone()
    };
    let m = ((m * s.beta1)? + (&g * (1.0 - s.beta1))?)?;
    let v = ((v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
    let denom = ((&v / s.bias_correction2)?.sqrt()? + s.eps)?;
    let update = ((&m / s.bias_correction1)? / denom)?;
    let p = ((p * (1.0 - s.lr * s.weight_decay))? - (update * s.lr)?)?;
    Ok((p, m, v))
}

/// `kernels::selected_scores::SelectedScores` composed from candle's ops: the selected
/// keys gathered (B * T, K, di), `act(q k^T)` per index head, weighted by w. q (B, T,
/// Hi, di), w (B, T, Hi), keys (B, S, di), idx (B, T, K) with `NONE` slots scoring 0.
pub fn selected_scores(
    relu: bool,
    q: &Tensor,
    w: &Tensor,
    keys: &Tensor,
    idx: &[u32],
    k: usize,
) -> Result<Tensor> {
    let (b, t, h, di) = q.dims4()?;
    let s = keys.dim(1)?;
    let none = super::topk::NONE;
    let flat: Vec<u32> = idx
        .iter()
        .enumerate()
        .map(|(n, &i)| (n / (t * k)) as u32 * s as u32 + if i == none { 0 } else { i })
        .collect();
    let valid: Vec<f64> = idx
        .iter()
        .map(|&i| f64::from(u8::from(i != none)))
        .collect();
    let flat = Tensor::from_vec(flat, b * t * k, keys.device())?;
    let ksel = keys
        .reshape((b * s, di))?
        .index_select(&flat, 0)?
        .reshape((b * t, k, di))?; // (B*T, K, di)
    let dots = q.reshape((b * t, h, di))?.matmul(&ksel.t()?)?; // (B*T, Hi, K)
    let dots = if relu { dots.relu()? } else { dots };
    let scores = w
        .reshape((b * t, 1, h))?
        .matmul(&dots)?
        .reshape((b, t, k))?;
    let valid = Tensor::from_vec(valid, (b, t, k), q.device())?.to_dtype(q.dtype())?;
    scores * valid
}

/// `kernels::rms_norm::WeightedRmsNorm` composed from candle's ops: x (..., C), w (C).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}
