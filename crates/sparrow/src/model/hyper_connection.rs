//! Manifold-constrained hyper-connections (mHC, DeepSeek-V4; `hc_mult` set): the
//! residual is N parallel streams (B, T, N, C). Before each attention or FFN half,
//! `HyperConnection` reads all N streams (flattened, RMS-normalised without weight,
//! one linear map to 2N + N^2 mixes) and returns
//! - `pre`  = sigmoid(a_pre * s0 + b_pre) + eps          (N): collapses the streams
//!   into the half's input `sum_n pre_n x_n`;
//! - `post` = 2 * sigmoid(a_post * s1 + b_post)          (N): spreads the half's
//!   output over the streams;
//! - `comb` = Sinkhorn(softmax(a_comb * s2 + b_comb) + eps) (N, N): mixes the input
//!   streams, made (nearly) doubly stochastic by `hc_sinkhorn_iters` alternating column /
//!   row normalisations (columns first and last);
//!
//! and the streams after the half are `x'_n = post_n * f + sum_j comb[j, n] x_j`.
//! `HyperHead` collapses the streams once more before the final norm (its own `pre`).
//! Checkpoint names: `layers.{i}.attn_hc.{fn, base, scale}`, `ffn_hc.*`,
//! `model.hc_head.{hc_fn, hc_base, hc_scale}`.

use super::params::{Init, Vb};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kernels::hyper::{RowRms, Sinkhorn, StreamCollapse, StreamMerge};
use candle_core::Tensor;

/// The mixes of one half (`attn_hc` or `ffn_hc`).
#[derive(Debug, Clone)]
pub struct HyperConnection {
    /// ((2 + N) * N, N * C)
    pub fn_: Tensor,
    /// ((2 + N) * N)
    pub base: Tensor,
    /// (3): the scales of pre, post, comb.
    pub scale: Tensor,
    n: usize,
    iters: usize,
    eps: f64,
    norm_eps: f64,
}

/// What a hyper-connection hands its half, and what it needs back.
pub struct HcMix {
    /// (B*T, N + N^2): post (N), then comb (N, N) row-major, comb[j, n] weighing
    /// input stream j in output stream n.
    pub weights: Tensor,
    /// (B, T, C): the half's input.
    pub collapsed: Tensor,
}

impl HyperConnection {
    pub fn new(vb: &Vb, cfg: &ModelConfig, n: usize) -> Result<Self> {
        let m = (2 + n) * n;
        Ok(Self {
            fn_: vb.get(
                &[m, n * cfg.hidden_size],
                "fn",
                Init::Normal(cfg.initializer_range),
            )?,
            base: vb.get(&[m], "base", Init::Zeros)?,
            scale: vb.get(&[3], "scale", Init::Ones)?,
            n,
            iters: cfg.hc_sinkhorn_iters,
            eps: cfg.hc_eps,
            norm_eps: cfg.rms_norm_eps,
        })
    }

    /// streams (B, T, N, C) -> the mixes and the collapsed input. The mixes are
    /// `(x fn^T) / rms(x)` of the flattened streams x (the norm has no weight, so it
    /// commutes with the map); the Sinkhorn iterations, the collapse and the merge are
    /// fused ops (`kernels::hyper`).
    pub fn mix(&self, streams: &Tensor) -> Result<HcMix> {
        let (b, t, n, c) = streams.dims4()?;
        let flat = streams.reshape((b * t, n * c))?;
        let rms = RowRms { eps: self.norm_eps }.apply(&flat)?; // (B*T, 1)
        let mixes = flat.matmul(&self.fn_.t()?)?.broadcast_div(&rms)?; // (B*T, (2+N)*N)
        let part = |start: usize, len: usize, which: usize| -> Result<Tensor> {
            let a = mixes.narrow(1, start, len)?;
            let s = self.scale.narrow(0, which, 1)?;
            Ok(a.broadcast_mul(&s)?
                .broadcast_add(&self.base.narrow(0, start, len)?)?)
        };
        let pre = (candle_nn::ops::sigmoid(&part(0, n, 0)?)? + self.eps)?; // (B*T, N)
        let post = (candle_nn::ops::sigmoid(&part(n, n, 1)?)? * 2.0)?;
        let comb = Sinkhorn {
            iters: self.iters,
            eps: self.eps,
        }
        .apply(&part(2 * n, n * n, 2)?.reshape((b * t, n, n))?)?;
        let collapsed = StreamCollapse::apply(&streams.reshape((b * t, n, c))?, &pre)?;
        Ok(HcMix {
            weights: Tensor::cat(&[post, comb.reshape((b * t, n * n))?], 1)?,
            collapsed: collapsed.reshape((b, t, c))?,
        })
    }

    /// The streams after the half: `post_n * out + sum_j comb[j, n] streams_j`,
    /// streams (B, T, N, C), out (B, T, C) -> (B, T, N, C).
    pub fn merge(&self, streams: &Tensor, mix: &HcMix, out: &Tensor) -> Result<Tensor> {
        let (b, t, n, c) = streams.dims4()?;
        Ok(StreamMerge::apply(
            &streams.reshape((b * t, n, c))?,
            &mix.weights,
            &out.reshape((b * t, c))?,
        )?
        .reshape((b, t, n, c))?)
    }

    /// Streams of the residual (N).
    pub fn streams(&self) -> usize {
        self.n
    }
}

/// The final collapse of the streams before `model.norm`.
#[derive(Debug, Clone)]
pub struct HyperHead {
    /// (N, N * C)
    pub hc_fn: Tensor,
    /// (N)
    pub hc_base: Tensor,
    /// (1)
    pub hc_scale: Tensor,
    eps: f64,
    norm_eps: f64,
}

impl HyperHead {
    pub fn new(vb: &Vb, cfg: &ModelConfig, n: usize) -> Result<Self> {
        Ok(Self {
            hc_fn: vb.get(
                &[n, n * cfg.hidden_size],
                "hc_fn",
                Init::Normal(cfg.initializer_range),
            )?,
            hc_base: vb.get(&[n], "hc_base", Init::Zeros)?,
            hc_scale: vb.get(&[1], "hc_scale", Init::Ones)?,
            eps: cfg.hc_eps,
            norm_eps: cfg.rms_norm_eps,
        })
    }

    /// streams (B, T, N, C) -> (B, T, C).
    pub fn forward(&self, streams: &Tensor) -> Result<Tensor> {
        let (b, t, n, c) = streams.dims4()?;
        let flat = streams.reshape((b * t, n * c))?;
        let rms = RowRms { eps: self.norm_eps }.apply(&flat)?; // (B*T, 1)
        let mixes = flat
            .matmul(&self.hc_fn.t()?)?
            .broadcast_div(&rms)?
            .broadcast_mul(&self.hc_scale)?
            .broadcast_add(&self.hc_base)?;
        let pre = (candle_nn::ops::sigmoid(&mixes)? + self.eps)?; // (B*T, N)
        Ok(StreamCollapse::apply(&streams.reshape((b * t, n, c))?, &pre)?.reshape((b, t, c))?)
    }
}
