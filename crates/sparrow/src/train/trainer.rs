//! The training loop: random contiguous windows, forward, LM loss plus router aux and
//! z losses plus indexer KL (DSA layers, in the step's indexer mode: `dense_warmup` for the
//! first `indexer_dense_warmup_steps`, then the config's `indexer_train_mode`),
//! backward, global-norm clipping, AdamW with warmup + cosine, periodic validation,
//! metrics, a progress bar, and checkpoints every N steps and on interruption. After
//! each step the `noaux_bias` routers update their selection biases. Router telemetry:
//! every step logs the worst layer's MaxVio and the drop rate of that step's batch; every
//! validation logs per-layer utilization over the validation tokens (`routing`).

use super::checkpoint::{self, DataPosition, RngState, TrainState};
use super::metrics::MetricsLog;
use super::optimizer::AdamW;
pub use super::options::TrainOptions;
use super::schedule::lr_at;
use crate::config::ModelConfig;
use crate::data::corpus;
use crate::data::retrieval::RetrievalMix;
use crate::data::shards::{eval_windows, sample_batch, TokenData};
use crate::error::{Error, Result};
use crate::model::options::{Collect, ForwardOptions};
use crate::model::params::ParamSet;
use crate::model::utilization::{RoutingStats, Utilization};
use crate::model::Model;
use crate::model_dir::AdapterSpec;
use crate::model_source::ModelSource;
use crate::tokenizer::Tokenizer;
use candle_core::{Device, Tensor};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// A new run.
pub struct TrainRequest {
    pub config: ModelConfig,
    pub corpus: PathBuf,
    pub out: PathBuf,
    /// Use this tokenizer instead of training one on the corpus.
    pub tokenizer: Option<PathBuf>,
    pub options: TrainOptions,
    pub show_progress: bool,
    /// Set (e.g. by Ctrl-C) to checkpoint and stop after the current step.
    pub stop: Arc<AtomicBool>,
    /// Checkpoint and stop once this step is done (the schedule still spans `steps`).
    pub pause_at: Option<u64>,
    /// Start from the weights (and tokenizer) of this model directory instead of a
    /// random initialisation: a new training stage (fresh optimizer and schedule, e.g.
    /// a longer `seq_len`). `config` must describe the same tensors.
    pub init_from: Option<PathBuf>,
}

/// Continue a run.
pub struct ResumeRequest {
    pub dir: PathBuf,
    /// New total of steps (default: the run's own).
    pub steps: Option<u64>,
    /// Override the stored corpus path (same text expected).
    pub corpus: Option<PathBuf>,
    pub show_progress: bool,
    pub stop: Arc<AtomicBool>,
    pub pause_at: Option<u64>,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub step: u64,
    pub interrupted: bool,
    pub last_loss: f64,
    pub last_val_loss: Option<f64>,
    pub tokens_per_s: f64,
    pub parameters: usize,
}

