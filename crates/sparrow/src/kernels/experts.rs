//! MoE dispatch kernels (DESIGN.md §4, "expert execution on CPU"): the (token, slot)
//! pairs a router kept are grouped by expert (`Dispatch`, a counting sort), the token
//! rows are gathered once into that order (`GatherRows`), each expert runs one GEMM chain
//! over its contiguous block (in `model::moe`), and `CombineSlots` adds each token's
//! weighted expert outputs back: `y[t] = sum_j w[t,j] * ys[pos(t,j)]`.
//!
//! Both ops are candle custom ops with backward passes written as gathers (parallel over
//! destination rows, no atomics, deterministic):
//! - gather: `dx[t] = sum_j dxg[pos(t,j)]`;
//! - combine: `dys[p] = w[t,j] * dy[t]` for `p = pos(t,j)`, `dw[t,j] = dy[t] . ys[p]`.
//!
//! Reference: `reference::{moe_gather_reference, moe_combine_reference}` (candle's
//! `index_select`, `broadcast_mul` and `index_add`), compared in `tests/routers.rs` and
//! by the `expert_dispatch` fuzz target on arbitrary routings.

use super::{by_dtype, host, storage_slice};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;
use std::sync::Arc;

/// Marks a dropped slot in `Dispatch::pos` (and in the router's expert ids).
pub const DROPPED: u32 = u32::MAX;

/// Where each kept (token, slot) pair goes when rows are grouped by expert.
#[derive(Debug, Clone)]
pub struct Dispatch {
    pub n_tokens: usize,
    pub k: usize,
    /// Rows of expert e are `offsets[e]..offsets[e + 1]` of the grouped order (E + 1).
    pub offsets: Vec<usize>,
    /// Grouped position -> token (M = kept pairs).
    pub token_of: Vec<u32>,
    /// Grouped position -> flat slot `t * k + j` (M).
    pub slot_of: Vec<u32>,
    /// Flat slot -> grouped position, `DROPPED` when the slot was dropped (N * k).
    pub pos: Vec<u32>,
}

impl Dispatch {
    /// Group `expert_ids` (N * k, row-major; `DROPPED` = dropped) by expert, keeping
    /// token order within an expert.
    pub fn new(expert_ids: &[u32], k: usize, n_experts: usize) -> candle_core::Result<Self> {
        if k == 0 || !expert_ids.len().is_multiple_of(k) {
            candle_core::bail!(
                "dispatch: {} slots is not a multiple of k {k}",
                expert_ids.len()
            );
        }
        let mut offsets = vec![0usize; n_experts + 1];
        for &e in expert_ids.iter().filter(|&&e| e != DROPPED) {
            if e as usize >= n_experts {
                candle_core::bail!("dispatch: expert {e} out of range ({n_experts} experts)");
            }
            offsets[e as usize + 1] += 1;
        }
        for e in 0..n_experts {
            offsets[e + 1] += offsets[e];
        }
        let m = offsets[n_experts];
        let mut cursor = offsets.clone();
        let mut token_of = vec![0u32; m];
        let mut slot_of = vec![0u32; m];
        let mut pos = vec![DROPPED; expert_ids.len()];
        for (flat, &e) in expert_ids.iter().enumerate() {
            if e == DROPPED {
                continue;
            }
            let p = cursor[e as usize];
            cursor[e as usize] += 1;
            token_of[p] = (flat / k) as u32;
            slot_of[p] = flat as u32;
            pos[flat] = p as u32;
        }
        Ok(Self {
            n_tokens: expert_ids.len() / k,
            k,
            offsets,
            token_of,
            slot_of,
            pos,
        })
    }

    /// Kept pairs (rows of the grouped order).
    pub fn rows(&self) -> usize {
        self.token_of.len()
    }
}

/// x (N, C) -> xg (M, C): `xg[p] = x[token_of[p]]`.
#[derive(Clone)]
pub struct GatherRows(pub Arc<Dispatch>);

