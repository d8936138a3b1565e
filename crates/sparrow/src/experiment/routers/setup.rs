//! What a router experiment runs: its arms (a router kind, optionally with config
//! fields changed) and its protocol (`RouterExperiment`).

use crate::config::{ModelConfig, RouterKind};
use crate::error::{Error, Result};
use crate::train::TrainOptions;
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// One arm of the experiment: a router kind, optionally with config fields changed.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterArm {
    /// Names the arm's run directories and rows (letters, digits, `_`, `-`, `.`, `+`).
    pub name: String,
    pub kind: RouterKind,
    /// Config fields (their `config.json` names) set on top of the base config.
    pub overrides: Map<String, Value>,
}

impl RouterArm {
    /// The router kind with the base config as it is; named after the kind.
    pub fn plain(kind: RouterKind) -> Self {
        Self {
            name: kind.name().to_string(),
            kind,
            overrides: Map::new(),
        }
    }

    /// `ROUTER` or `NAME=ROUTER[:FIELD=VALUE,FIELD=VALUE...]`, e.g.
    /// `noaux_seq=noaux_bias:router_seq_aux_loss_coef=1e-4`. Values are JSON (numbers,
    /// `true`, `"text"`), a bare word a string.
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |why: &str| Error::Invalid(format!("router arm `{spec}`: {why}"));
        let (name, rest) = match spec.split_once('=') {
            Some((name, rest)) if !name.contains(':') => (Some(name.trim()), rest),
            _ => (None, spec),
        };
        let (kind, fields) = match rest.split_once(':') {
            Some((kind, fields)) => (kind.trim(), Some(fields)),
            None => (rest.trim(), None),
        };
        let kind: RouterKind = kind.parse()?;
        let mut overrides = Map::new();
        for field in fields.into_iter().flat_map(|f| f.split(',')) {
            let (key, value) = field
                .split_once('=')
                .ok_or_else(|| bad(&format!("`{field}` is not FIELD=VALUE")))?;
            let key = key.trim();
            if key.is_empty() || key == "router_kind" {
                return Err(bad("name a config field other than router_kind"));
            }
            let value = value.trim();
            let value = serde_json::from_str(value).unwrap_or_else(|_| Value::from(value));
            overrides.insert(key.to_string(), value);
        }
        let name = match name {
            Some(n) => n.to_string(),
            None if overrides.is_empty() => kind.name().to_string(),
            None => return Err(bad("an arm with changed fields needs a NAME=")),
        };
        let valid = |c: char| c.is_ascii_alphanumeric() || "_-.+".contains(c);
        if name.is_empty() || name.starts_with('.') || !name.chars().all(valid) {
            return Err(bad(
                "its name must be letters, digits, `_`, `-`, `.` or `+`, not starting with `.`",
            ));
        }
        Ok(Self {
            name,
            kind,
            overrides,
        })
    }

    /// The base config with this arm's router and fields; an unknown field, or a value
    /// the config rejects, is an error naming it.
    pub fn config(&self, base: &ModelConfig) -> Result<ModelConfig> {
        let mut json = serde_json::to_value(base)
            .map_err(|e| Error::Invalid(format!("serialising the config: {e}")))?;
        json["router_kind"] = Value::from(self.kind.name());
        for (k, v) in &self.overrides {
            json[k] = v.clone();
        }
        let cfg = ModelConfig::from_json(&json.to_string())
            .map_err(|e| Error::Invalid(format!("router arm `{}`: {e}", self.name)))?;
        let round_trip = serde_json::to_value(&cfg)
            .map_err(|e| Error::Invalid(format!("serialising the config: {e}")))?;
        for k in self.overrides.keys() {
            if round_trip.get(k).is_none() {
                return Err(Error::config(
                    k.as_str(),
                    format!(
                        "router arm `{}` sets a field the config does not have",
                        self.name
                    ),
                ));
            }
        }
        Ok(cfg)
    }
}

/// What to run.
pub struct RouterExperiment {
    /// The model; each arm sets its `router_kind` and fields.
    pub config: ModelConfig,
    pub corpus: PathBuf,
    pub out: PathBuf,
    /// Training options; `seed` is replaced by each of `seeds`.
    pub options: TrainOptions,
    pub arms: Vec<RouterArm>,
    /// One run per arm for each seed.
    pub seeds: Vec<u64>,
    /// Out-of-distribution text (folder of .txt files, used whole) to route with the
    /// trained routers frozen.
    pub ood_corpus: Option<PathBuf>,
    pub show_progress: bool,
    pub stop: Arc<AtomicBool>,
}