/// Start a new run in `req.out` (which must not already hold one).
pub fn train(req: TrainRequest) -> Result<TrainSummary> {
    req.options.validate()?;
    req.config.validate()?;
    check_seq_len(&req.options, &req.config)?;
    let already = || {
        Err(Error::Invalid(format!(
            "{} already holds a training run; resume it to continue",
            req.out.display()
        )))
    };
    if checkpoint::holds_run(&req.out) {
        return already();
    }
    std::fs::create_dir_all(&req.out).map_err(|e| Error::io(&req.out, e))?;
    let _lock = super::lock::RunLock::acquire(&req.out)?;
    // A run killed before its first checkpoint left no state: start over, clean.
    checkpoint::recover(&req.out)?;
    if checkpoint::holds_run(&req.out) {
        return already();
    }
    let init = match &req.init_from {
        Some(spec) => Some(crate::model_source::resolve(spec, req.show_progress)?),
        None => None,
    };
    let tokenizer = match (&init, &req.tokenizer) {
        (Some(_), Some(_)) => {
            return Err(Error::Invalid(
                "`init_from` brings its model's tokenizer; give no `tokenizer` with it".into(),
            ))
        }
        (Some(source), None) => crate::model_source::load_tokenizer(source)?,
        (None, Some(p)) => Tokenizer::from_file(p)?,
        (None, None) => {
            let files = corpus::list_text_files(&req.corpus)?;
            if req.show_progress {
                eprintln!(
                    "training a {}-entry BPE tokenizer on {} files",
                    req.config.vocab_size,
                    files.len()
                );
            }
            Tokenizer::train(&files, req.config.vocab_size, req.show_progress)?
        }
    };
    check_tokenizer(&tokenizer, &req.config)?;
    tokenizer.save(&req.out.join("tokenizer.json"))?;
    let device = Device::Cpu;
    let trainable = req.options.trainable;
    let (model, adapter) = match &init {
        Some(source) => {
            let cfg = Some(req.config.clone());
            let model = crate::model_source::load_for_training(source, cfg, trainable, &device)?.0;
            let adapter = match source {
                ModelSource::Adapter { dir, spec, .. } => Some(spec.relocated(dir)),
                _ => None,
            };
            (model, adapter)
        }
        None => (
            Model::new_random_training(&req.config, req.options.seed, trainable, &device)?,
            None,
        ),
    };
    check_trainable(&model, trainable, adapter.as_ref())?;
    // The run's checkpoints hold what it trains (e.g. the indexers and, from this run
    // on, the norms).
    let adapter = adapter.map(|spec| AdapterSpec {
        params: trainable,
        ..spec
    });
    let opt = AdamW::new(model.store.trainable_vars(), req.options.adamw)?;
    let state = TrainState {
        step: 0,
        rng: RngState {
            algorithm: "chacha8".into(),
            seed: req.options.seed,
            stream: 0,
        },
        data: DataPosition {
            step: 0,
            tokens_seen: 0,
            train_tokens: 0,
            val_tokens: 0,
        },
        options: req.options.clone(),
        corpus: req.corpus.clone(),
        last_val_loss: None,
        router_load_window: Vec::new(),
        init_from: req.init_from.clone(),
    };
    let ctl = LoopControl {
        show_progress: req.show_progress,
        stop: req.stop,
        pause_at: req.pause_at,
    };
    run_loop(model, opt, tokenizer, state, &req.out, ctl, adapter)
}

/// A run that trains part of a model must have that part, and an adapter's run can
/// only train what its checkpoints write (the adapter's parameters).
fn check_trainable(
    model: &Model,
    trainable: ParamSet,
    adapter: Option<&AdapterSpec>,
) -> Result<()> {
    if trainable != ParamSet::All && !model.cfg.has_dsa() {
        return Err(Error::Invalid(format!(
            "train option `trainable` = {trainable:?}: the model has no `dsa` layer (attach indexers first: `sparrow dsa attach`)"
        )));
    }
    if let Some(spec) = adapter {
        if trainable == ParamSet::All {
            return Err(Error::Invalid(format!(
                "the model is an adapter of {}: train option `trainable` = All would write the whole model as an adapter; convert it to a model directory first (`sparrow convert`) or train a named set (indexer, indexer_norms, indexer_attention)",
                spec.base
            )));
        }
        if !trainable.covers(spec.params) {
            return Err(Error::Invalid(format!(
                "the model is an adapter holding the {:?} parameters of its base {}: train option `trainable` must include them, not {trainable:?}",
                spec.params, spec.base
            )));
        }
    }
    Ok(())
}

/// Bring the run in `dir` to one whole checkpoint after a crash (under its lock: fails
/// while another process trains it), so its files can be read before resuming it.
pub fn recover_run(dir: &Path) -> Result<()> {
    let _lock = super::lock::RunLock::acquire(dir)?;
    checkpoint::recover(dir)
}

