//! The manifold-constrained hyper-connections' parts (`model::hyper_connection`,
//! DeepSeek-V4) as fused ops, each with its backward and a plain reference:
//!
//! - [`RowRms`]: `sqrt(mean(x^2) + eps)` per row, (R, K) -> (R, 1). The mixes are
//!   `(x W^T) / rms(x)` (the same as normalising x first: the norm has no weight), so
//!   the normalised (R, N * C) copy of the streams never exists.
//! - [`Sinkhorn`]: the combination matrices, (R, N, N) logits -> `softmax + eps`, then a
//!   column normalisation and `iters - 1` (row, column) pairs, each `/ (sum + eps)`. The
//!   backward recomputes each row's iterations (N^2 values per step) instead of keeping
//!   2 * iters tensors in the autograd graph.
//! - [`StreamCollapse`]: `sum_n w_n x_n`, streams (R, N, C) and weights (R, N) -> (R, C).
//! - [`StreamMerge`]: `x'_n = post_n f + sum_j comb[j, n] x_j`, streams (R, N, C), the
//!   mixes (R, N + N^2) (post, then comb row-major `[j * N + n]`) and the half's output
//!   f (R, C) -> (R, N, C).
//!
//! Each keeps its output in the graph; composed from candle's ops the four kept about
//! twelve (R, N * C)-sized tensors per layer.

use super::{by_dtype, host, storage_slice};
use candle_core::backend::BackendStorage;
use candle_core::{CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

/// Rows per rayon task.
const ROWS_PER_TASK: usize = 64;

fn dims2(name: &str, l: &Layout) -> candle_core::Result<(usize, usize)> {
    match l.dims() {
        [r, k] => Ok((*r, *k)),
        d => candle_core::bail!("{name}: expected (R, K), got {d:?}"),
    }
}

fn dims3(name: &str, l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    match l.dims() {
        [r, n, c] => Ok((*r, *n, *c)),
        d => candle_core::bail!("{name}: expected (R, N, C), got {d:?}"),
    }
}

// ----------------------------------------------------------------------------- RowRms

/// `sqrt(mean(x^2) + eps)` per row of x (R, K) -> (R, 1).
#[derive(Debug, Clone, Copy)]
pub struct RowRms {
    pub eps: f64,
}

impl RowRms {
    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(self)
    }

    fn run<T: Float + Send + Sync>(&self, x: &[T], k: usize) -> Vec<T> {
        x.par_chunks(k)
            .map(|row| {
                let ss: f64 = row
                    .iter()
                    .map(|&v| v.to_f64().unwrap_or(f64::NAN).powi(2))
                    .sum();
                T::from((ss / k as f64 + self.eps).sqrt()).unwrap_or(T::nan())
            })
            .collect()
    }
}

impl CustomOp1 for RowRms {
    fn name(&self) -> &'static str {
        "row-rms"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        let (r, k) = dims2(self.name(), l)?;
        let out = by_dtype!(self.name(), s.dtype(), |T| {
            T::to_cpu_storage_owned(self.run::<T>(storage_slice(self.name(), s, l)?, k))
        });
        Ok((out, Shape::from((r, 1))))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // d rms / d x_i = x_i / (K rms)
        let k = x.dim(1)? as f64;
        let scale = (g.detach() / (res.detach() * k)?)?; // (R, 1)
        Ok(Some(x.detach().broadcast_mul(&scale)?))
    }
}

// --------------------------------------------------------------------------- Sinkhorn

/// The combination matrices from their logits (R, N, N).
#[derive(Debug, Clone, Copy)]
pub struct Sinkhorn {
    pub iters: usize,
    pub eps: f64,
}

/// One normalisation: divide by the sums over the first index `j` (columns) or over
/// the second `n` (rows).
#[derive(Clone, Copy)]
enum Axis {
    Columns,
    Rows,
}

impl Sinkhorn {
    pub fn apply(self, logits: &Tensor) -> candle_core::Result<Tensor> {
        logits.contiguous()?.apply_op1(self)
    }

    /// The normalisations in order: columns, then (rows, columns) x (iters - 1).
    fn steps(&self) -> Vec<Axis> {
        let mut s = vec![Axis::Columns];
        for _ in 1..self.iters.max(1) {
            s.extend([Axis::Rows, Axis::Columns]);
        }
        s
    }

    /// Sums of m (N x N, `[j * n + k]`) along the axis: sums[i] for column / row i.
    fn sums<T: Float>(m: &[T], n: usize, axis: Axis) -> Vec<T> {
        (0..n)
            .map(|i| {
                (0..n).fold(T::zero(), |acc, o| {
                    acc + match axis {
                        Axis::Columns => m[o * n + i],
                        Axis::Rows => m[i * n + o],
                    }
                })
            })
            .collect()
    }

