//! One transformer block: pre-norm attention and pre-norm FFN (dense SwiGLU or MoE),
//! each added to the residual stream, or, with hyper-connections (`hc_mult`), each
//! reading and writing the residual's streams through its own mixes
//! (`model::hyper_connection`).

use super::attention::Attention;
use super::cache::LayerCache;
use super::diagnostics::LayerDiagnostics;
use super::hyper_connection::HyperConnection;
use super::mla::Mla;
use super::mlp::Mlp;
use super::moe::{Moe, MoeStats};
use super::norm::RmsNorm;
use super::options::ForwardOptions;
use super::params::Vb;
use super::rope::Rope;
use super::step::{Lap, LayerTelemetry, Segment, StepOptions};
use super::v4_attention::V4Attention;
use crate::config::ModelConfig;
use crate::error::Result;
use candle_core::Tensor;

/// The attention half of a block (`self_attn` in checkpoints).
#[derive(Debug, Clone)]
pub enum SelfAttn {
    /// q/k/v projections, dense or DSA.
    Standard(Attention),
    /// Multi-head latent attention (`kv_lora_rank` set).
    Mla(Mla),
    /// DeepSeek-V4 attention (sliding, CSA, HCA layer types).
    V4(V4Attention),
}

/// The feed-forward half of a block (`mlp` in checkpoints).
#[derive(Debug, Clone)]
pub enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: RmsNorm,
    pub self_attn: SelfAttn,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Ffn,
    /// Hyper-connections (`hc_mult`): the attention half's and the FFN half's mixes.
    pub hc: Option<(HyperConnection, HyperConnection)>,
}

impl Block {
    pub fn new(vb: &Vb, cfg: &ModelConfig, layer: usize) -> Result<Self> {
        let c = cfg.hidden_size;
        // Residual-branch output projections get std / sqrt(2 L) (GPT-2).
        let out_std = cfg.initializer_range / (2.0 * cfg.num_hidden_layers as f64).sqrt();
        let mlp = if cfg.is_moe_layer(layer) {
            Ffn::Moe(Moe::new(&vb.pp("mlp"), cfg, layer, out_std)?)
        } else {
            Ffn::Dense(Mlp::new(
                &vb.pp("mlp"),
                c,
                cfg.intermediate_size,
                cfg.initializer_range,
                out_std,
            )?)
        };
        Ok(Self {
            input_layernorm: RmsNorm::new(&vb.pp("input_layernorm"), c, cfg.rms_norm_eps)?,
            self_attn: if cfg.attention_kind(layer).is_v4() {
                SelfAttn::V4(V4Attention::new(&vb.pp("self_attn"), cfg, layer, out_std)?)
            } else if cfg.kv_lora_rank.is_some() {
                SelfAttn::Mla(Mla::new(&vb.pp("self_attn"), cfg, layer, out_std)?)
            } else {
                SelfAttn::Standard(Attention::new(&vb.pp("self_attn"), cfg, layer, out_std)?)
            },
            post_attention_layernorm: RmsNorm::new(
                &vb.pp("post_attention_layernorm"),
                c,
                cfg.rms_norm_eps,
            )?,
            mlp,
            hc: match cfg.hc_mult {
                Some(n) => Some((
                    HyperConnection::new(&vb.pp("attn_hc"), cfg, n)?,
                    HyperConnection::new(&vb.pp("ffn_hc"), cfg, n)?,
                )),
                None => None,
            },
        })
    }

    /// x (B, T, C) -> (B, T, C), or with hyper-connections the streams (B, T, N, C) ->
    /// (B, T, N, C). MoE layers write their router statistics and losses, DSA layers
    /// their indexer signals, into `diag` (see `model::diagnostics`). `token_ids` (B*T)
    /// are the input ids (the `hash` router and `hash_moe` layers read them).
    pub fn forward(
        &self,
        x: &Tensor,
        token_ids: &[u32],
        rope: &Rope,
        opts: &ForwardOptions,
        diag: &mut LayerDiagnostics,
    ) -> Result<Tensor> {
        let Some((attn_hc, ffn_hc)) = &self.hc else {
            let a = self.attention(&self.input_layernorm.forward(x)?, rope, opts, diag)?;
            let x = (x + a)?;
            let f = self.ffn(
                &self.post_attention_layernorm.forward(&x)?,
                token_ids,
                opts,
                diag,
            )?;
            return Ok((x + f)?);
        };
        let mix = attn_hc.mix(x)?;
        let a = self.attention(
            &self.input_layernorm.forward(&mix.collapsed)?,
            rope,
            opts,
            diag,
        )?;
        let x = attn_hc.merge(x, &mix, &a)?;
        let mix = ffn_hc.mix(&x)?;
        let h = self.post_attention_layernorm.forward(&mix.collapsed)?;
        let f = self.ffn(&h, token_ids, opts, diag)?;
        ffn_hc.merge(&x, &mix, &f)
    }