/// Continue the run in `req.dir` exactly where its last checkpoint stopped.
pub fn resume(req: ResumeRequest) -> Result<TrainSummary> {
    let dir = req.dir.as_path();
    // Lock only a real run directory (never create `.lock` elsewhere); `load` names
    // what is missing.
    let _lock = if checkpoint::holds_run(dir) {
        let lock = super::lock::RunLock::acquire(dir)?;
        checkpoint::recover(dir)?;
        Some(lock)
    } else {
        None
    };
    let loaded = checkpoint::load(dir, &Device::Cpu)?;
    let mut state = loaded.state;
    if let Some(s) = req.steps {
        state.options.steps = s;
    }
    if let Some(c) = req.corpus {
        state.corpus = c;
    }
    state.options.validate()?;
    check_seq_len(&state.options, &loaded.model.cfg)?;
    if !state.corpus.is_dir() {
        return Err(Error::Corpus(format!(
            "the run's corpus {} is not a directory (give the corpus directory to point at it)",
            state.corpus.display()
        )));
    }
    check_tokenizer(&loaded.tokenizer, &loaded.model.cfg)?;
    check_trainable(
        &loaded.model,
        state.options.trainable,
        loaded.adapter.as_ref(),
    )?;
    let mut opt = AdamW::new(loaded.model.store.trainable_vars(), state.options.adamw)?;
    opt.load_state(
        loaded.optimizer_tensors,
        loaded.adamw_t,
        &dir.join(checkpoint::STATE_WEIGHTS),
    )?;
    let ctl = LoopControl {
        show_progress: req.show_progress,
        stop: req.stop,
        pause_at: req.pause_at,
    };
    run_loop(
        loaded.model,
        opt,
        loaded.tokenizer,
        state,
        dir,
        ctl,
        loaded.adapter,
    )
}

/// How the loop is driven from outside.
struct LoopControl {
    show_progress: bool,
    stop: Arc<AtomicBool>,
    pause_at: Option<u64>,
}

fn check_seq_len(o: &TrainOptions, cfg: &ModelConfig) -> Result<()> {
    if o.seq_len > cfg.max_position_embeddings {
        return Err(Error::Invalid(format!(
            "train option `seq_len` {} exceeds the model's max_position_embeddings {}",
            o.seq_len, cfg.max_position_embeddings
        )));
    }
    Ok(())
}

fn check_tokenizer(tok: &Tokenizer, cfg: &ModelConfig) -> Result<()> {
    if tok.vocab_size() > cfg.vocab_size {
        return Err(Error::config(
            "vocab_size",
            format!(
                "{} is smaller than the tokenizer's vocabulary {}",
                cfg.vocab_size,
                tok.vocab_size()
            ),
        ));
    }
    if tok.bos_id != cfg.bos_token_id || tok.eos_id != cfg.eos_token_id {
        return Err(Error::config(
            "bos_token_id",
            format!(
                "config bos/eos ids {}/{} differ from the tokenizer's {}/{}",
                cfg.bos_token_id, cfg.eos_token_id, tok.bos_id, tok.eos_id
            ),
        ));
    }
    Ok(())
}

