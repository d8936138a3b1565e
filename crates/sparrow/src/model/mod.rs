//! The model: layers built from a `ModelConfig`, their parameters in a `VarStore`, the
//! per-sequence caches of inference. Model directories are read and written by
//! `crate::model_dir`.

pub mod attention;
pub mod block;
pub mod cache;
pub mod compressor;
pub mod diagnostics;
pub mod hyper_connection;
pub mod indexer;
pub mod linear;
pub mod mla;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod options;
pub mod params;
pub mod rope;
pub mod router;
pub mod selector;
pub mod step;
pub mod transformer;
pub mod utilization;
pub mod v4_attention;
pub mod v4_cache;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use params::VarStore;
use std::collections::HashMap;
use std::path::Path;
pub use transformer::{ForwardOutput, HiddenOutput, StepInput, StepOutput, Transformer};

/// A model with its parameters.
pub struct Model {
    pub cfg: ModelConfig,
    pub store: VarStore,
    pub net: Transformer,
}

/// Metadata key recording the training step a weight file belongs to.
pub const STEP_KEY: &str = "sparrow_step";

impl Model {
    /// A freshly initialised model (deterministic for a given seed).
    pub fn new_random(cfg: &ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let store = VarStore::random(seed, dtype, device);
        let net = Transformer::new(&store.root(), cfg)?;
        Ok(Self {
            cfg: cfg.clone(),
            store,
            net,
        })
    }

    /// [`new_random`](Self::new_random) training only the parameters in `trainable`.
    pub fn new_random_training(
        cfg: &ModelConfig,
        seed: u64,
        trainable: params::ParamSet,
        device: &Device,
    ) -> Result<Self> {
        Self::from_store(
            cfg,
            VarStore::random(seed, DType::F32, device).with_trainable(trainable),
        )
    }

    /// A freshly initialised model for inference only (frozen parameters: forwards
    /// record no autograd graph), e.g. to benchmark a shape without trained weights.
    pub fn new_random_for_inference(
        cfg: &ModelConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::new_random_with_weights(cfg, seed, crate::weights::WeightFormat::F32, dtype, device)
    }

    /// [`new_random_for_inference`](Self::new_random_for_inference) with the linear
    /// layers' weights held as `weights` says (benchmarks of the packed kernels).
    pub fn new_random_with_weights(
        cfg: &ModelConfig,
        seed: u64,
        weights: crate::weights::WeightFormat,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let store = VarStore::random(seed, dtype, device)
            .frozen()
            .with_weight_format(weights);
        let net = Transformer::new(&store.root(), cfg)?;
        Ok(Self {
            cfg: cfg.clone(),
            store,
            net,
        })
    }

    /// A model from named tensors; missing, mis-shaped or unexpected tensors are errors
    /// naming the tensor (and both shapes).
    pub fn from_tensors(
        cfg: &ModelConfig,
        tensors: HashMap<String, Tensor>,
        source: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::from_store(
            cfg,
            VarStore::loaded(tensors, source.to_path_buf(), dtype, device),
        )
    }

    pub(crate) fn from_store(cfg: &ModelConfig, mut store: VarStore) -> Result<Self> {
        cfg.validate()?;
        let net = Transformer::new(&store.root(), cfg)?;
        store.check_no_unused()?;
        store.release_sources();
        Ok(Self {
            cfg: cfg.clone(),
            store,
            net,
        })
    }

    /// A model from a GGUF file (`crate::formats::gguf_model`: llama architecture) for
    /// inference (frozen parameters): weight matrices held as `format` says, other
    /// tensors dequantized to `dtype`. `edit` adjusts the config before the layers are
    /// built.
    pub fn load_gguf_for_inference(
        file: &crate::formats::gguf::GgufFile,
        format: crate::weights::WeightFormat,
        dtype: DType,
        device: &Device,
        edit: impl FnOnce(&mut ModelConfig),
    ) -> Result<Self> {
        let mut cfg = crate::formats::gguf_model::read_config(file)?;
        edit(&mut cfg);
        cfg.validate()?;
        let (tensors, quantized) =
            crate::formats::gguf_model::read_tensors(file, &cfg, format, device)?;
        let store =
            VarStore::loaded_with_quantized(tensors, quantized, file.path.clone(), dtype, device)
                .with_weight_format(format)
                .frozen();
        Self::from_store(&cfg, store)
    }

    /// Every tensor a checkpoint holds: parameters in `dtype`, buffers in f32.
    pub fn storage_tensors(&self, dtype: DType) -> Result<Vec<(String, Tensor)>> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::Invalid(format!(
                "weights are stored as f32, f16 or bf16, not {dtype:?}"
            )));
        }
        if self.store.has_packed() {
            return Err(Error::Invalid(
                "this model holds quantized or half-precision weights for inference: load it with the f32 weight format to save or convert it".into(),
            ));
        }
        let trainable: std::collections::HashSet<String> =
            self.store.vars().into_iter().map(|(n, _)| n).collect();
        self.store
            .all_tensors()
            .into_iter()
            .map(|(n, t)| {
                let d = if trainable.contains(&n) {
                    dtype
                } else {
                    DType::F32
                };
                Ok((n, t.to_dtype(d)?))
            })
            .collect()
    }

    /// The GGUF bytes of this model (llama-shaped only; `crate::formats::gguf_export`)
    /// with `tokenizer`'s vocabulary, matrices stored as `dtype`.
    pub fn to_gguf(
        &self,
        tokenizer: &crate::tokenizer::Tokenizer,
        dtype: crate::formats::gguf_export::GgufDtype,
        name: &str,
    ) -> Result<Vec<u8>> {
        let tensors = self
            .storage_tensors(DType::F32)?
            .into_iter()
            .map(|(n, t)| Ok((n, t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?)))
            .collect::<Result<Vec<_>>>()?;
        crate::formats::gguf_export::llama_to_gguf(
            &self.cfg,
            &tensors,
            &tokenizer.gguf_vocab()?,
            dtype,
            name,
        )
    }

    /// (total, active per token) trainable parameters, counted from the built layers'
    /// tensors; active leaves out the routed experts a token does not run ((E - k) of
    /// E in each MoE layer). Tied embeddings count once.
    pub fn parameter_counts(&self) -> (usize, usize) {
        let total = self.store.num_parameters();
        let inactive: usize = self
            .net
            .layers
            .iter()
            .filter_map(|layer| match &layer.mlp {
                block::Ffn::Moe(moe) => {
                    let per_expert = moe.experts.first().map_or(0, |e| e.num_parameters());
                    Some(per_expert * moe.experts.len().saturating_sub(moe.top_k()))
                }
                block::Ffn::Dense(_) => None,
            })
            .sum();
        (total, total - inactive)
    }

    /// The engine's batched step; see `Transformer::step`.
    pub fn step(
        &self,
        inputs: &mut [StepInput<'_>],
        opts: &step::StepOptions,
    ) -> Result<StepOutput> {
        self.net.step(inputs, opts)
    }

    /// One sequence's step: `tokens` at `cache`'s next positions, the cache written in
    /// place (evaluations and tools that feed a single sequence).
    pub fn step_one(
        &self,
        tokens: &[u32],
        cache: &mut cache::SeqCache,
        opts: &step::StepOptions,
    ) -> Result<StepOutput> {
        self.step(&mut [StepInput { tokens, cache }], opts)
    }

    /// Forward pass; see `Transformer::forward`.
    pub fn forward(&self, ids: &Tensor) -> Result<ForwardOutput> {
        self.net.forward(ids)
    }
}
