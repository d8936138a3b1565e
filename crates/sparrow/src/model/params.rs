//! Parameter storage: every trainable tensor is a candle `Var` registered under its
//! checkpoint key (`model.layers.0.self_attn.q_proj.weight`), so module paths mirror
//! the Hugging Face names and import/export is a name map.
//!
//! A store either initialises parameters deterministically (each from its own RNG
//! stream seeded by the model seed and the parameter's name, so adding a module never
//! changes another's init) or takes them from loaded tensors, checking shapes and
//! reporting missing and unexpected names.
//!
//! Buffers (e.g. the `noaux_bias` router's `e_score_correction_bias`) are stored and
//! checkpointed like parameters but are not trainable: `vars()` leaves them out, so the
//! optimizer never touches them; their owner updates them.
//!
//! A store may train only part of a model ([`ParamSet`], `with_trainable`): the other
//! parameters are handed out detached (a frozen base, e.g. the dense model an indexer
//! is attached to), and a loaded store may initialise the parameters of such a set that
//! its tensors lack (`with_missing_initialised`: new modules on a pretrained model).

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::kernels::hmatmul::{HalfKind, HalfMatrix};
use crate::kernels::qmatmul::QMatrix;
use crate::weights::WeightFormat;

/// A weight matrix (out, in) as the store hands it to a `Linear`.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    Dense(Tensor),
    /// Quantized blocks (inference only; no gradient).
    Quantized(Arc<QMatrix>),
    /// f16 / bf16 values (inference only; no gradient).
    Half(Arc<HalfMatrix>),
}

impl LinearWeight {
    /// (rows, cols) = (out, in).
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok(match self {
            LinearWeight::Dense(t) => t.dims2()?,
            LinearWeight::Quantized(q) => (q.rows, q.cols),
            LinearWeight::Half(h) => (h.rows, h.cols),
        })
    }

    /// Bytes the weight occupies in memory.
    pub fn n_bytes(&self) -> usize {
        match self {
            LinearWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            LinearWeight::Quantized(q) => q.n_bytes(),
            LinearWeight::Half(h) => h.n_bytes(),
        }
    }
}

/// A set of parameters, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamSet {
    /// Every parameter.
    #[default]
    All,
    /// The DSA indexers (`model.layers.{i}.self_attn.indexer.*`).
    Indexer,
    /// The DSA indexers and every norm's weights (`input_layernorm`,
    /// `post_attention_layernorm`, the final `norm`, ...): the smallest adaptation of a
    /// pretrained base to its sparse attention (a few KB per layer).
    IndexerNorms,
    /// The DSA indexers, every attention layer's parameters (`self_attn.*`: the
    /// projections) and every norm: the base's attention adapts to the selection while
    /// its feed-forward layers and embeddings stay as loaded.
    IndexerAttention,
}

impl ParamSet {
    /// Whether the parameter called `name` is in the set.
    pub fn contains(self, name: &str) -> bool {
        match self {
            ParamSet::All => true,
            ParamSet::Indexer => is_indexer(name),
            ParamSet::IndexerNorms => is_indexer(name) || is_norm(name),
            ParamSet::IndexerAttention => name.contains(".self_attn.") || is_norm(name),
        }
    }

    /// Whether every parameter of `other` is in this set.
    pub fn covers(self, other: ParamSet) -> bool {
        use ParamSet::*;
        match self {
            All => true,
            Indexer => other == Indexer,
            IndexerNorms => matches!(other, Indexer | IndexerNorms),
            IndexerAttention => other != All,
        }
    }

    /// Whether the set trains parameters of the base model (anything but the indexers):
    /// those learn from the LM loss, so a training step must compute it.
    pub fn trains_base(self) -> bool {
        self != ParamSet::Indexer
    }
}

/// A DSA indexer's parameter.
fn is_indexer(name: &str) -> bool {
    name.contains(".self_attn.indexer.")
}