fn run_loop(
    model: Model,
    mut opt: AdamW,
    tokenizer: Tokenizer,
    mut state: TrainState,
    out: &Path,
    ctl: LoopControl,
    adapter: Option<AdapterSpec>,
) -> Result<TrainSummary> {
    let adapter = adapter.as_ref();
    let show_progress = ctl.show_progress;
    let o = state.options.clone();
    let data = TokenData::load_or_build(
        &state.corpus,
        &tokenizer,
        o.val_fraction,
        &out.join("data"),
        show_progress,
    )?;
    if state.data.train_tokens != 0 && state.data.train_tokens != data.train.len() {
        return Err(Error::Corpus(format!(
            "the corpus now tokenizes to {} training tokens, the run was started on {}: resuming would not continue the same data stream",
            data.train.len(),
            state.data.train_tokens
        )));
    }
    state.data.train_tokens = data.train.len();
    state.data.val_tokens = data.val.len();
    let val_set = eval_windows(&data.val, o.val_batches * o.batch_size, o.seq_len)?;
    let mix = if o.retrieval_mix > 0.0 {
        Some(RetrievalMix::new(&tokenizer, o.retrieval_passkey_share)?)
    } else {
        None
    };
    let mut metrics = MetricsLog::open(&out.join("metrics.jsonl"), state.step)?;
    let dev = model.store.device().clone();
    let aux_coef = model.cfg.balance_loss_coef();
    let z_coef = model.cfg.router_z_loss_coef;
    let seq_coef = model.cfg.router_seq_aux_loss_coef;
    let gate_frozen_steps = model.cfg.router_gate_frozen_steps;
    let router_gates = model.net.router_gate_weights()?;
    let kl_coef = model.cfg.indexer_kl_coef;
    let parameters = model.store.num_parameters();

    let bar = crate::progress::bar(o.steps, "training", show_progress);
    bar.set_position(state.step);
    let started = Instant::now();
    let mut tokens_done = 0u64;
    let mut last_loss = f64::NAN;
    let mut interrupted = false;
    let mut val_max_vio: Option<f64> = None;
    while state.step < o.steps {
        let step_start = Instant::now();
        let lr = lr_at(state.step, o.steps, o.warmup_steps, o.lr, o.min_lr_ratio);
        let (mut inp, mut tgt) =
            sample_batch(&data.train, o.batch_size, o.seq_len, o.seed, state.step)?;
        if let Some(mix) = &mix {
            mix.mix_into_batch(
                &mut inp,
                &mut tgt,
                o.seq_len,
                o.retrieval_mix,
                o.seed,
                state.step,
            )?;
        }
        let inp = Tensor::from_vec(inp, (o.batch_size, o.seq_len), &dev)?;
        let tgt = Tensor::from_vec(tgt, o.batch_size * o.seq_len, &dev)?;
        let indexer_mode = model
            .cfg
            .has_indexer()
            .then(|| model.cfg.indexer_mode_at(state.step));
        let opts = ForwardOptions {
            indexer_mode,
            moe_capacity: true,
            dense: false,
            collect: Collect {
                indexer_kl: kl_coef > 0.0,
                ..Collect::default()
            },
            kl_query_sample: (o.indexer_kl_queries > 0).then(|| {
                let seed = o.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ state.step;
                (o.indexer_kl_queries, seed)
            }),
        };
        let fwd = model.net.forward_hidden_with(&inp, &opts)?;
        let (aux_loss, z_loss) = (fwd.diagnostics.aux_loss()?, fwd.diagnostics.z_loss()?);
        let seq_loss = fwd.diagnostics.seq_loss()?;
        let indexer_kl = fwd.diagnostics.indexer_kl()?;
        let routing = fwd.diagnostics.routing();
        // Only the indexers train, by KL alone: the LM head would compute a loss
        // nothing trainable depends on.
        let lm_needed =
            o.trainable.trains_base() || indexer_mode == Some(crate::config::IndexerTrainMode::Ste);
        let lm_loss = match (&indexer_kl, lm_needed) {
            (Some(kl), false) => kl.clone(),
            _ => model.net.lm_loss(&fwd.hidden, &tgt)?,
        };
        let balance_ramp = match model.cfg.router_balance_loss_warmup_steps {
            0 => 1.0,
            n => (state.step as f64 / n as f64).min(1.0),
        };
        let mut loss = match &aux_loss {
            Some(aux) if aux_coef > 0.0 => (&lm_loss + (aux * (aux_coef * balance_ramp))?)?,
            _ => lm_loss.clone(),
        };
        if let Some(z) = &z_loss {
            loss = (loss + (z * z_coef)?)?;
        }
        if let Some(seq) = &seq_loss {
            loss = (loss + (seq * seq_coef)?)?;
        }
        if let (Some(kl), true) = (&indexer_kl, lm_needed) {
            if kl_coef > 0.0 {
                loss = (loss + (kl * kl_coef)?)?;
            }
        }
        let mut grads = loss.backward()?;
        if state.step < gate_frozen_steps {
            // The gates keep their initial weights (and moments) during the warm-up.
            for gate in &router_gates {
                grads.remove(gate);
            }
        }
        let grad_norm = opt.grad_norm(&grads)?;
        let scale = if o.grad_clip > 0.0 && grad_norm > o.grad_clip {
            o.grad_clip / grad_norm
        } else {
            1.0
        };
        opt.step(&grads, lr, scale)?;
        update_biases(&model, &routing, lr / o.lr, &mut state)?;
        state.step += 1;
        let step_tokens = (o.batch_size * o.seq_len) as u64;
        state.data.step = state.step;
        state.data.tokens_seen += step_tokens;
        state.rng.stream = state.step;
        tokens_done += step_tokens;

        last_loss = lm_loss.to_scalar::<f32>()? as f64;
        if !last_loss.is_finite() {
            return Err(Error::Invalid(format!(
                "loss became {last_loss} at step {}; lower the learning rate `lr`",
                state.step
            )));
        }
        let tokens_per_s = step_tokens as f64 / step_start.elapsed().as_secs_f64().max(1e-9);
        let mut rec = json!({
            "step": state.step,
            "loss": last_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
        });
        if let Some(aux) = &aux_loss {
            rec["aux_loss"] = json!(aux.to_scalar::<f32>()? as f64);
        }
        if let Some(z) = &z_loss {
            rec["z_loss"] = json!(z.to_scalar::<f32>()? as f64);
        }
        if let Some(seq) = &seq_loss {
            rec["seq_aux_loss"] = json!(seq.to_scalar::<f32>()? as f64);
        }
        let step_util = layer_utilization(&routing);
        if let Some(worst) = worst_max_vio(&step_util) {
            rec["max_vio"] = json!(worst);
            rec["drop_rate"] = json!(mean_drop_rate(&step_util));
        }
        if let Some(kl) = &indexer_kl {
            rec["indexer_kl"] = json!(kl.to_scalar::<f32>()? as f64);
        }
        if let Some(mode) = indexer_mode {
            rec["indexer_mode"] = json!(mode);
        }
        let last = state.step == o.steps;
        let stop_now = ctl.stop.load(Ordering::SeqCst)
            || ctl.pause_at == Some(state.step)
            || (o.time_limit_secs > 0 && started.elapsed().as_secs() >= o.time_limit_secs);
        if (o.val_every > 0 && state.step.is_multiple_of(o.val_every)) || last {
            let (vl, routing) = validate(&model, &val_set, o.batch_size, o.seq_len)?;
            rec["val_loss"] = json!(vl);
            let util = layer_utilization(&routing);
            if let Some(worst) = worst_max_vio(&util) {
                rec["val_max_vio"] = json!(worst);
                rec["routing"] = routing_json(&util);
                val_max_vio = Some(worst);
            }
            state.last_val_loss = Some(vl);
        } else if stop_now {
            // Report the current validation loss when stopping early, but keep it out of
            // metrics.jsonl, which must read the same as an uninterrupted run.
            state.last_val_loss = Some(validate(&model, &val_set, o.batch_size, o.seq_len)?.0);
        }
        metrics.log(&rec)?;
        bar.set_position(state.step);
        bar.set_message(format!(
            "loss {last_loss:.3}{}{} | {:.0} tok/s",
            state
                .last_val_loss
                .map(|v| format!(" val {v:.3}"))
                .unwrap_or_default(),
            worst_max_vio(&step_util)
                .map(|v| format!(
                    " | MaxVio {v:.2}{}",
                    val_max_vio
                        .map(|w| format!(" (val {w:.2})"))
                        .unwrap_or_default()
                ))
                .unwrap_or_default(),
            tokens_done as f64 / started.elapsed().as_secs_f64().max(1e-9)
        ));
        if last
            || stop_now
            || (o.checkpoint_every > 0 && state.step.is_multiple_of(o.checkpoint_every))
        {
            checkpoint::save(out, &model, &opt, &tokenizer, &state, adapter)?;
        }
        if stop_now && !last {
            interrupted = true;
            break;
        }
    }
    bar.finish_and_clear();
    // A run asked to continue past its end still leaves a complete checkpoint.
    if !out.join(checkpoint::STATE_JSON).exists() {
        checkpoint::save(out, &model, &opt, &tokenizer, &state, adapter)?;
    }
    Ok(TrainSummary {
        step: state.step,
        interrupted,
        last_loss,
        last_val_loss: state.last_val_loss,
        tokens_per_s: tokens_done as f64 / started.elapsed().as_secs_f64().max(1e-9),
        parameters,
    })
}

