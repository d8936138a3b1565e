//! The whole model: token embedding, blocks, final norm and LM head. The same
//! `forward` serves training over (B, T) and incremental decoding with a `KvCache`.

use super::block::Block;
use super::cache::{LayerCache, SeqCache};
use super::diagnostics::Diagnostics;
use super::hyper_connection::HyperHead;
use super::linear::{Linear, LinearWeight};
use super::norm::RmsNorm;
pub use super::options::ForwardOptions;
use super::params::{Init, Vb};
use super::rope::Rope;
use super::step::{Lap, LayerTelemetry, Segment, StepOptions, StepProfile};
use super::utilization::RoutingStats;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kernels::cross_entropy::{row_nll, CrossEntropy};
use crate::kernels::linear_cross_entropy::{chunk_rows, linear_cross_entropy};
use candle_core::{Device, Tensor};

#[derive(Debug, Clone)]
pub struct Transformer {
    /// (V, C) `model.embed_tokens.weight`
    pub embed_tokens: Linear,
    pub layers: Vec<Block>,
    /// Hyper-connections (`hc_mult`): the streams' final collapse (`model.hc_head`).
    pub hc_head: Option<HyperHead>,
    pub norm: RmsNorm,
    /// (V, C) `lm_head.weight`, or the embedding when tied.
    pub lm_head: Linear,
    rope: Rope,
    cfg: ModelConfig,
}

/// What [`Transformer::forward_hidden_with`] returns.
#[derive(Debug, Clone)]
pub struct HiddenOutput {
    /// (B*T, C): the hidden states after the final norm, before the LM head.
    pub hidden: Tensor,
    /// As in [`ForwardOutput`].
    pub diagnostics: Diagnostics,
}

/// Logits plus what the forward collected besides them.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// (B, T, V)
    pub logits: Tensor,
    /// Per layer: router statistics and losses, indexer losses, recall and selection
    /// (what the training mode needs and `ForwardOptions::collect` asked for).
    pub diagnostics: Diagnostics,
}