/// (ys (M, C), w (N, k)) -> y (N, C): `y[t] = sum_j w[t,j] * ys[pos(t,j)]`.
#[derive(Clone)]
pub struct CombineSlots(pub Arc<Dispatch>);

impl GatherRows {
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
    }
}

impl CombineSlots {
    pub fn apply(&self, ys: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        ys.contiguous()?.apply_op2(&w.contiguous()?, self.clone())
    }
}

fn gather_fwd<T: WithDType>(plan: &Dispatch, x: &[T], c: usize) -> Vec<T> {
    let mut out = vec![T::zero(); plan.rows() * c];
    out.par_chunks_mut(c * super::rows_per_task(c))
        .enumerate()
        .for_each(|(ci, block)| {
            let p0 = ci * super::rows_per_task(c);
            for (i, row) in block.chunks_exact_mut(c).enumerate() {
                let t = plan.token_of[p0 + i] as usize;
                row.copy_from_slice(&x[t * c..(t + 1) * c]);
            }
        });
    out
}

/// out[t] = sum_j w[t,j] * rows[pos(t, j)] over the kept slots, j in slot order; with
/// `w` = None the weights are 1. The combine's forward, and the gather's backward
/// (`dx[t] = sum_j dxg[pos(t, j)]`).
fn sum_slots<T: WithDType + Float + std::ops::AddAssign>(
    plan: &Dispatch,
    rows: &[T],
    w: Option<&[T]>,
    c: usize,
) -> Vec<T> {
    let k = plan.k;
    let per_task = super::rows_per_task(c);
    let mut out = vec![T::zero(); plan.n_tokens * c];
    out.par_chunks_mut(c * per_task)
        .enumerate()
        .for_each(|(ci, block)| {
            let t0 = ci * per_task;
            for (i, row) in block.chunks_exact_mut(c).enumerate() {
                let t = t0 + i;
                for j in 0..k {
                    let p = plan.pos[t * k + j];
                    if p == DROPPED {
                        continue;
                    }
                    let src = &rows[p as usize * c..(p as usize + 1) * c];
                    match w {
                        Some(w) => {
                            let wt = w[t * k + j];
                            for (o, &v) in row.iter_mut().zip(src) {
                                *o += wt * v;
                            }
                        }
                        None => {
                            for (o, &v) in row.iter_mut().zip(src) {
                                *o += v;
                            }
                        }
                    }
                }
            }
        });
    out
}

/// (dys, dw) of the combine (`sum_slots` with weights).
fn combine_bwd<T: WithDType + Float>(
    plan: &Dispatch,
    ys: &[T],
    w: &[T],
    dy: &[T],
    c: usize,
) -> (Vec<T>, Vec<T>) {
    let k = plan.k;
    let mut dys = vec![T::zero(); plan.rows() * c];
    dys.par_chunks_mut(c * super::rows_per_task(c))
        .enumerate()
        .for_each(|(ci, block)| {
            let p0 = ci * super::rows_per_task(c);
            for (i, row) in block.chunks_exact_mut(c).enumerate() {
                let slot = plan.slot_of[p0 + i] as usize;
                let t = slot / k;
                let wt = w[slot];
                for (o, &g) in row.iter_mut().zip(&dy[t * c..(t + 1) * c]) {
                    *o = wt * g;
                }
            }
        });
    let mut dw = vec![T::zero(); plan.n_tokens * k];
    dw.par_chunks_mut(k).enumerate().for_each(|(t, row)| {
        for (j, o) in row.iter_mut().enumerate() {
            let p = plan.pos[t * k + j];
            if p != DROPPED {
                let src = &ys[p as usize * c..(p as usize + 1) * c];
                *o = super::dot(&dy[t * c..(t + 1) * c], src);
            }
        }
    });
    (dys, dw)
}