/// A normalisation layer's parameter: its module's name ends in `norm`
/// (`model.layers.3.input_layernorm.weight`, `model.norm.weight`).
fn is_norm(name: &str) -> bool {
    let mut parts = name.rsplit('.');
    parts.next();
    parts.next().is_some_and(|module| module.ends_with("norm"))
}

/// How a new parameter is initialised when it is not loaded.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// Normal(0, std).
    Normal(f64),
    Ones,
    Zeros,
    /// A (V, k) expert table: row v holds the `hash` router's k distinct experts of
    /// token id v in `layer` (`kernels::experts::hash_experts`), as floats.
    ExpertTable {
        layer: usize,
        n_experts: usize,
    },
}

enum Source {
    Random {
        seed: u64,
    },
    Loaded {
        /// Tensors not yet taken (a frozen store drops each weight it packs).
        tensors: Mutex<HashMap<String, Tensor>>,
        /// Weight matrices kept in a ggml block type (inference only).
        quantized: HashMap<String, Arc<QMatrix>>,
        path: PathBuf,
    },
}

/// All parameters of a model, by checkpoint name.
pub struct VarStore {
    vars: Mutex<BTreeMap<String, Var>>,
    /// Names in `vars` that are buffers, not trainable parameters.
    buffers: Mutex<std::collections::BTreeSet<String>>,
    /// Weights handed out in a packed form (quantized or half precision), by name.
    packed_used: Mutex<BTreeMap<String, LinearWeight>>,
    /// How linear layers' weights are held (inference loads; f32 otherwise).
    weight_format: WeightFormat,
    source: Source,
    dtype: DType,
    device: Device,
    /// Hand the layers detached tensors: their forward passes record no autograd graph,
    /// so activations are freed as soon as they are used (inference).
    frozen: bool,
    /// The parameters that train; the others are handed out detached.
    trainable: ParamSet,
    /// Loaded stores: initialise the parameters of this set that the tensors lack, from
    /// this seed (as a random store would), instead of reporting them missing.
    init_missing: Option<(u64, ParamSet)>,
}

