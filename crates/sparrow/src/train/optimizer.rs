//! AdamW (Loshchilov & Hutter) with decoupled weight decay on matrices only (norm
//! weights are not decayed), global-norm gradient clipping, and moments that can be
//! saved and restored for exact resume.

use crate::error::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
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
    /// First and second moments, one pair per parameter.
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates applied so far (bias correction uses t + 1 for the next one).
    pub t: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let m = params
            .iter()
            .map(|(_, p)| p.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
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
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, (_, p)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p.as_tensor()) else {
                continue;
            };
            let g = if grad_scale != 1.0 {
                g.affine(grad_scale, 0.0)?
            } else {
                g.clone()
            };
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&m / bc1)? / denom)?;
            let decay = if p.rank() >= 2 { c.weight_decay } else { 0.0 };
            let x = p.as_tensor();
            let new = ((x * (1.0 - lr * decay))? - (update * lr)?)?;
            p.set(&new)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Moments as named tensors (`{param}.exp_avg`, `{param}.exp_avg_sq`).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("{name}.exp_avg"), self.m[i].clone()));
            out.push((format!("{name}.exp_avg_sq"), self.v[i].clone()));
        }
        out
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
                let tensor = tensor.to_dtype(p.dtype())?;
                if slot == 0 {
                    self.m[i] = tensor;
                } else {
                    self.v[i] = tensor;
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
