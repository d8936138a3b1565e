//! Checkpoints: a training run directory is a model directory (`config.json`,
//! `model.safetensors`, `tokenizer.json`, `generation_config.json`) plus
//! `train_state.safetensors` (AdamW moments) and `train_state.json` (step, RNG, data
//! position, options). A run that trains an adapter (`model_dir::AdapterSpec`: e.g.
//! indexers on a frozen base) is an adapter directory instead: `adapter.json` and
//! `adapter.safetensors` (the trained parameters only) in place of
//! `model.safetensors`. Both weight files carry the step in their metadata, so a
//! resume checks that all three belong to the same step.
//!
//! A checkpoint survives a kill at any moment, a full disk included: its files are
//! first written (each fsynced) into the staging directory `.checkpoint.tmp`, which is
//! renamed `.checkpoint.ready` once complete; then each file is renamed into the run
//! directory (`train_state.json` last) and the empty staging directory is removed.
//! [`recover`] (run under the run's lock before anything reads it) finishes a ready
//! checkpoint a kill interrupted, and drops an incomplete one: the run directory then
//! holds either the new checkpoint or the previous one, whole.

use super::optimizer::AdamW;
use super::options::TrainOptions;
use crate::error::{Error, Result};
use crate::model::{Model, STEP_KEY};
use crate::model_dir::AdapterSpec;
use crate::model_source::ModelSource;
use crate::tokenizer::Tokenizer;
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where the batch RNG stands: ChaCha8 seeded with `seed`, stream = step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RngState {
    pub algorithm: String,
    pub seed: u64,
    pub stream: u64,
}

/// The data position: steps done and tokens consumed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataPosition {
    pub step: u64,
    pub tokens_seen: u64,
    pub train_tokens: usize,
    pub val_tokens: usize,
}

/// `train_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Completed optimizer steps.
    pub step: u64,
    pub rng: RngState,
    pub data: DataPosition,
    pub options: TrainOptions,
    /// The corpus directory the run trains on.
    pub corpus: PathBuf,
    /// Last validation loss, if any.
    pub last_val_loss: Option<f64>,
    /// `noaux_bias` with `router_bias_update_every` > 1: per layer, the routed slots per
    /// expert summed since the last bias update (empty for other layers and routers).
    #[serde(default)]
    pub router_load_window: Vec<Vec<u64>>,
    /// The model directory this run's weights started from (a later training stage).
    #[serde(default)]
    pub init_from: Option<PathBuf>,
}

pub const STATE_JSON: &str = "train_state.json";
pub const STATE_WEIGHTS: &str = "train_state.safetensors";
/// A checkpoint being written (incomplete until renamed [`READY`]).
pub const STAGING: &str = ".checkpoint.tmp";
/// A complete checkpoint whose files are being moved into the run directory.
pub const READY: &str = ".checkpoint.ready";

/// Write a full checkpoint of `model` and `opt` at `state.step` into `dir` (as an
/// adapter of `adapter`'s base when given). On an error (a full disk, say) the staging
/// directory is removed and the previous checkpoint stands.
pub fn save(
    dir: &Path,
    model: &Model,
    opt: &AdamW,
    tokenizer: &Tokenizer,
    state: &TrainState,
    adapter: Option<&AdapterSpec>,
) -> Result<()> {
    let staging = dir.join(STAGING);
    remove_dir(&staging)?;
    let written = stage(&staging, model, opt, tokenizer, state, adapter);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    let ready = dir.join(READY);
    std::fs::rename(&staging, &ready).map_err(|e| Error::io(&ready, e))?;
    crate::fsio::sync_dir(dir)?;
    commit(dir, &ready)
}

/// Every file of the checkpoint into `staging`, each fsynced, then the directory.
fn stage(
    staging: &Path,
    model: &Model,
    opt: &AdamW,
    tokenizer: &Tokenizer,
    state: &TrainState,
    adapter: Option<&AdapterSpec>,
) -> Result<()> {
    let opts = crate::model_dir::SaveOptions {
        step: Some(state.step),
        tokenizer: Some(tokenizer),
        ..Default::default()
    };
    match adapter {
        Some(spec) => crate::model_dir::save_adapter(model, staging, spec, &opts).map(|_| ())?,
        None => crate::model_dir::save(model, staging, &opts).map(|_| ())?,
    }
    let meta = HashMap::from([
        (STEP_KEY.to_string(), state.step.to_string()),
        ("adamw_t".to_string(), opt.t.to_string()),
    ]);
    crate::weights::save(&staging.join(STATE_WEIGHTS), &opt.state_tensors()?, meta)?;
    crate::fsio::write_json_atomic(&staging.join(STATE_JSON), state)?;
    crate::fsio::sync_dir(staging)
}

