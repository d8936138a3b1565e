//! The indexer's differentiable scores of each query's selected positions, one op with
//! its backward: `I(t, j) = sum_h w(t, h) act(q(t, h) . k(idx(t, j)))` for q (B, T, Hi,
//! di), w (B, T, Hi), the index keys k (B, S, di) and the selection idx (B, T, K) ->
//! (B, T, K). The sparse stage's KL trains the indexer through these scores.
//!
//! Composed from candle's ops (`reference::selected_scores`) the gathered keys
//! (B * T, K, di) and the (B * T, Hi, K) dots and activations stay in the autograd graph
//! until the backward: 64x the index keys' bytes per layer at K = 256, di = 64
//! (SmolLM2 + DSA, 2048-token windows: ~4 GB over 30 layers). Here only the (B, T, K)
//! output is kept; the backward gathers the keys again.
//!
//! [`NONE`] slots (fewer visible positions than K) score 0 and get no gradient.

use super::index_shape::ScoreAct;
use super::topk::NONE;
use super::{add_parts, by_dtype, dot, host, storage_slice};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;
use std::sync::Arc;

/// Query rows per rayon task of the key-gradient pass (each task owns a (B, S, di)
/// accumulator).
const ROWS_PER_TASK: usize = 128;

/// `I(t, j)` of the selected positions `idx` (B, T, K), [`NONE`]-padded.
#[derive(Debug, Clone)]
pub struct SelectedScores {
    pub act: ScoreAct,
    pub idx: Arc<Vec<u32>>,
    /// K: selected positions per query.
    pub k: usize,
}

/// The sizes every pass needs, read from the inputs' layouts.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    h: usize,
    di: usize,
    s: usize,
    k: usize,
}

impl SelectedScores {
    /// q (B, T, Hi, di), w (B, T, Hi), keys (B, S, di) -> (B, T, K).
    pub fn apply(&self, q: &Tensor, w: &Tensor, keys: &Tensor) -> candle_core::Result<Tensor> {
        q.contiguous()?
            .apply_op3(&w.contiguous()?, &keys.contiguous()?, self.clone())
    }

    fn dims(&self, q: &[usize], w: &[usize], keys: &[usize]) -> candle_core::Result<Dims> {
        let name = "selected-scores";
        let (&[b, t, h, di], &[wb, wt, wh], &[kb, s, kd]) = (q, w, keys) else {
            candle_core::bail!(
                "{name}: expected q (B, T, Hi, di), w (B, T, Hi), keys (B, S, di), got {q:?} / {w:?} / {keys:?}"
            );
        };
        if (wb, wt, wh) != (b, t, h) || (kb, kd) != (b, di) {
            candle_core::bail!("{name}: q {q:?}, w {w:?} and keys {keys:?} disagree");
        }
        if self.idx.len() != b * t * self.k {
            candle_core::bail!(
                "{name}: {} selected positions for (B, T, K) = ({b}, {t}, {})",
                self.idx.len(),
                self.k
            );
        }
        if let Some(&bad) = self.idx.iter().find(|&&i| i != NONE && i as usize >= s) {
            candle_core::bail!("{name}: selected position {bad} past the {s} keys");
        }
        Ok(Dims {
            b,
            t,
            h,
            di,
            s,
            k: self.k,
        })
    }

    /// The activation and its derivative at a dot product.
    fn act<T: Float>(&self, x: T) -> (T, T) {
        match self.act {
            ScoreAct::Relu if x > T::zero() => (x, T::one()),
            ScoreAct::Relu => (T::zero(), T::zero()),
            ScoreAct::Identity => (x, T::one()),
        }
    }

    fn forward<T: Float + Send + Sync>(&self, d: Dims, q: &[T], w: &[T], keys: &[T]) -> Vec<T> {
        let mut out = vec![T::zero(); d.b * d.t * d.k];
        out.par_chunks_mut(d.k).enumerate().for_each(|(row, o)| {
            let kb = &keys[(row / d.t) * d.s * d.di..];
            let (qr, wr) = (&q[row * d.h * d.di..], &w[row * d.h..]);
            for (j, slot) in o.iter_mut().enumerate() {
                let i = self.idx[row * d.k + j];
                if i == NONE {
                    continue;
                }
                let kr = &kb[i as usize * d.di..(i as usize + 1) * d.di];
                *slot = (0..d.h).fold(T::zero(), |acc, hh| {
                    let qh = &qr[hh * d.di..(hh + 1) * d.di];
                    acc + wr[hh] * self.act(dot(qh, kr)).0
                });
            }
        });
        out
    }