    /// The attention half on normed input h (B, T, C) -> (B, T, C).
    fn attention(
        &self,
        h: &Tensor,
        rope: &Rope,
        opts: &ForwardOptions,
        diag: &mut LayerDiagnostics,
    ) -> Result<Tensor> {
        match &self.self_attn {
            SelfAttn::Standard(attn) => attn.forward(h, rope, opts, diag),
            SelfAttn::Mla(mla) => mla.forward(h, opts, diag),
            SelfAttn::V4(attn) => attn.forward(h, opts, diag),
        }
    }

    /// The FFN half on normed input h (B, T, C) -> (B, T, C).
    fn ffn(
        &self,
        h: &Tensor,
        token_ids: &[u32],
        opts: &ForwardOptions,
        diag: &mut LayerDiagnostics,
    ) -> Result<Tensor> {
        Ok(match &self.mlp {
            Ffn::Dense(mlp) => mlp.forward(h)?,
            Ffn::Moe(moe) => {
                let (y, stats) = moe.forward(h, token_ids, opts.moe_capacity)?;
                let MoeStats {
                    aux_loss,
                    z_loss,
                    seq_loss,
                    routing,
                } = stats;
                (diag.aux_loss, diag.z_loss, diag.seq_loss) = (aux_loss, z_loss, seq_loss);
                diag.routing = Some(routing);
                y
            }
        })
    }
}

impl Block {
    /// The engine's step over packed rows x (N, C), or with hyper-connections their
    /// streams (N, S, C) (see `model::step`): attention per segment over its cache, the
    /// FFN over all rows at once, no training telemetry.
    /// Adds the seconds of each half to `secs` when profiling. -> (N, C).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn step(
        &self,
        x: &Tensor,
        token_ids: &[u32],
        rope: &Rope,
        segs: &[Segment],
        caches: &mut [&mut LayerCache],
        opts: &StepOptions,
        secs: (&mut f64, &mut f64),
        tel: &mut LayerTelemetry,
    ) -> Result<Tensor> {
        let mut lap = Lap::start(opts.profile);
        let mut attention = |h: &Tensor| -> Result<Tensor> {
            match &self.self_attn {
                SelfAttn::Standard(attn) => attn.step(h, segs, caches, rope, opts, tel),
                SelfAttn::Mla(mla) => mla.step(h, segs, caches, opts, tel),
                SelfAttn::V4(attn) => attn.step(h, segs, caches),
            }
        };
        let Some((attn_hc, ffn_hc)) = &self.hc else {
            let a = attention(&self.input_layernorm.forward(x)?)?;
            let x = (x + a)?;
            *secs.0 += lap.lap();
            let f = self.ffn_step(
                &self.post_attention_layernorm.forward(&x)?,
                token_ids,
                opts,
                tel,
            )?;
            *secs.1 += lap.lap();
            return Ok((x + f)?);
        };
        // The streams x (N, S, C) as one batch row of N tokens.
        let (n, streams, c) = x.dims3()?;
        let xs = x.reshape((1, n, streams, c))?;
        let mix = attn_hc.mix(&xs)?;
        let a = attention(
            &self
                .input_layernorm
                .forward(&mix.collapsed.reshape((n, c))?)?,
        )?;
        let xs = attn_hc.merge(&xs, &mix, &a.reshape((1, n, c))?)?;
        *secs.0 += lap.lap();
        let mix = ffn_hc.mix(&xs)?;
        let h = self
            .post_attention_layernorm
            .forward(&mix.collapsed.reshape((n, c))?)?;
        let f = self.ffn_step(&h, token_ids, opts, tel)?;
        let xs = ffn_hc.merge(&xs, &mix, &f.reshape((1, n, c))?)?;
        *secs.1 += lap.lap();
        Ok(xs.reshape((n, streams, c))?)
    }

    /// The FFN half of a step on normed rows h (N, C) -> (N, C).
    fn ffn_step(
        &self,
        h: &Tensor,
        token_ids: &[u32],
        opts: &StepOptions,
        tel: &mut LayerTelemetry,
    ) -> Result<Tensor> {
        Ok(match &self.mlp {
            Ffn::Dense(mlp) => mlp.infer(h)?,
            Ffn::Moe(moe) => {
                let (y, routing) = moe.infer(h, token_ids)?;
                if opts.telemetry {
                    tel.routing = Some(routing);
                }
                y
            }
        })
    }
}