    /// Row's forward, recording the input of every normalisation in `trace` (one N^2
    /// block per step) when given. Returns the softmax (before + eps) too.
    fn row_forward<T: Float>(
        &self,
        z: &[T],
        n: usize,
        mut trace: Option<&mut Vec<T>>,
    ) -> (Vec<T>, Vec<T>) {
        let eps = T::from(self.eps).unwrap_or(T::nan());
        let mut p = vec![T::zero(); n * n];
        for (zr, pr) in z.chunks_exact(n).zip(p.chunks_exact_mut(n)) {
            let max = zr.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
            let mut sum = T::zero();
            for (o, &v) in pr.iter_mut().zip(zr) {
                *o = (v - max).exp();
                sum = sum + *o;
            }
            for o in pr.iter_mut() {
                *o = *o / sum;
            }
        }
        let mut m: Vec<T> = p.iter().map(|&v| v + eps).collect();
        for axis in self.steps() {
            if let Some(t) = trace.as_deref_mut() {
                t.extend_from_slice(&m);
            }
            let s = Self::sums(&m, n, axis);
            for j in 0..n {
                for k in 0..n {
                    let i = match axis {
                        Axis::Columns => k,
                        Axis::Rows => j,
                    };
                    m[j * n + k] = m[j * n + k] / (s[i] + eps);
                }
            }
        }
        (m, p)
    }

    fn run<T: Float + Send + Sync>(&self, z: &[T], n: usize) -> Vec<T> {
        let mut out = vec![T::zero(); z.len()];
        out.par_chunks_mut(n * n)
            .zip(z.par_chunks(n * n))
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(o, zr)| o.copy_from_slice(&self.row_forward(zr, n, None).0));
        out
    }

    fn run_backward<T: Float + Send + Sync>(&self, z: &[T], g: &[T], n: usize) -> Vec<T> {
        let eps = T::from(self.eps).unwrap_or(T::nan());
        let steps = self.steps();
        let mut dz = vec![T::zero(); z.len()];
        dz.par_chunks_mut(n * n)
            .zip(z.par_chunks(n * n).zip(g.par_chunks(n * n)))
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(dz, (zr, gr))| {
                let mut trace = Vec::with_capacity(steps.len() * n * n);
                let (_, p) = self.row_forward(zr, n, Some(&mut trace));
                let mut dm = gr.to_vec();
                for (step, &axis) in steps.iter().enumerate().rev() {
                    let x = &trace[step * n * n..(step + 1) * n * n];
                    let s = Self::sums(x, n, axis);
                    // y = x / (s_i + eps): dx = dy / (s_i + eps) - sum_o(dy x) / (s_i + eps)^2
                    let mut dot = vec![T::zero(); n];
                    for j in 0..n {
                        for k in 0..n {
                            let i = match axis {
                                Axis::Columns => k,
                                Axis::Rows => j,
                            };
                            dot[i] = dot[i] + dm[j * n + k] * x[j * n + k];
                        }
                    }
                    for j in 0..n {
                        for k in 0..n {
                            let i = match axis {
                                Axis::Columns => k,
                                Axis::Rows => j,
                            };
                            let d = s[i] + eps;
                            dm[j * n + k] = dm[j * n + k] / d - dot[i] / (d * d);
                        }
                    }
                }
                // softmax per row of z: dz = p (dp - sum(p dp)); + eps passes dm through.
                for ((dzr, pr), dr) in dz
                    .chunks_exact_mut(n)
                    .zip(p.chunks_exact(n))
                    .zip(dm.chunks_exact(n))
                {
                    let dot = pr.iter().zip(dr).fold(T::zero(), |a, (&p, &d)| a + p * d);
                    for ((o, &p), &d) in dzr.iter_mut().zip(pr).zip(dr) {
                        *o = p * (d - dot);
                    }
                }
            });
        dz
    }
}

impl CustomOp1 for Sinkhorn {
    fn name(&self) -> &'static str {
        "sinkhorn"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        let (_, n, n2) = dims3(self.name(), l)?;
        if n != n2 {
            candle_core::bail!("sinkhorn: matrices {n} x {n2} are not square");
        }
        let out = by_dtype!(self.name(), s.dtype(), |T| {
            T::to_cpu_storage_owned(self.run::<T>(storage_slice(self.name(), s, l)?, n))
        });
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, z: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let n = z.dim(1)?;
        let dz = by_dtype!(self.name(), z.dtype(), |T| {
            Tensor::from_vec(
                self.run_backward::<T>(&host::<T>(z)?, &host::<T>(&g.to_dtype(z.dtype())?)?, n),
                z.shape(),
                z.device(),
            )?
        });
        Ok(Some(dz))
    }
}