    /// (dq, dw, dkeys) for the output gradient g (B, T, K).
    fn backward<T: Float + Send + Sync>(
        &self,
        d: Dims,
        q: &[T],
        w: &[T],
        keys: &[T],
        g: &[T],
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (hd, rows, kh) = (d.h * d.di, d.b * d.t, d.k * d.h);
        let mut dq = vec![T::zero(); rows * hd];
        let mut dw = vec![T::zero(); rows * d.h];
        // c(t, j, h) = g_j w_h act'(q_h . k_j): the one dot product per (t, j, h), kept
        // for the key gradient below ((B, T, K, Hi): a few MB).
        let mut coef = vec![T::zero(); rows * kh];
        // Per query row: dw_h = sum_j g_j act(q_h . k_j), dq_h = sum_j c(t, j, h) k_j.
        dq.par_chunks_mut(hd)
            .zip(dw.par_chunks_mut(d.h))
            .zip(coef.par_chunks_mut(kh))
            .enumerate()
            .for_each(|(row, ((dqr, dwr), cr))| {
                let kb = &keys[(row / d.t) * d.s * d.di..];
                let (qr, wr) = (&q[row * hd..(row + 1) * hd], &w[row * d.h..]);
                for j in 0..d.k {
                    let (i, gj) = (self.idx[row * d.k + j], g[row * d.k + j]);
                    if i == NONE {
                        continue;
                    }
                    let kr = &kb[i as usize * d.di..(i as usize + 1) * d.di];
                    for hh in 0..d.h {
                        let (a, da) = self.act(dot(&qr[hh * d.di..(hh + 1) * d.di], kr));
                        dwr[hh] = dwr[hh] + gj * a;
                        let c = gj * wr[hh] * da;
                        cr[j * d.h + hh] = c;
                        if c != T::zero() {
                            for (o, &kv) in dqr[hh * d.di..(hh + 1) * d.di].iter_mut().zip(kr) {
                                *o = *o + c * kv;
                            }
                        }
                    }
                }
            });
        // dk_i = sum over the (t, j, h) that selected i of c(t, j, h) q_h: scattered, so
        // each task accumulates its rows into its own buffer, summed at the end.
        let dk = (0..rows.div_ceil(ROWS_PER_TASK))
            .into_par_iter()
            .map(|task| {
                let mut acc = vec![T::zero(); d.b * d.s * d.di];
                let end = ((task + 1) * ROWS_PER_TASK).min(rows);
                for row in task * ROWS_PER_TASK..end {
                    let base = (row / d.t) * d.s * d.di;
                    let qr = &q[row * hd..(row + 1) * hd];
                    for j in 0..d.k {
                        let i = self.idx[row * d.k + j];
                        if i == NONE {
                            continue;
                        }
                        let at = base + i as usize * d.di;
                        for hh in 0..d.h {
                            let c = coef[row * kh + j * d.h + hh];
                            if c != T::zero() {
                                let qh = &qr[hh * d.di..(hh + 1) * d.di];
                                for (o, &qv) in acc[at..at + d.di].iter_mut().zip(qh) {
                                    *o = *o + c * qv;
                                }
                            }
                        }
                    }
                }
                acc
            })
            .reduce(|| vec![T::zero(); d.b * d.s * d.di], add_parts);
        (dq, dw, dk)
    }
}

impl CustomOp3 for SelectedScores {
    fn name(&self) -> &'static str {
        "selected-scores"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let d = self.dims(l1.dims(), l2.dims(), l3.dims())?;
        let out = by_dtype!(name, s1.dtype(), |T| {
            let q = storage_slice::<T>(name, s1, l1)?;
            let w = storage_slice::<T>(name, s2, l2)?;
            let k = storage_slice::<T>(name, s3, l3)?;
            T::to_cpu_storage_owned(self.forward(d, q, w, k))
        });
        Ok((out, Shape::from((d.b, d.t, d.k))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        w: &Tensor,
        keys: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(q.dims(), w.dims(), keys.dims())?;
        let dev = q.device();
        let (dq, dw, dk) = by_dtype!(self.name(), q.dtype(), |T| {
            let (dq, dw, dk) = self.backward::<T>(d, &host(q)?, &host(w)?, &host(keys)?, &host(g)?);
            (
                Tensor::from_vec(dq, q.shape(), dev)?,
                Tensor::from_vec(dw, w.shape(), dev)?,
                Tensor::from_vec(dk, keys.shape(), dev)?,
            )
        });
        Ok((Some(dq), Some(dw), Some(dk)))
    }
}