/// `noaux_bias`: add this step's routed slots to the window in `state`; every
/// `router_bias_update_every` steps (counted from step 0) move the biases from the
/// window's sums and clear it. The window lives in `state`, so a resumed run continues it.
/// With `router_bias_update_follows_lr` the bias speed is scaled by `lr_factor` (this
/// step's learning rate over the peak).
fn update_biases(
    model: &Model,
    routing: &[Option<RoutingStats>],
    lr_factor: f64,
    state: &mut TrainState,
) -> Result<()> {
    if model.cfg.router_kind != crate::config::RouterKind::NoauxBias {
        return Ok(());
    }
    let every = model.cfg.router_bias_update_every.max(1) as u64;
    let window = &mut state.router_load_window;
    if window.len() != routing.len() {
        *window = vec![Vec::new(); routing.len()];
    }
    for (acc, r) in window.iter_mut().zip(routing) {
        if let Some(r) = r {
            if acc.len() != r.demand.len() {
                *acc = vec![0; r.demand.len()];
            }
            for (a, &d) in acc.iter_mut().zip(&r.demand) {
                *a += d;
            }
        }
    }
    if !(state.step + 1).is_multiple_of(every) {
        return Ok(());
    }
    let sums: Vec<Option<RoutingStats>> = window
        .iter()
        .map(|acc| {
            (!acc.is_empty()).then(|| RoutingStats {
                tokens: 0,
                demand: acc.clone(),
                load: acc.clone(),
            })
        })
        .collect();
    let scale = if model.cfg.router_bias_update_follows_lr {
        lr_factor
    } else {
        1.0
    };
    model.net.update_router_biases(&sums, scale)?;
    window.clear();
    Ok(())
}