// --------------------------------------------------------------------- StreamCollapse

/// `sum_n w_n x_n`: streams (R, N, C), weights (R, N) -> (R, C).
#[derive(Debug, Clone, Copy)]
pub struct StreamCollapse;

impl StreamCollapse {
    pub fn apply(streams: &Tensor, weights: &Tensor) -> candle_core::Result<Tensor> {
        streams
            .contiguous()?
            .apply_op2(&weights.contiguous()?, StreamCollapse)
    }
}

fn collapse<T: Float + Send + Sync>(x: &[T], w: &[T], n: usize, c: usize) -> Vec<T> {
    let mut out = vec![T::zero(); x.len() / n];
    out.par_chunks_mut(c)
        .with_min_len(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(r, o)| {
            for j in 0..n {
                let wj = w[r * n + j];
                let xj = &x[(r * n + j) * c..(r * n + j + 1) * c];
                for (o, &v) in o.iter_mut().zip(xj) {
                    *o = *o + wj * v;
                }
            }
        });
    out
}

impl CustomOp2 for StreamCollapse {
    fn name(&self) -> &'static str {
        "stream-collapse"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &Layout,
        s2: &candle_core::CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        let (r, n, c) = dims3(self.name(), l1)?;
        if dims2(self.name(), l2)? != (r, n) {
            candle_core::bail!(
                "stream-collapse: weights {:?} for streams {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let out = by_dtype!(self.name(), s1.dtype(), |T| {
            T::to_cpu_storage_owned(collapse::<T>(
                storage_slice(self.name(), s1, l1)?,
                storage_slice(self.name(), s2, l2)?,
                n,
                c,
            ))
        });
        Ok((out, Shape::from((r, c))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (r, n, c) = x.dims3()?;
        by_dtype!(self.name(), x.dtype(), |T| {
            let (xs, ws, gs) = (
                host::<T>(x)?,
                host::<T>(w)?,
                host::<T>(&g.to_dtype(x.dtype())?)?,
            );
            // dx_n = w_n g; dw_n = <x_n, g>
            let mut dx = vec![0 as T; xs.len()];
            let mut dw = vec![0 as T; ws.len()];
            dx.par_chunks_mut(n * c)
                .zip(dw.par_chunks_mut(n))
                .enumerate()
                .with_min_len(ROWS_PER_TASK)
                .for_each(|(row, (dxr, dwr))| {
                    let gr = &gs[row * c..(row + 1) * c];
                    for j in 0..n {
                        let xj = &xs[(row * n + j) * c..(row * n + j + 1) * c];
                        let wj = ws[row * n + j];
                        let mut dot = 0 as T;
                        for ((o, &gv), &xv) in dxr[j * c..(j + 1) * c].iter_mut().zip(gr).zip(xj) {
                            *o = wj * gv;
                            dot += gv * xv;
                        }
                        dwr[j] = dot;
                    }
                });
            Ok((
                Some(Tensor::from_vec(dx, (r, n, c), x.device())?),
                Some(Tensor::from_vec(dw, (r, n), x.device())?),
            ))
        })
    }
}

// ------------------------------------------------------------------------ StreamMerge

/// `x'_n = post_n f + sum_j comb[j, n] x_j`: streams (R, N, C), mixes (R, N + N^2), f
/// (R, C) -> (R, N, C).
#[derive(Debug, Clone, Copy)]
pub struct StreamMerge;

impl StreamMerge {
    pub fn apply(streams: &Tensor, mixes: &Tensor, out: &Tensor) -> candle_core::Result<Tensor> {
        streams
            .contiguous()?
            .apply_op3(&mixes.contiguous()?, &out.contiguous()?, StreamMerge)
    }
}

fn merge<T: Float + Send + Sync>(x: &[T], m: &[T], f: &[T], n: usize, c: usize) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    let width = n + n * n;
    out.par_chunks_mut(n * c)
        .with_min_len(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(r, o)| {
            let (post, comb) = m[r * width..(r + 1) * width].split_at(n);
            let fr = &f[r * c..(r + 1) * c];
            for k in 0..n {
                let ok = &mut o[k * c..(k + 1) * c];
                for (o, &v) in ok.iter_mut().zip(fr) {
                    *o = post[k] * v;
                }
                for j in 0..n {
                    let w = comb[j * n + k];
                    let xj = &x[(r * n + j) * c..(r * n + j + 1) * c];
                    for (o, &v) in ok.iter_mut().zip(xj) {
                        *o = *o + w * v;
                    }
                }
            }
        });
    out
}