impl Transformer {
    /// `vb` is the root; parameters live under `model.` and `lm_head.` as in HF.
    pub fn new(vb: &Vb, cfg: &ModelConfig) -> Result<Self> {
        let (v, c) = (cfg.vocab_size, cfg.hidden_size);
        let m = vb.pp("model");
        let embed_tokens = Linear::from_weight(m.pp("embed_tokens").get_linear(
            &[v, c],
            "weight",
            Init::Normal(cfg.initializer_range),
        )?);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::new(&m.pp("layers").pp(i), cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(&m.pp("norm"), c, cfg.rms_norm_eps)?;
        let hc_head = match cfg.hc_mult {
            Some(n) => Some(HyperHead::new(&m.pp("hc_head"), cfg, n)?),
            None => None,
        };
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            Linear::from_weight(vb.pp("lm_head").get_linear(
                &[v, c],
                "weight",
                Init::Normal(cfg.initializer_range),
            )?)
        };
        let rope = Rope::new(
            cfg.head_dim(),
            cfg.max_position_embeddings,
            cfg.rope_theta,
            vb.dtype(),
            vb.device(),
        )?;
        Ok(Self {
            embed_tokens,
            layers,
            hc_head,
            norm,
            lm_head,
            rope,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// After a training step: the `noaux_bias` routers move their selection biases
    /// toward balance from the step's routing counts (one entry per layer, as in
    /// `ForwardOutput::routing`), with the bias speed multiplied by `scale`. Other
    /// routers ignore it.
    pub fn update_router_biases(&self, routing: &[Option<RoutingStats>], scale: f64) -> Result<()> {
        for (layer, stats) in self.layers.iter().zip(routing) {
            if let (super::block::Ffn::Moe(moe), Some(stats)) = (&layer.mlp, stats) {
                moe.gate.update_bias(&stats.demand, scale)?;
            }
        }
        Ok(())
    }

    /// The MoE routers' gate weights (`mlp.gate.weight`), layer by layer: the tensors
    /// whose gradients `router_gate_frozen_steps` withholds.
    pub fn router_gate_weights(&self) -> Result<Vec<Tensor>> {
        self.layers
            .iter()
            .filter_map(|layer| match &layer.mlp {
                super::block::Ffn::Moe(moe) => Some(moe.gate.gate.weight()),
                _ => None,
            })
            .collect()
    }

    /// The RoPE the attention layers share.
    pub(crate) fn rope(&self) -> &Rope {
        &self.rope
    }

    /// ids (B, T) u32, whole windows from position 0 -> logits (B, T, V): training,
    /// evaluation and parity. Incremental decoding goes through [`Self::step`].
    pub fn forward(&self, ids: &Tensor) -> Result<ForwardOutput> {
        self.forward_with(ids, &ForwardOptions::default())
    }

    /// `forward` with explicit attention options (indexer training mode, recall).
    pub fn forward_with(&self, ids: &Tensor, opts: &ForwardOptions) -> Result<ForwardOutput> {
        let (b, t) = ids.dims2()?;
        let HiddenOutput {
            hidden,
            diagnostics,
        } = self.forward_hidden_with(ids, opts)?;
        let logits = self
            .lm_head
            .forward(&hidden)?
            .reshape((b, t, self.cfg.vocab_size))?;
        Ok(ForwardOutput {
            logits,
            diagnostics,
        })
    }

    /// `forward_with` up to the LM head: the final-normed hidden states (B*T, C), for a
    /// loss that applies the head itself ([`Self::lm_loss`]).
    pub fn forward_hidden_with(&self, ids: &Tensor, opts: &ForwardOptions) -> Result<HiddenOutput> {
        let (b, t) = ids.dims2()?;
        let c = self.cfg.hidden_size;
        let flat_ids = ids.flatten_all()?; // (B*T)
        let flat: Vec<u32> = flat_ids.to_vec1()?;
        if let Some(bad) = flat.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside vocab_size {}",
                self.cfg.vocab_size
            )));
        }
        let mut x = self
            .embed_tokens
            .rows(&flat_ids, &flat)?
            .reshape((b, t, c))?; // (B, T, C)
        if let Some(n) = self.cfg.hc_mult {
            x = x.unsqueeze(2)?.broadcast_as((b, t, n, c))?.contiguous()?; // (B, T, N, C)
        }
        let mut diagnostics = Diagnostics::new(self.layers.len());
        for (layer, diag) in self.layers.iter().zip(&mut diagnostics.layers) {
            x = layer.forward(&x, &flat, &self.rope, opts, diag)?;
        }
        if let Some(head) = &self.hc_head {
            x = head.forward(&x)?; // (B, T, C)
        }
        let hidden = self.norm.forward(&x)?.reshape((b * t, c))?; // (B*T, C)
        Ok(HiddenOutput {
            hidden,
            diagnostics,
        })
    }

    /// Mean next-token NLL of `targets` (N) u32 under the LM head applied to `hidden`
    /// (N, C): the head and the cross-entropy fused (`kernels::linear_cross_entropy`:
    /// no (N, V) logits in the graph) when the head is a plain tensor, else the head's
    /// logits through the cross-entropy kernel.
    pub fn lm_loss(&self, hidden: &Tensor, targets: &Tensor) -> Result<Tensor> {
        Ok(match self.lm_head.packed() {
            LinearWeight::Dense(w) => linear_cross_entropy(hidden, w, targets)?,
            _ => CrossEntropy::apply(&self.lm_head.forward(hidden)?, targets)?,
        })
    }

    /// Next-token NLL of each row: `targets` (N) u32 under the LM head applied to
    /// `hidden` (N, C), in the row chunks of the fused head
    /// (`kernels::linear_cross_entropy::chunk_rows`), with no gradient computed or kept (evaluation; any head: plain, quantized or half).
    pub fn nll_rows(&self, hidden: &Tensor, targets: &Tensor) -> Result<Vec<f64>> {
        let (n, _) = hidden.dims2()?;
        let hidden = hidden.detach();
        let chunk = chunk_rows(self.cfg.vocab_size);
        let mut out = Vec::with_capacity(n);
        for start in (0..n).step_by(chunk) {
            let rows = chunk.min(n - start);
            let logits = self
                .lm_head
                .forward(&hidden.narrow(0, start, rows)?)?
                .detach();
            out.extend(row_nll(&logits, &targets.narrow(0, start, rows)?)?);
        }
        Ok(out)
    }

    /// Mean of [`Self::nll_rows`]: [`Self::lm_loss`] as a number, for evaluation.
    pub fn lm_nll(&self, hidden: &Tensor, targets: &Tensor) -> Result<f64> {
        let rows = self.nll_rows(hidden, targets)?;
        Ok(rows.iter().sum::<f64>() / rows.len().max(1) as f64)
    }
}

/// One sequence's part of a step: its new tokens and its cache (positions
/// `cache.len()..`).
pub struct StepInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
}