/// Per MoE layer (index, utilization) of one forward's routing counts.
pub fn layer_utilization(routing: &[Option<RoutingStats>]) -> Vec<(usize, Utilization)> {
    routing
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().map(|r| (i, r.utilization())))
        .collect()
}

/// The worst (largest) MaxVio over layers, if any layer is MoE.
pub fn worst_max_vio(util: &[(usize, Utilization)]) -> Option<f64> {
    util.iter().map(|(_, u)| u.max_vio).reduce(f64::max)
}

fn mean_drop_rate(util: &[(usize, Utilization)]) -> f64 {
    util.iter().map(|(_, u)| u.drop_rate).sum::<f64>() / util.len().max(1) as f64
}

/// `[{layer, max_vio, cv, entropy, drop_rate, dead, demand_max_vio, load}, ...]`.
pub fn routing_json(util: &[(usize, Utilization)]) -> serde_json::Value {
    serde_json::Value::Array(
        util.iter()
            .map(|(layer, u)| {
                let mut v = json!(u);
                v["layer"] = json!(layer);
                v
            })
            .collect(),
    )
}

/// Mean LM loss over the fixed validation windows (router capacity limits applied, as in
/// training), and each layer's routing counts over those windows.
pub fn validate(
    model: &Model,
    windows: &[(Vec<u32>, Vec<u32>)],
    batch: usize,
    seq_len: usize,
) -> Result<(f64, Vec<Option<RoutingStats>>)> {
    let dev = model.store.device().clone();
    let mut total = 0.0;
    let mut n = 0usize;
    let mut routing: Vec<Option<RoutingStats>> = vec![None; model.cfg.num_hidden_layers];
    let opts = ForwardOptions {
        moe_capacity: true,
        ..Default::default()
    };
    for chunk in windows.chunks(batch) {
        let inp: Vec<u32> = chunk.iter().flat_map(|(i, _)| i.iter().copied()).collect();
        let tgt: Vec<u32> = chunk.iter().flat_map(|(_, t)| t.iter().copied()).collect();
        let b = chunk.len();
        let inp = Tensor::from_vec(inp, (b, seq_len), &dev)?;
        let tgt = Tensor::from_vec(tgt, b * seq_len, &dev)?;
        let out = model.net.forward_hidden_with(&inp, &opts)?;
        RoutingStats::merge_layers(&mut routing, &out.diagnostics.routing());
        total += model.net.lm_nll(&out.hidden, &tgt)? * b as f64;
        n += b;
    }
    Ok((total / n.max(1) as f64, routing))
}