/// A mutex's guard; a panic elsewhere while it was held leaves the map intact (inserts
/// are single calls), so a poisoned lock is taken as it is.
fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn name_hash(name: &str) -> u64 {
    // FNV-1a: stable across runs and platforms (unlike std's SipHash keys).
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

impl VarStore {
    /// A store that initialises parameters from `seed`.
    pub fn random(seed: u64, dtype: DType, device: &Device) -> Self {
        Self {
            vars: Mutex::new(BTreeMap::new()),
            buffers: Mutex::new(Default::default()),
            packed_used: Mutex::new(BTreeMap::new()),
            weight_format: WeightFormat::F32,
            source: Source::Random { seed },
            dtype,
            device: device.clone(),
            frozen: false,
            trainable: ParamSet::All,
            init_missing: None,
        }
    }

    /// A store that takes parameters from `tensors` (read from `path`, named in errors).
    pub fn loaded(
        tensors: HashMap<String, Tensor>,
        path: PathBuf,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self::loaded_with_quantized(tensors, HashMap::new(), path, dtype, device)
    }

    /// [`loaded`](Self::loaded) plus weight matrices kept quantized: a `Linear` whose
    /// weight is among `quantized` computes with it directly (inference only: they
    /// have no gradient; freeze the store with [`frozen`](Self::frozen)).
    pub fn loaded_with_quantized(
        tensors: HashMap<String, Tensor>,
        quantized: HashMap<String, Arc<QMatrix>>,
        path: PathBuf,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            vars: Mutex::new(BTreeMap::new()),
            buffers: Mutex::new(Default::default()),
            packed_used: Mutex::new(BTreeMap::new()),
            weight_format: WeightFormat::F32,
            source: Source::Loaded {
                tensors: Mutex::new(tensors),
                quantized,
                path,
            },
            dtype,
            device: device.clone(),
            frozen: false,
            trainable: ParamSet::All,
            init_missing: None,
        }
    }

    /// Hold linear layers' weights as `format` says (inference: the packed forms have
    /// no gradient; freeze the store too). Must be set before the model is built.
    pub fn with_weight_format(mut self, format: WeightFormat) -> Self {
        self.weight_format = format;
        self
    }

    /// Whether any weight is held packed, quantized or in half precision (such a model
    /// cannot be saved; load it with f32 weights to convert it).
    pub fn has_packed(&self) -> bool {
        !locked(&self.packed_used).is_empty()
    }

    /// Bytes of the weights held packed.
    pub fn packed_bytes(&self) -> usize {
        locked(&self.packed_used)
            .values()
            .map(|w| w.n_bytes())
            .sum()
    }

    /// This store for inference: the tensors it hands out are detached (they share
    /// storage with the variables, so buffer updates still show), and forward passes
    /// keep no graph. Must be called before the model is built.
    pub fn frozen(mut self) -> Self {
        self.frozen = true;
        self
    }

    /// Train only the parameters in `set`: the others are handed out detached (no
    /// gradient reaches them) and [`trainable_vars`](Self::trainable_vars) leaves them
    /// out. Must be called before the model is built.
    pub fn with_trainable(mut self, set: ParamSet) -> Self {
        self.trainable = set;
        self
    }

    /// A loaded store: initialise the parameters in `set` that its tensors lack from
    /// `seed` (each from its own stream, as [`random`](Self::random) does) instead of
    /// reporting them missing; new modules on a pretrained model. Must be called before
    /// the model is built.
    pub fn with_missing_initialised(mut self, seed: u64, set: ParamSet) -> Self {
        self.init_missing = Some((seed, set));
        self
    }

    /// Root builder.
    pub fn root(&self) -> Vb<'_> {
        Vb {
            store: self,
            prefix: String::new(),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// After a frozen (inference) model is built: drop the loaded tensors, which the
    /// parameters and the packed weights have copied by now. Without this a model held
    /// in f16 kept its file's tensors beside its packed weights (SmolLM2 in f16: 578 MB
    /// instead of ~300). A store still being built from (training) keeps them.
    pub fn release_sources(&mut self) {
        if let (
            true,
            Source::Loaded {
                tensors, quantized, ..
            },
        ) = (self.frozen, &mut self.source)
        {
            *locked(tensors) = HashMap::new();
            *quantized = HashMap::new();
        }
    }

    /// After the model is built from loaded tensors: error on any tensor nobody asked for.
    pub fn check_no_unused(&self) -> Result<()> {
        if let Source::Loaded {
            tensors,
            quantized,
            path,
        } = &self.source
        {
            let vars = locked(&self.vars);
            let used = locked(&self.packed_used);
            let tensors = locked(tensors);
            let mut extra: Vec<&String> = tensors
                .keys()
                .filter(|k| !vars.contains_key(*k) && !used.contains_key(*k))
                .chain(quantized.keys().filter(|k| !used.contains_key(*k)))
                .collect();
            extra.sort();
            if let Some(name) = extra.first() {
                return Err(Error::checkpoint(
                    path,
                    format!(
                        "unexpected tensor `{name}` ({} unexpected in all) not used by this config",
                        extra.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Every trainable parameter, sorted by name (buffers left out).
    pub fn vars(&self) -> Vec<(String, Var)> {
        let buffers = locked(&self.buffers);
        locked(&self.vars)
            .iter()
            .filter(|(k, _)| !buffers.contains(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The parameters the optimizer updates: [`vars`](Self::vars) within the trainable
    /// set.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let set = self.trainable;
        self.vars()
            .into_iter()
            .filter(|(n, _)| set.contains(n))
            .collect()
    }

    /// Every stored tensor, parameters and buffers, sorted by name (what a checkpoint
    /// holds).
    pub fn all_tensors(&self) -> Vec<(String, Tensor)> {
        locked(&self.vars)
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Number of scalar parameters: the trainable ones plus packed weights.
    pub fn num_parameters(&self) -> usize {
        let quantized: usize = locked(&self.packed_used)
            .values()
            .map(|w| w.dims().map_or(0, |(r, c)| r * c))
            .sum();
        self.vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum::<usize>()
            + quantized
    }

    fn get_linear(&self, name: String, shape: &[usize], init: Init) -> Result<LinearWeight> {
        if let Source::Loaded {
            quantized, path, ..
        } = &self.source
        {
            if let Some(q) = quantized.get(&name) {
                if [q.rows, q.cols] != shape {
                    return Err(Error::checkpoint(
                        path,
                        format!(
                            "tensor `{name}` has shape [{}, {}], the config expects {shape:?}",
                            q.rows, q.cols
                        ),
                    ));
                }
                let w = LinearWeight::Quantized(q.clone());
                locked(&self.packed_used).insert(name, w.clone());
                return Ok(w);
            }
        }
        if self.weight_format == WeightFormat::F32 {
            return Ok(LinearWeight::Dense(self.get(name, shape, init)?));
        }
        if let Some(w) = locked(&self.packed_used).get(&name) {
            return Ok(w.clone());
        }
        let t = self.fetch(&name, shape, init)?;
        let (rows, cols) = (shape[0], shape[1]);
        let half = |kind: HalfKind| -> Result<LinearWeight> {
            let bits: Vec<u16> = match (kind, t.dtype()) {
                (HalfKind::F16, DType::F16) => t
                    .flatten_all()?
                    .to_vec1::<half::f16>()?
                    .into_iter()
                    .map(|h| h.to_bits())
                    .collect(),
                (HalfKind::Bf16, DType::BF16) => t
                    .flatten_all()?
                    .to_vec1::<half::bf16>()?
                    .into_iter()
                    .map(|h| h.to_bits())
                    .collect(),
                _ => {
                    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    return Ok(LinearWeight::Half(Arc::new(HalfMatrix::from_f32(
                        kind, rows, cols, &v,
                    ))));
                }
            };
            Ok(LinearWeight::Half(Arc::new(
                HalfMatrix::new(kind, rows, cols, bits).map_err(Error::Invalid)?,
            )))
        };
        let packed = match (self.weight_format, t.dtype()) {
            (WeightFormat::F16, _) | (WeightFormat::Native, DType::F16) => half(HalfKind::F16)?,
            (WeightFormat::Bf16, _) | (WeightFormat::Native, DType::BF16) => half(HalfKind::Bf16)?,
            // Q8_0 blocks of 32 along the row; other widths stay f32.
            (WeightFormat::Int8, _) if cols % 32 == 0 => {
                let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let bytes = crate::formats::ggml::quantize_q8_0(&v);
                let q = QMatrix::new(crate::formats::ggml::GgmlType::Q8_0, rows, cols, bytes)
                    .map_err(Error::Invalid)?;
                LinearWeight::Quantized(Arc::new(q))
            }
            _ => return Ok(LinearWeight::Dense(self.get(name, shape, init)?)),
        };
        // A frozen store's packed weight replaces its loaded tensor: drop that now, so
        // loading never holds the model twice (SmolLM2 held in f16 peaked at 657 MB).
        if let (true, Source::Loaded { tensors, .. }) = (self.frozen, &self.source) {
            locked(tensors).remove(&name);
        }
        locked(&self.packed_used).insert(name, packed.clone());
        Ok(packed)
    }

    fn get_buffer(&self, name: String, shape: &[usize], init: Init) -> Result<Tensor> {
        locked(&self.buffers).insert(name.clone());
        self.get(name, shape, init)
    }

    fn get(&self, name: String, shape: &[usize], init: Init) -> Result<Tensor> {
        if let Some(v) = locked(&self.vars).get(&name) {
            return Ok(self.hand_out(&name, v));
        }
        let tensor = self
            .fetch(&name, shape, init)?
            .to_dtype(self.dtype)?
            .to_device(&self.device)?;
        let var = Var::from_tensor(&tensor)?;
        let out = self.hand_out(&name, &var);
        locked(&self.vars).insert(name, var);
        Ok(out)
    }

    /// The tensor `name` as loaded (its file dtype) or initialised (the store's dtype),
    /// shape-checked, not registered.
    fn fetch(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        Ok(match &self.source {
            Source::Random { seed } => self.initialised(*seed, name, shape, init)?,
            Source::Loaded { tensors, path, .. } => {
                let tensors = locked(tensors);
                if let (None, Some((seed, set))) = (tensors.get(name), self.init_missing) {
                    if set.contains(name) {
                        return self.initialised(seed, name, shape, init);
                    }
                }
                let t = tensors.get(name).ok_or_else(|| {
                    Error::checkpoint(
                        path,
                        format!("missing tensor `{name}` (expected shape {shape:?})"),
                    )
                })?;
                if !t.dtype().is_float() {
                    return Err(Error::checkpoint(
                        path,
                        format!(
                            "tensor `{name}` has dtype {:?}; weights must be floating point",
                            t.dtype()
                        ),
                    ));
                }
                if t.dims() != shape {
                    return Err(Error::checkpoint(
                        path,
                        format!(
                            "tensor `{name}` has shape {:?}, the config expects {shape:?}",
                            t.dims()
                        ),
                    ));
                }
                t.clone()
            }
        })
    }

    /// A new parameter `name` initialised from `seed` (its own stream: the seed mixed
    /// with the name's hash), in the store's dtype.
    fn initialised(&self, seed: u64, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f64> = match init {
            Init::Ones => vec![1.0; n],
            Init::Zeros => vec![0.0; n],
            Init::ExpertTable { layer, n_experts } => {
                let (rows, k) = match shape {
                    [rows, k] => (*rows, *k),
                    _ => {
                        return Err(Error::Invalid(format!(
                            "an expert table is (V, k), not {shape:?}"
                        )))
                    }
                };
                if k > n_experts {
                    return Err(Error::Invalid(format!(
                        "an expert table of {k} distinct experts out of {n_experts}"
                    )));
                }
                (0..rows as u32)
                    .flat_map(|v| crate::kernels::experts::hash_experts(v, layer, n_experts, k))
                    .map(f64::from)
                    .collect()
            }
            Init::Normal(std) => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ name_hash(name));
                let normal = Normal::new(0.0, std)
                    .map_err(|e| Error::Invalid(format!("init std {std}: {e}")))?;
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            }
        };
        Ok(Tensor::from_vec(data, shape, &self.device)?.to_dtype(self.dtype)?)
    }

    fn hand_out(&self, name: &str, var: &Var) -> Tensor {
        if self.frozen || !self.trainable.contains(name) {
            var.as_tensor().detach()
        } else {
            var.as_tensor().clone()
        }
    }
}

/// A builder positioned at one module path inside a `VarStore`.
#[derive(Clone)]
pub struct Vb<'a> {
    store: &'a VarStore,
    prefix: String,
}

impl<'a> Vb<'a> {
    /// Descend into a sub-module: `vb.pp("layers").pp(3)`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Vb<'a> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Vb {
            store: self.store,
            prefix,
        }
    }

    /// The parameter `name` under this path, created or loaded with `shape`.
    pub fn get(&self, shape: &[usize], name: &str, init: Init) -> Result<Tensor> {
        self.store.get(self.pp(name).prefix, shape, init)
    }

    /// A weight matrix `name` under this path: quantized when the store holds it so,
    /// else a parameter like [`get`](Self::get).
    pub fn get_linear(&self, shape: &[usize], name: &str, init: Init) -> Result<LinearWeight> {
        self.store.get_linear(self.pp(name).prefix, shape, init)
    }

    /// A non-trainable buffer `name` under this path (stored and checkpointed, never
    /// given to the optimizer), created or loaded with `shape`.
    pub fn buffer(&self, shape: &[usize], name: &str, init: Init) -> Result<Tensor> {
        self.store.get_buffer(self.pp(name).prefix, shape, init)
    }

    pub fn dtype(&self) -> DType {
        self.store.dtype
    }

    pub fn device(&self) -> &Device {
        &self.store.device
    }
}