impl CustomOp1 for GatherRows {
    fn name(&self) -> &'static str {
        "moe-gather-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c) = l.shape().dims2()?;
        if n != self.0.n_tokens {
            candle_core::bail!("moe-gather-rows: {n} rows for {} tokens", self.0.n_tokens);
        }
        let op = self.name();
        let out = by_dtype!(op, s.dtype(), |T| {
            T::to_cpu_storage_owned(gather_fwd(&self.0, storage_slice::<T>(op, s, l)?, c))
        });
        Ok((out, Shape::from((self.0.rows(), c))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let c = arg.dim(1)?;
        let shape = (self.0.n_tokens, c);
        let dx = match arg.dtype() {
            candle_core::DType::F64 => Tensor::from_vec(
                sum_slots(&self.0, &host::<f64>(grad)?, None, c),
                shape,
                arg.device(),
            )?,
            _ => Tensor::from_vec(
                sum_slots(
                    &self.0,
                    &host::<f32>(&grad.to_dtype(candle_core::DType::F32)?)?,
                    None,
                    c,
                ),
                shape,
                arg.device(),
            )?
            .to_dtype(arg.dtype())?,
        };
        Ok(Some(dx))
    }
}

impl CustomOp2 for CombineSlots {
    fn name(&self) -> &'static str {
        "moe-combine-slots"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let plan = &self.0;
        let (m, c) = l1.shape().dims2()?;
        let (n, k) = l2.shape().dims2()?;
        if m != plan.rows() || n != plan.n_tokens || k != plan.k {
            candle_core::bail!(
                "moe-combine-slots: ys {:?} / weights {:?} do not match the dispatch ({} rows, {} tokens x {})",
                l1.shape(),
                l2.shape(),
                plan.rows(),
                plan.n_tokens,
                plan.k
            );
        }
        let op = "moe-combine-slots";
        let out = by_dtype!(op, s1.dtype(), |T| {
            let ys = storage_slice::<T>(op, s1, l1)?;
            let w = storage_slice::<T>(op, s2, l2)?;
            T::to_cpu_storage_owned(sum_slots(plan, ys, Some(w), c))
        });
        Ok((out, Shape::from((n, c))))
    }

    fn bwd(
        &self,
        ys: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let c = ys.dim(1)?;
        let dev = ys.device();
        let (m, n, k) = (self.0.rows(), self.0.n_tokens, self.0.k);
        let (dys, dw) = match ys.dtype() {
            candle_core::DType::F64 => {
                let (a, b) = combine_bwd(
                    &self.0,
                    &host::<f64>(ys)?,
                    &host::<f64>(w)?,
                    &host::<f64>(grad)?,
                    c,
                );
                (
                    Tensor::from_vec(a, (m, c), dev)?,
                    Tensor::from_vec(b, (n, k), dev)?,
                )
            }
            dt => {
                let f = |t: &Tensor| host::<f32>(&t.to_dtype(candle_core::DType::F32)?);
                let (a, b) = combine_bwd(&self.0, &f(ys)?, &f(w)?, &f(grad)?, c);
                (
                    Tensor::from_vec(a, (m, c), dev)?.to_dtype(dt)?,
                    Tensor::from_vec(b, (n, k), dev)?.to_dtype(dt)?,
                )
            }
        };
        Ok((Some(dys), Some(dw)))
    }
}

/// The `hash` router's fixed table: k distinct experts for token id `v` in `layer`,
/// drawn from a splitmix64 stream seeded by both (same table on every run and machine).
pub fn hash_experts(v: u32, layer: usize, n_experts: usize, k: usize) -> Vec<u32> {
    let mut state = ((layer as u64) << 32 | v as u64) ^ 0x5851_f42d_4c95_7f2d;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut out: Vec<u32> = Vec::with_capacity(k);
    while out.len() < k {
        let e = (next() % n_experts as u64) as u32;
        if !out.contains(&e) {
            out.push(e);
        }
    }
    out
}