/// Move a ready checkpoint's files into `dir`, `train_state.json` last, then remove
/// the (empty) ready directory. Files a kill already moved are simply not there.
fn commit(dir: &Path, ready: &Path) -> Result<()> {
    let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(ready)
        .map_err(|e| Error::io(ready, e))?
        .map(|e| e.map(|e| e.file_name()).map_err(|e| Error::io(ready, e)))
        .collect::<Result<_>>()?;
    // The state file commits the checkpoint: it goes last.
    names.sort_by_key(|n| (n == STATE_JSON, n.clone()));
    for name in names {
        let (from, to) = (ready.join(&name), dir.join(&name));
        std::fs::rename(&from, &to).map_err(|e| Error::io(&to, e))?;
    }
    crate::fsio::sync_dir(dir)?;
    std::fs::remove_dir(ready).map_err(|e| Error::io(ready, e))?;
    crate::fsio::sync_dir(dir)
}

/// Bring run directory `dir` to one whole checkpoint after a crash: finish moving a
/// ready checkpoint into place, drop an incomplete one and any temporary file an
/// interrupted atomic write left. Call it holding the run's lock.
pub fn recover(dir: &Path) -> Result<()> {
    let ready = dir.join(READY);
    if ready.is_dir() {
        commit(dir, &ready)?;
    }
    remove_dir(&dir.join(STAGING))?;
    crate::fsio::remove_stale_temp_files(dir)
}

/// Remove `path` and everything in it, if it exists.
fn remove_dir(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}

/// Whether `dir` holds a training run (a checkpoint, or a complete one a crash left
/// waiting to be moved into place).
pub fn holds_run(dir: &Path) -> bool {
    dir.join(STATE_JSON).exists() || dir.join(READY).is_dir()
}

/// Everything a resume needs.
pub struct Loaded {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub state: TrainState,
    pub optimizer_tensors: HashMap<String, candle_core::Tensor>,
    pub adamw_t: u64,
    /// The run trains an adapter of this base (its checkpoints are adapters).
    pub adapter: Option<AdapterSpec>,
}

/// Read and cross-check a checkpoint from `dir`.
pub fn load(dir: &Path, device: &Device) -> Result<Loaded> {
    let state_path = dir.join(STATE_JSON);
    if !state_path.exists() {
        return Err(Error::checkpoint(
            dir,
            format!("no {STATE_JSON}: not a training run directory"),
        ));
    }
    let state: TrainState = crate::fsio::read_json(&state_path)?;
    let source = crate::model_source::resolve(dir, false)?;
    let (model, model_step) =
        crate::model_source::load_for_training(&source, None, state.options.trainable, device)?;
    let (weights_path, adapter) = match source {
        ModelSource::Adapter { spec, .. } => {
            (dir.join(crate::model_dir::ADAPTER_WEIGHTS), Some(spec))
        }
        _ => (dir.join("model.safetensors"), None),
    };
    if model_step != Some(state.step) {
        return Err(Error::checkpoint(
            &weights_path,
            format!(
                "weights are from step {model_step:?} but {STATE_JSON} says step {}",
                state.step
            ),
        ));
    }
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let opt_path = dir.join(STATE_WEIGHTS);
    let (optimizer_tensors, meta) = crate::weights::load(&opt_path, device)?;
    let step_of = |key: &str| -> Result<u64> {
        meta.get(key)
            .ok_or_else(|| Error::checkpoint(&opt_path, format!("metadata `{key}` missing")))?
            .parse()
            .map_err(|_| {
                Error::checkpoint(&opt_path, format!("metadata `{key}` is not an integer"))
            })
    };
    let opt_step = step_of(STEP_KEY)?;
    if opt_step != state.step {
        return Err(Error::checkpoint(
            &opt_path,
            format!(
                "optimizer state is from step {opt_step} but {STATE_JSON} says step {}",
                state.step
            ),
        ));
    }
    let adamw_t = step_of("adamw_t")?;
    Ok(Loaded {
        model,
        tokenizer,
        state,
        optimizer_tensors,
        adamw_t,
        adapter,
    })
}