impl CustomOp3 for StreamMerge {
    fn name(&self) -> &'static str {
        "stream-merge"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &Layout,
        s2: &candle_core::CpuStorage,
        l2: &Layout,
        s3: &candle_core::CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        let (r, n, c) = dims3(self.name(), l1)?;
        if dims2(self.name(), l2)? != (r, n + n * n) || dims2(self.name(), l3)? != (r, c) {
            candle_core::bail!(
                "stream-merge: mixes {:?} and output {:?} for streams {:?}",
                l2.dims(),
                l3.dims(),
                l1.dims()
            );
        }
        let out = by_dtype!(self.name(), s1.dtype(), |T| {
            T::to_cpu_storage_owned(merge::<T>(
                storage_slice(self.name(), s1, l1)?,
                storage_slice(self.name(), s2, l2)?,
                storage_slice(self.name(), s3, l3)?,
                n,
                c,
            ))
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        m: &Tensor,
        f: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (r, n, c) = x.dims3()?;
        let width = n + n * n;
        by_dtype!(self.name(), x.dtype(), |T| {
            let (xs, ms, fs) = (host::<T>(x)?, host::<T>(m)?, host::<T>(f)?);
            let gs = host::<T>(&g.to_dtype(x.dtype())?)?;
            let mut dx = vec![0 as T; xs.len()];
            let mut dm = vec![0 as T; ms.len()];
            let mut df = vec![0 as T; fs.len()];
            dx.par_chunks_mut(n * c)
                .zip(dm.par_chunks_mut(width).zip(df.par_chunks_mut(c)))
                .enumerate()
                .with_min_len(ROWS_PER_TASK)
                .for_each(|(row, (dxr, (dmr, dfr)))| {
                    let (post, comb) = ms[row * width..(row + 1) * width].split_at(n);
                    let (dpost, dcomb) = dmr.split_at_mut(n);
                    let fr = &fs[row * c..(row + 1) * c];
                    let gr = &gs[row * n * c..(row + 1) * n * c];
                    let xr = &xs[row * n * c..(row + 1) * n * c];
                    for k in 0..n {
                        let gk = &gr[k * c..(k + 1) * c];
                        // d post_k = <g_k, f>; d f += post_k g_k
                        let mut dot = 0 as T;
                        for ((o, &gv), &fv) in dfr.iter_mut().zip(gk).zip(fr) {
                            *o += post[k] * gv;
                            dot += gv * fv;
                        }
                        dpost[k] = dot;
                        for j in 0..n {
                            // d comb[j, k] = <x_j, g_k>; d x_j += comb[j, k] g_k
                            let w = comb[j * n + k];
                            let xj = &xr[j * c..(j + 1) * c];
                            let mut dot = 0 as T;
                            for ((o, &gv), &xv) in
                                dxr[j * c..(j + 1) * c].iter_mut().zip(gk).zip(xj)
                            {
                                *o += w * gv;
                                dot += gv * xv;
                            }
                            dcomb[j * n + k] = dot;
                        }
                    }
                });
            Ok((
                Some(Tensor::from_vec(dx, (r, n, c), x.device())?),
                Some(Tensor::from_vec(dm, (r, width), x.device())?),
                Some(Tensor::from_vec(df, (r, c), x.device())?),
            ))
        })
    }
}

// ------------------------------------------------------------------------- references

/// Plain reference of [`Sinkhorn`] for one N x N matrix of logits (f64).
pub fn sinkhorn_reference(z: &[f64], n: usize, iters: usize, eps: f64) -> Vec<f64> {
    let mut m = vec![0.0; n * n];
    for j in 0..n {
        let row = &z[j * n..(j + 1) * n];
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
        for k in 0..n {
            m[j * n + k] = (row[k] - max).exp() / sum + eps;
        }
    }
    let normalise_columns = |m: &mut Vec<f64>| {
        for k in 0..n {
            let s: f64 = (0..n).map(|j| m[j * n + k]).sum();
            for j in 0..n {
                m[j * n + k] /= s + eps;
            }
        }
    };
    normalise_columns(&mut m);
    for _ in 1..iters {
        for j in 0..n {
            let s: f64 = m[j * n..(j + 1) * n].iter().sum();
            for v in &mut m[j * n..(j + 1) * n] {
                *v /= s + eps;
            }
        }
        normalise_columns(&mut m);
    }
    m
}

/// Plain reference of [`StreamMerge`] for one row: streams (N, C), post (N), comb
/// (N, N) `[j * N + k]`, f (C) -> (N, C).
pub fn merge_reference(x: &[f64], post: &[f64], comb: &[f64], f: &[f64], n: usize) -> Vec<f64> {
    let c = f.len();
    let mut out = vec![0.0; n * c];
    for k in 0..n {
        for i in 0..c {
            out[k * c + i] =
                post[k] * f[i] + (0..n).map(|j| comb[j * n + k] * x[j * c + i]).sum::<f64>();
        }
    }
    out
}
