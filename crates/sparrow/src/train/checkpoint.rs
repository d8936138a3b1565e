//! Checkpoints: a training run directory is a model directory (`config.json`,
//! `model.safetensors`, `tokenizer.json`, `generation_config.json`) plus
//! `train_state.safetensors` (AdamW moments) and `train_state.json` (step, RNG, data
//! position, options). Every file is written atomically; `train_state.json` goes last
//! and both weight files carry the step in their metadata, so a resume checks that all
//! three belong to the same step.

use super::optimizer::AdamW;
use super::options::TrainOptions;
use crate::error::{Error, Result};
use crate::model::{Model, STEP_KEY};
use crate::tokenizer::Tokenizer;
use candle_core::{DType, Device};
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

/// Write a full checkpoint of `model` and `opt` at `state.step` into `dir`.
pub fn save(
    dir: &Path,
    model: &Model,
    opt: &AdamW,
    tokenizer: &Tokenizer,
    state: &TrainState,
) -> Result<()> {
    let opts = crate::model_dir::SaveOptions {
        step: Some(state.step),
        tokenizer: Some(tokenizer),
        ..Default::default()
    };
    crate::model_dir::save(model, dir, &opts)?;
    let meta = HashMap::from([
        (STEP_KEY.to_string(), state.step.to_string()),
        ("adamw_t".to_string(), opt.t.to_string()),
    ]);
    crate::weights::save(&dir.join(STATE_WEIGHTS), &opt.state_tensors(), meta)?;
    crate::fsio::write_json_atomic(&dir.join(STATE_JSON), state)
}

/// Everything a resume needs.
pub struct Loaded {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub state: TrainState,
    pub optimizer_tensors: HashMap<String, candle_core::Tensor>,
    pub adamw_t: u64,
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
    let (model, model_step) = crate::model_dir::load(dir, DType::F32, device)?;
    let weights_path = dir.join("model.safetensors");
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
    })
}
