//! AdamW (Loshchilov & Hutter) with decoupled weight decay on matrices only (norm
//! weights are not decayed), global-norm gradient clipping, and moments that can be
//! saved and restored for exact resume. The update itself is one in-place pass per
//! parameter (`kernels::adamw`).

use crate::error::{Error, Result};
use crate::kernels::adamw::{AdamWInPlace, AdamWStep};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    params: Vec<(String, Var)>,
    /// First and second moments, one pair per parameter (host f32, as the parameters).
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Updates applied so far (bias correction uses t + 1 for the next one).
    pub t: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        for (name, p) in &params {
            if p.dtype() != DType::F32 || !p.device().is_cpu() {
                return Err(Error::Invalid(format!(
                    "AdamW trains f32 parameters on the CPU; `{name}` is {:?} on {:?}",
                    p.dtype(),
                    p.device()
                )));
            }
        }
        let m: Vec<Vec<f32>> = params
            .iter()
            .map(|(_, p)| vec![0.0; p.elem_count()])
            .collect();
        let v = m.clone();
        Ok(Self {
            cfg,
            params,
            m,
            v,
            t: 0,
        })
    }

    /// Global L2 norm of the gradients of all parameters.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sq = 0.0f64;
        for (_, p) in &self.params {
            if let Some(g) = grads.get(p.as_tensor()) {
                sq += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
        Ok(sq.sqrt())
    }

    /// One update with learning rate `lr`, gradients multiplied by `grad_scale` (clipping).
    ///
    /// A parameter without a gradient this step (an expert no token was routed to) is
    /// left untouched, moments included, as PyTorch does for `grad = None`. That every
    /// parameter *can* receive a gradient is asserted by the test suite.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bias_correction1 = 1.0 - c.beta1.powi(self.t as i32);
        let bias_correction2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, (_, p)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p.as_tensor()) else {
                continue;
            };
            let step = AdamWStep {
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                lr,
                weight_decay: if p.rank() >= 2 { c.weight_decay } else { 0.0 },
                bias_correction1,
                bias_correction2,
                grad_scale,
            };
            AdamWInPlace::new(&mut self.m[i], &mut self.v[i], step).apply(p.as_tensor(), g)?;
        }
        Ok(())
    }

    /// Moments as named tensors (`{param}.exp_avg`, `{param}.exp_avg_sq`).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (suffix, moment) in [("exp_avg", &self.m[i]), ("exp_avg_sq", &self.v[i])] {
                let tensor = Tensor::from_slice(moment, p.dims(), p.device())?;
                out.push((format!("{name}.{suffix}"), tensor));
            }
        }
        Ok(out)
    }

    /// Restore moments saved by `state_tensors`; `source` names the file in errors.
    pub fn load_state(
        &mut self,
        mut tensors: std::collections::HashMap<String, Tensor>,
        t: u64,
        source: &std::path::Path,
    ) -> Result<()> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (suffix, slot) in [("exp_avg", 0), ("exp_avg_sq", 1)] {
                let key = format!("{name}.{suffix}");
                let tensor = tensors
                    .remove(&key)
                    .ok_or_else(|| Error::checkpoint(source, format!("missing tensor `{key}`")))?;
                if tensor.dims() != p.dims() {
                    return Err(Error::checkpoint(
                        source,
                        format!(
                            "tensor `{key}` has shape {:?}, the model expects {:?}",
                            tensor.dims(),
                            p.dims()
                        ),
                    ));
                }
                let moment = tensor
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                if slot == 0 {
                    self.m[i] = moment;
                } else {
                    self.v[i] = moment;
                }
            }
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(Error::checkpoint(
                source,
                format!("unexpected tensor `{extra}`"),
            ));
        }
        self.t = t;
        Ok(())
    }
}