/// What a step returns.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// (inputs, V): each input's last token; with `all_logits`, (N, V) for every new
    /// token in input order.
    pub logits: Tensor,
    /// Per-layer seconds, when asked for.
    pub profile: Option<StepProfile>,
    /// Per layer: what its sparse parts did (with `StepOptions::telemetry`; empty
    /// otherwise).
    pub telemetry: Vec<LayerTelemetry>,
}

impl Transformer {
    /// The engine's batched step: the new tokens of every input, each sequence at its
    /// own position, in one forward (see `model::step`); every input's cache is
    /// written in place. Builds no autograd graph when the weights are frozen
    /// (`model_dir::load_for_inference`) and computes no training telemetry.
    pub fn step(&self, inputs: &mut [StepInput<'_>], opts: &StepOptions) -> Result<StepOutput> {
        let c = self.cfg.hidden_size;
        let n_layers = self.layers.len();
        let max_pos = self.cfg.max_position_embeddings;
        let mut segs = Vec::with_capacity(inputs.len());
        let mut ids: Vec<u32> = Vec::new();
        for (i, inp) in inputs.iter().enumerate() {
            if inp.tokens.is_empty() {
                return Err(Error::Invalid(format!("step input {i} has no tokens")));
            }
            if inp.cache.layers.len() != n_layers {
                return Err(Error::Invalid(format!(
                    "step input {i}: a cache of {} layers for a model of {n_layers}",
                    inp.cache.layers.len()
                )));
            }
            if let Some(bad) = inp
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.cfg.vocab_size)
            {
                return Err(Error::Invalid(format!(
                    "token id {bad} is outside vocab_size {}",
                    self.cfg.vocab_size
                )));
            }
            let seg = Segment {
                start: ids.len(),
                len: inp.tokens.len(),
                pos: inp.cache.len(),
            };
            if seg.visible() > max_pos {
                return Err(Error::Invalid(format!(
                    "position {} exceeds max_position_embeddings {max_pos}",
                    seg.visible()
                )));
            }
            ids.extend_from_slice(inp.tokens);
            segs.push(seg);
        }
        if segs.is_empty() {
            return Err(Error::Invalid("a step needs at least one input".into()));
        }
        let mut prof = opts.profile.then(|| StepProfile::new(n_layers));
        let mut lap = Lap::start(opts.profile);
        let n = ids.len();
        let dev = &Device::Cpu;
        let mut x = self
            .embed_tokens
            .rows(&Tensor::from_slice(&ids, n, dev)?, &ids)?; // (N, C)
        if let Some(streams) = self.cfg.hc_mult {
            x = x
                .unsqueeze(1)?
                .broadcast_as((n, streams, c))?
                .contiguous()?; // (N, S, C)
        }
        let mut head = lap.lap();
        let mut telemetry = vec![LayerTelemetry::default(); n_layers];
        for (l, layer) in self.layers.iter().enumerate() {
            let mut caches: Vec<&mut LayerCache> = inputs
                .iter_mut()
                .map(|inp| &mut inp.cache.layers[l])
                .collect();
            let (mut ta, mut tf) = (0.0, 0.0);
            x = layer.step(
                &x,
                &ids,
                &self.rope,
                &segs,
                &mut caches,
                opts,
                (&mut ta, &mut tf),
                &mut telemetry[l],
            )?;
            if let Some(p) = &mut prof {
                p.attention[l] += ta;
                p.ffn[l] += tf;
            }
        }
        let _ = lap.lap();
        let x = if opts.all_logits {
            x
        } else {
            let last: Vec<u32> = segs.iter().map(|s| (s.start + s.len - 1) as u32).collect();
            x.index_select(&Tensor::from_vec(last, segs.len(), dev)?, 0)?
        };
        let x = match &self.hc_head {
            Some(head) => {
                let (rows, streams, _) = x.dims3()?;
                head.forward(&x.reshape((1, rows, streams, c))?)?
                    .reshape((rows, c))?
            }
            None => x,
        };
        let x = self.norm.forward(&x)?;
        let logits = self.lm_head.infer(&x)?; // (rows, V)
        debug_assert_eq!(logits.dim(1)?, self.cfg.vocab_size);
        head += lap.lap();
        if let Some(p) = &mut prof {
            p.head = head;
        }
        if !opts.telemetry {
            telemetry.clear();
        }
        Ok(StepOutput {
            logits,
            profile: prof,
            telemetry,
        })
    }
}
