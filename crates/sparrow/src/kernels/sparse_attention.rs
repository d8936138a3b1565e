//! Sparse attention over the top-k selected positions (DSA), forward and backward.
//!
//! Shapes: q (B, T, H, D); k, v (B, KV, S, D) with H = KV * G (MQA: KV = 1, every
//! query head reads the same gathered rows); idx (B, T, K) positions from the indexer,
//! [`NONE`] = unused slot. The selection is shared by all heads of a token (DeepSeek).
//! For query t, head h in group g:
//!   l_i = scale * q_h . k_g[idx_i],  p = softmax(l) over the valid slots,
//!   out_h = sum_i p_i v_g[idx_i].
//! Backward (recomputing p from q, k rather than storing it):
//!   dp_i = dout_h . v_i,  ds_i = p_i (dp_i - sum_j p_j dp_j),
//!   dq_h = scale sum_i ds_i k_i,  dk_i += scale ds_i q_h,  dv_i += p_i dout_h.
//! The straight-through gate of the `mlp_gate` indexer multiplies each selected weight by
//! m_i = 1 + sigma_i - stopgrad(sigma_i) (exactly 1 forward); its gradient
//! dL/dsigma_i = sum_h p_hi dp_hi is [`SteGate`]'s backward.
//!
//! Cost per token: O(K * H * D), independent of S. Each gathered key row is read once
//! per KV head and reused by the G query heads of the group.

use super::dot;
use super::kv_rows::{CacheElem, KvRows, Values};
use super::simd::{fast_exp, has_avx512};
use super::storage_slice;
use super::topk::NONE;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;
use std::sync::Arc;

/// Float types the attention kernels run in (f32 fast path, f64 for gradient checks).
pub trait AttnFloat: Float + Send + Sync + Default + std::iter::Sum + 'static {
    fn fexp(self) -> Self;
}
impl AttnFloat for f32 {
    #[inline(always)]
    fn fexp(self) -> Self {
        fast_exp(self)
    }
}
impl AttnFloat for f64 {
    #[inline(always)]
    fn fexp(self) -> Self {
        self.exp()
    }
}

/// Sizes of one sparse attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseDims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub kv: usize,
    pub s: usize,
    pub d: usize,
    /// Slots per query (K).
    pub k: usize,
}

impl SparseDims {
    fn check(&self, q: usize, k: usize, v: usize, idx: usize) -> candle_core::Result<()> {
        let SparseDims {
            b,
            t,
            h,
            kv,
            s,
            d,
            k: kk,
        } = *self;
        if kv == 0 || h % kv != 0 {
            candle_core::bail!("sparse-attention: {kv} KV heads do not divide {h} heads");
        }
        if q != b * t * h * d || k != b * kv * s * d || v != k || idx != b * t * kk {
            candle_core::bail!(
                "sparse-attention: sizes q {q}, k {k}, v {v}, idx {idx} do not match {self:?}"
            );
        }
        Ok(())
    }
}

/// Whether slot value `i` names one of the `s` positions (not [`NONE`] padding).
#[inline(always)]
fn slot_valid(i: u32, s: usize) -> bool {
    i != NONE && (i as usize) < s
}

#[inline(always)]
fn axpy<T: AttnFloat>(y: &mut [T], a: T, x: &[T]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = *o + a * v;
    }
}

/// Softmax weights of one head over its valid slots, in place on `l` (logits in, p out).
#[inline(always)]
fn softmax_in_place<T: AttnFloat>(l: &mut [T], valid: &[bool]) {
    let mut m = T::neg_infinity();
    for (&x, &ok) in l.iter().zip(valid) {
        if ok && x > m {
            m = x;
        }
    }
    if m == T::neg_infinity() {
        l.iter_mut().for_each(|x| *x = T::zero());
        return;
    }
    let mut sum = T::zero();
    for (x, &ok) in l.iter_mut().zip(valid) {
        *x = if ok { (*x - m).fexp() } else { T::zero() };
        sum = sum + *x;
    }
    let inv = T::one() / sum;
    l.iter_mut().for_each(|x| *x = *x * inv);
}

/// Per-token work buffers.
struct Scratch<T> {
    /// (G, K) logits, then probabilities.
    p: Vec<T>,
    valid: Vec<bool>,
}

/// Forward for one (batch row, query): writes out (H, D).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn token_forward<T: AttnFloat>(
    dims: SparseDims,
    scale: T,
    q: &[T],       // (H, D) of this token
    k: &[T],       // (KV, S, D) of this row
    v: &[T],       // (KV, S, D)
    idx: &[u32],   // (K)
    out: &mut [T], // (H, D)
    sc: &mut Scratch<T>,
) {
    let SparseDims {
        h, kv, s, d, k: kk, ..
    } = dims;
    let g = h / kv;
    for (slot, &i) in idx.iter().enumerate() {
        sc.valid[slot] = slot_valid(i, s);
    }
    out.iter_mut().for_each(|x| *x = T::zero());
    for grp in 0..kv {
        let kg = &k[grp * s * d..(grp + 1) * s * d];
        let vg = &v[grp * s * d..(grp + 1) * s * d];
        for (slot, &i) in idx.iter().enumerate() {
            if !sc.valid[slot] {
                continue;
            }
            let krow = &kg[i as usize * d..(i as usize + 1) * d];
            for hh in 0..g {
                let head = grp * g + hh;
                sc.p[hh * kk + slot] = scale * dot(&q[head * d..(head + 1) * d], krow);
            }
        }
        for hh in 0..g {
            softmax_in_place(&mut sc.p[hh * kk..(hh + 1) * kk], &sc.valid);
        }
        for (slot, &i) in idx.iter().enumerate() {
            if !sc.valid[slot] {
                continue;
            }
            let vrow = &vg[i as usize * d..(i as usize + 1) * d];
            for hh in 0..g {
                let head = grp * g + hh;
                let p = sc.p[hh * kk + slot];
                axpy(&mut out[head * d..(head + 1) * d], p, vrow);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
fn token_forward_avx512<T: AttnFloat>(
    dims: SparseDims,
    scale: T,
    q: &[T],
    k: &[T],
    v: &[T],
    idx: &[u32],
    out: &mut [T],
    sc: &mut Scratch<T>,
) {
    token_forward(dims, scale, q, k, v, idx, out, sc)
}

/// Sparse attention forward on slices: out (B, T, H, D).
pub fn forward<T: AttnFloat>(
    dims: SparseDims,
    scale: f64,
    q: &[T],
    k: &[T],
    v: &[T],
    idx: &[u32],
) -> candle_core::Result<Vec<T>> {
    dims.check(q.len(), k.len(), v.len(), idx.len())?;
    let SparseDims {
        t,
        h,
        kv,
        s,
        d,
        k: kk,
        ..
    } = dims;
    let scale = T::from(scale).expect("scale fits");
    let mut out = vec![T::zero(); q.len()];
    let avx512 = has_avx512();
    out.par_chunks_mut(h * d)
        .with_min_len((64 / kk.max(1)).max(1))
        .enumerate()
        .for_each_init(
            || Scratch {
                p: vec![T::zero(); (h / kv) * kk],
                valid: vec![false; kk],
            },
            |sc, (bt, o)| {
                let bi = bt / t.max(1);
                let qs = &q[bt * h * d..(bt + 1) * h * d];
                let ks = &k[bi * kv * s * d..(bi + 1) * kv * s * d];
                let vs = &v[bi * kv * s * d..(bi + 1) * kv * s * d];
                let ids = &idx[bt * kk..(bt + 1) * kk];
                #[cfg(target_arch = "x86_64")]
                if avx512 {
                    // SAFETY: AVX-512F presence was checked at run time (`has_avx512`);
                    // the call only touches the slices passed in.
                    unsafe { token_forward_avx512(dims, scale, qs, ks, vs, ids, o, sc) };
                    return;
                }
                let _ = avx512;
                token_forward(dims, scale, qs, ks, vs, ids, o, sc)
            },
        );
    Ok(out)
}

/// [`forward`] for f32 through [`attend_selected`], one batch row after another.
pub fn forward_f32(
    dims: SparseDims,
    scale: f64,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    idx: &[u32],
) -> candle_core::Result<Vec<f32>> {
    dims.check(q.len(), k.len(), v.len(), idx.len())?;
    let SparseDims {
        b,
        t,
        h,
        kv,
        s,
        d,
        k: kk,
    } = dims;
    let mut out = Vec::with_capacity(q.len());
    for bi in 0..b {
        let rows = KvRows::separate(
            &k[bi * kv * s * d..(bi + 1) * kv * s * d],
            &v[bi * kv * s * d..(bi + 1) * kv * s * d],
            kv,
            d,
        );
        out.extend(attend_selected(
            &q[bi * t * h * d..(bi + 1) * t * h * d],
            rows,
            t,
            &idx[bi * t * kk..(bi + 1) * t * kk],
            scale as f32,
        ));
    }
    Ok(out)
}

/// Sparse attention of `t` queries q (t, H, dk) over their selected rows of `rows`
/// (any entry store): idx (t, K) positions, [`NONE`] = unused slot -> out (t, H, dv).
/// Per token and KV group the selected key rows (and value rows, when they are
/// separate) are gathered into contiguous buffers and attended by the decode kernel's
/// `attend_rows` (16 heads per vector lane group when G >= 8), so each gathered row is
/// read once for all heads of its group. A query with no valid slot gets zeros.
pub fn attend_selected<E: CacheElem>(
    q: &[f32],
    rows: KvRows<E>,
    t: usize,
    idx: &[u32],
    scale: f32,
) -> Vec<f32> {
    rows.check();
    let (kv, dk, dv) = (rows.groups, rows.dk, rows.dv);
    if t == 0 {
        return Vec::new();
    }
    let h = q.len() / (t * dk);
    let g = h / kv;
    let kk = idx.len() / t;
    assert_eq!(
        q.len(),
        t * kv * g * dk,
        "sparse attention: queries are not (t, H, dk)"
    );
    assert_eq!(
        idx.len(),
        t * kk,
        "sparse attention: selection is not (t, K)"
    );
    let separate = matches!(rows.values, Values::Separate(_));
    let mut out = vec![0.0f32; t * h * dv];
    // Queries per task: enough selected rows (64) to outlast its scheduling.
    let per = (64 / kk.max(1)).max(1);
    super::pool::for_each_chunk_mut(&mut out, per * h * dv, |c, block| {
        let (mut kraw, mut vraw): (Vec<E>, Vec<E>) =
            (Vec::with_capacity(kk * dk), Vec::with_capacity(kk * dv));
        let (mut kwide, mut vwide) = (Vec::new(), Vec::new());
        for (j, o) in block.chunks_mut(h * dv).enumerate() {
            let ti = c * per + j;
            let ids = &idx[ti * kk..(ti + 1) * kk];
            for grp in 0..kv {
                let rg = rows.group(grp);
                // Gather the selected rows as stored, then widen them at once (f32
                // rows are used as gathered).
                kraw.clear();
                vraw.clear();
                for &i in ids.iter().filter(|&&i| slot_valid(i, rows.cap)) {
                    kraw.extend_from_slice(rg.key(i as usize));
                    if separate {
                        vraw.extend_from_slice(rg.value(i as usize));
                    }
                }
                let kbuf = E::widen(&kraw, &mut kwide);
                let vbuf = E::widen(&vraw, &mut vwide);
                let og = &mut o[grp * g * dv..(grp + 1) * g * dv];
                let n = kbuf.len() / dk;
                if n == 0 {
                    og.iter_mut().for_each(|x| *x = 0.0);
                    continue;
                }
                let gathered = KvRows {
                    k: kbuf,
                    values: if separate {
                        Values::Separate(vbuf)
                    } else {
                        Values::KeyPrefix
                    },
                    groups: 1,
                    cap: n,
                    dk,
                    dv,
                };
                let qo = (ti * h + grp * g) * dk;
                super::decode_attention::attend_rows(&q[qo..qo + g * dk], &gathered, n, scale, og);
            }
        }
    });
    out
}

/// Gradients of one sparse attention call.
pub struct SparseGrads<T> {
    /// (B, T, H, D)
    pub dq: Vec<T>,
    /// (B, KV, S, D)
    pub dk: Vec<T>,
    /// (B, KV, S, D)
    pub dv: Vec<T>,
    /// (B, T, K): sum over heads of p_i * (dout . v_i), the gradient of the
    /// straight-through multiplier.
    pub dgate: Vec<T>,
}

/// Backward on slices, from the output gradient `g` (B, T, H, D).
pub fn backward<T: AttnFloat>(
    dims: SparseDims,
    scale: f64,
    q: &[T],
    k: &[T],
    v: &[T],
    idx: &[u32],
    g: &[T],
) -> candle_core::Result<SparseGrads<T>> {
    dims.check(q.len(), k.len(), v.len(), idx.len())?;
    if g.len() != q.len() {
        candle_core::bail!(
            "sparse-attention backward: grad size {} != {}",
            g.len(),
            q.len()
        );
    }
    let SparseDims {
        t,
        h,
        kv,
        s,
        d,
        k: kk,
        ..
    } = dims;
    let gs = h / kv;
    let scale = T::from(scale).expect("scale fits");
    let mut dq = vec![T::zero(); q.len()];
    let mut dk = vec![T::zero(); k.len()];
    let mut dv = vec![T::zero(); v.len()];
    let mut dgate = vec![T::zero(); idx.len()];
    let row_q = t * h * d;
    let row_kv = kv * s * d;
    dq.par_chunks_mut(row_q.max(1))
        .zip(dk.par_chunks_mut(row_kv.max(1)))
        .zip(dv.par_chunks_mut(row_kv.max(1)))
        .zip(dgate.par_chunks_mut((t * kk).max(1)))
        .enumerate()
        .for_each(|(bi, (((dq, dk), dv), dgate))| {
            let qb = &q[bi * row_q..(bi + 1) * row_q];
            let gb = &g[bi * row_q..(bi + 1) * row_q];
            let kb = &k[bi * row_kv..(bi + 1) * row_kv];
            let vb = &v[bi * row_kv..(bi + 1) * row_kv];
            let mut p = vec![T::zero(); kk];
            let mut dp = vec![T::zero(); kk];
            let mut valid = vec![false; kk];
            for ti in 0..t {
                let ids = &idx[(bi * t + ti) * kk..(bi * t + ti + 1) * kk];
                for (slot, &i) in ids.iter().enumerate() {
                    valid[slot] = slot_valid(i, s);
                }
                for grp in 0..kv {
                    let kg = &kb[grp * s * d..(grp + 1) * s * d];
                    let vg = &vb[grp * s * d..(grp + 1) * s * d];
                    for hh in 0..gs {
                        let head = grp * gs + hh;
                        let qo = (ti * h + head) * d;
                        let qh = &qb[qo..qo + d];
                        let gh = &gb[qo..qo + d];
                        for (slot, &i) in ids.iter().enumerate() {
                            if valid[slot] {
                                let i = i as usize;
                                p[slot] = scale * dot(qh, &kg[i * d..(i + 1) * d]);
                                dp[slot] = dot(gh, &vg[i * d..(i + 1) * d]);
                            }
                        }
                        softmax_in_place(&mut p, &valid);
                        let mut sum_pdp = T::zero();
                        for slot in 0..kk {
                            if valid[slot] {
                                sum_pdp = sum_pdp + p[slot] * dp[slot];
                            }
                        }
                        let dqh = &mut dq[qo..qo + d];
                        for (slot, &i) in ids.iter().enumerate() {
                            if !valid[slot] {
                                continue;
                            }
                            let i = i as usize;
                            let ds = p[slot] * (dp[slot] - sum_pdp) * scale;
                            axpy(dqh, ds, &kg[i * d..(i + 1) * d]);
                            axpy(&mut dk[(grp * s + i) * d..(grp * s + i + 1) * d], ds, qh);
                            axpy(
                                &mut dv[(grp * s + i) * d..(grp * s + i + 1) * d],
                                p[slot],
                                gh,
                            );
                            dgate[ti * kk + slot] = dgate[ti * kk + slot] + p[slot] * dp[slot];
                        }
                    }
                }
            }
        });
    Ok(SparseGrads { dq, dk, dv, dgate })
}

/// How per-head attention probabilities become one distribution per query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadCombine {
    /// The heads' mean.
    Mean,
    /// Each position's largest probability over the heads, renormalised to sum to 1.
    Max,
}

/// The main attention's probabilities over the selected slots with the heads combined
/// by `combine`, (B, T, K), no grad: the distillation target of the indexer in sparse
/// training (DeepSeek-V3.2 takes the heads' mean).
pub fn selected_probs<T: AttnFloat>(
    dims: SparseDims,
    scale: f64,
    q: &[T],
    k: &[T],
    idx: &[u32],
    combine: HeadCombine,
) -> candle_core::Result<Vec<T>> {
    dims.check(q.len(), k.len(), k.len(), idx.len())?;
    let SparseDims {
        t,
        h,
        kv,
        s,
        d,
        k: kk,
        ..
    } = dims;
    let gs = h / kv;
    let scale = T::from(scale).expect("scale fits");
    let inv_h = T::one() / T::from(h).expect("h fits");
    let mut out = vec![T::zero(); idx.len()];
    out.par_chunks_mut(kk.max(1))
        .enumerate()
        .for_each(|(bt, o)| {
            let bi = bt / t.max(1);
            let ids = &idx[bt * kk..(bt + 1) * kk];
            let valid: Vec<bool> = ids.iter().map(|&i| slot_valid(i, s)).collect();
            let mut p = vec![T::zero(); kk];
            for grp in 0..kv {
                let kg = &k[(bi * kv + grp) * s * d..(bi * kv + grp + 1) * s * d];
                for hh in 0..gs {
                    let qo = (bt * h + grp * gs + hh) * d;
                    for (slot, &i) in ids.iter().enumerate() {
                        if valid[slot] {
                            let i = i as usize;
                            p[slot] = scale * dot(&q[qo..qo + d], &kg[i * d..(i + 1) * d]);
                        }
                    }
                    softmax_in_place(&mut p, &valid);
                    for (a, &x) in o.iter_mut().zip(&p) {
                        *a = match combine {
                            HeadCombine::Mean => *a + x * inv_h,
                            HeadCombine::Max => a.max(x),
                        };
                    }
                }
            }
            if combine == HeadCombine::Max {
                let total = o.iter().fold(T::zero(), |acc, &x| acc + x);
                if total > T::zero() {
                    o.iter_mut().for_each(|x| *x = *x / total);
                }
            }
        });
    Ok(out)
}

/// The sparse attention op for autograd: inputs q (B, T, H, D), k, v (B, KV, S, D);
/// the selection is data of the op (it has no gradient).
#[derive(Debug, Clone)]
pub struct SparseAttention {
    pub dims: SparseDims,
    pub scale: f64,
    /// (B, T, K) selected positions, [`NONE`]-padded.
    pub idx: Arc<Vec<u32>>,
}

impl SparseAttention {
    /// out (B, T, H, D) = sparse attention of q over the selected rows of k, v.
    pub fn apply(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, self.clone())
    }

    fn grads(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<[Tensor; 4]> {
        let dims = self.dims;
        let dev = q.device();
        let (q, k, v, g) = (
            q.contiguous()?.flatten_all()?,
            k.contiguous()?.flatten_all()?,
            v.contiguous()?.flatten_all()?,
            g.contiguous()?.flatten_all()?,
        );
        let shape_q = (dims.b, dims.t, dims.h, dims.d);
        let shape_kv = (dims.b, dims.kv, dims.s, dims.d);
        let shape_i = (dims.b, dims.t, dims.k);
        Ok(super::by_dtype!("sparse-attention", q.dtype(), |T| {
            let r = backward::<T>(
                dims,
                self.scale,
                &q.to_vec1::<T>()?,
                &k.to_vec1::<T>()?,
                &v.to_vec1::<T>()?,
                &self.idx,
                &g.to_vec1::<T>()?,
            )?;
            [
                Tensor::from_vec(r.dq, shape_q, dev)?,
                Tensor::from_vec(r.dk, shape_kv, dev)?,
                Tensor::from_vec(r.dv, shape_kv, dev)?,
                Tensor::from_vec(r.dgate, shape_i, dev)?,
            ]
        }))
    }
}

impl CustomOp3 for SparseAttention {
    fn name(&self) -> &'static str {
        "sparse-attention"
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
        let dims = self.dims;
        let name = self.name();
        let (idx, scale) = (&self.idx, self.scale);
        // f32 takes the vectorised forward, f64 (the tests' finite differences) the plain one.
        let out = match s1.dtype() {
            DType::F32 => {
                let (q, k, v) = (
                    storage_slice(name, s1, l1)?,
                    storage_slice(name, s2, l2)?,
                    storage_slice(name, s3, l3)?,
                );
                CpuStorage::F32(forward_f32(dims, scale, q, k, v, idx)?)
            }
            DType::F64 => {
                let (q, k, v) = (
                    storage_slice(name, s1, l1)?,
                    storage_slice(name, s2, l2)?,
                    storage_slice(name, s3, l3)?,
                );
                CpuStorage::F64(forward(dims, scale, q, k, v, idx)?)
            }
            other => candle_core::bail!("{name}: unsupported dtype {other:?}"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dq, dk, dv, _] = self.grads(q, k, v, grad_res)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The straight-through term of the gated sparse attention: input sigma (B, T, K),
/// output `sum_i p_i (sigma_i - stopgrad(sigma_i)) v_i` (B, T, H, D), which is exactly
/// zero; its gradient is `dL/dsigma_i = sum_h p_hi (dout_h . v_i)`. Adding it to the
/// [`SparseAttention`] output gives the attention with weights multiplied by
/// m = 1 + sigma - stopgrad(sigma).
#[derive(Debug, Clone)]
pub struct SteGate {
    pub attn: SparseAttention,
    /// The attention inputs (detached): p and v are needed for the gradient.
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
}

impl SteGate {
    pub fn apply(&self, sigma: &Tensor) -> candle_core::Result<Tensor> {
        sigma.contiguous()?.apply_op1(self.clone())
    }
}

impl CustomOp1 for SteGate {
    fn name(&self) -> &'static str {
        "ste-gate"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.attn.dims;
        if l.shape().elem_count() != d.b * d.t * d.k {
            candle_core::bail!(
                "ste-gate: gate shape {:?} is not (B, T, K) of {d:?}",
                l.shape()
            );
        }
        let n = d.b * d.t * d.h * d.d;
        let out = super::by_dtype!(self.name(), s.dtype(), |T| {
            T::to_cpu_storage_owned(vec![T::default(); n])
        });
        Ok((out, Shape::from((d.b, d.t, d.h, d.d))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let [_, _, _, dgate] = self.attn.grads(&self.q, &self.k, &self.v, grad_res)?;
        Ok(Some(dgate))
    }
}

/// Calls `f` with each head's scaled logits of query `bt` (of q (B, T, H, D)) over
/// the first `visible` keys of its KV group (k (B, KV, S, D)): the shared inner loop
/// of [`selected_mass`] and [`best_mass`].
fn each_head_logits(
    dims: SparseDims,
    scale: f32,
    q: &[f32],
    k: &[f32],
    bt: usize,
    visible: usize,
    mut f: impl FnMut(&[f32]),
) {
    let SparseDims { t, h, kv, s, d, .. } = dims;
    let (bi, gs) = (bt / t.max(1), h / kv);
    let mut logits = vec![0.0f32; visible];
    for grp in 0..kv {
        let kg = &k[(bi * kv + grp) * s * d..(bi * kv + grp + 1) * s * d];
        for hh in 0..gs {
            let qo = (bt * h + grp * gs + hh) * d;
            let qh = &q[qo..qo + d];
            for (j, l) in logits.iter_mut().enumerate() {
                *l = scale * dot(qh, &kg[j * d..(j + 1) * d]);
            }
            f(&logits);
        }
    }
}

/// The share of softmax(`logits`) on the positions `ids` names (`NONE` and ids past
/// the logits skipped), in f64.
fn softmax_mass_on(logits: &[f32], ids: &[u32]) -> f64 {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    let total: f64 = logits.iter().map(|&x| ((x - m) as f64).exp()).sum();
    let picked: f64 = ids
        .iter()
        .filter(|&&i| slot_valid(i, logits.len()))
        .map(|&i| ((logits[i as usize] - m) as f64).exp())
        .sum();
    picked / total
}

/// Indexer recall: for each query (B, T), the share of the dense causal attention mass,
/// averaged over heads, that falls on its selected positions. q (B, T, H, D); k
/// (B, KV, S, D); query t sits at position `offset + t`. Queries with t < `from` are
/// skipped (reported as NaN). O(T * S * H * D), no grad.
pub fn selected_mass(
    dims: SparseDims,
    scale: f64,
    q: &[f32],
    k: &[f32],
    idx: &[u32],
    offset: usize,
    from: usize,
) -> candle_core::Result<Vec<f32>> {
    dims.check(q.len(), k.len(), k.len(), idx.len())?;
    let SparseDims { t, h, s, k: kk, .. } = dims;
    let scale = scale as f32;
    let mut out = vec![0.0f32; dims.b * t];
    out.par_iter_mut().enumerate().for_each(|(bt, o)| {
        let ti = bt % t.max(1);
        if ti < from {
            *o = f32::NAN;
            return;
        }
        let visible = (offset + ti + 1).min(s);
        let ids = &idx[bt * kk..(bt + 1) * kk];
        let mut mass = 0.0f64;
        each_head_logits(dims, scale, q, k, bt, visible, |logits| {
            mass += softmax_mass_on(logits, ids)
        });
        *o = (mass / h as f64) as f32;
    });
    Ok(out)
}

/// The best recall any selection of `dims.k` positions could reach: for each query
/// (B, T), the dense causal attention averaged over heads, and the sum of its `k`
/// largest probabilities (the oracle top-k: the bound an indexer's [`selected_mass`]
/// is compared with). Same layout and skipping as [`selected_mass`]. O(T * S * H * D).
pub fn best_mass(
    dims: SparseDims,
    scale: f64,
    q: &[f32],
    k: &[f32],
    offset: usize,
    from: usize,
) -> candle_core::Result<Vec<f32>> {
    dims.check(q.len(), k.len(), k.len(), dims.b * dims.t * dims.k)?;
    let SparseDims { t, h, s, k: kk, .. } = dims;
    let scale = scale as f32;
    let mut out = vec![0.0f32; dims.b * t];
    out.par_iter_mut().enumerate().for_each(|(bt, o)| {
        let ti = bt % t.max(1);
        if ti < from {
            *o = f32::NAN;
            return;
        }
        let visible = (offset + ti + 1).min(s);
        if visible <= kk {
            *o = 1.0;
            return;
        }
        let mut p = vec![0.0f64; visible];
        each_head_logits(dims, scale, q, k, bt, visible, |logits| {
            let m = logits.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
            let z: f64 = logits.iter().map(|&x| ((x - m) as f64).exp()).sum();
            for (pj, &x) in p.iter_mut().zip(logits) {
                *pj += ((x - m) as f64).exp() / z;
            }
        });
        // The k largest: partition around the k-th largest, sum the top side.
        p.select_nth_unstable_by(kk - 1, |a, b| b.total_cmp(a));
        *o = (p[..kk].iter().sum::<f64>() / h as f64) as f32;
    });
    Ok(out)
}

/// [`selected_mass`] of one query over a cache: the engine's sampled recall. q (H, dk)
/// sits at the last of `visible` positions; `rows` holds the keys (each of its groups
/// serves H / groups heads); `idx` its selection (`NONE` and slots past `visible` are
/// skipped). Returns the share of the dense attention mass on the selection, averaged
/// over heads. O(H * visible * dk).
pub fn selected_mass_cached<E: CacheElem>(
    q: &[f32],
    rows: &KvRows<'_, E>,
    h: usize,
    visible: usize,
    idx: &[u32],
    scale: f32,
) -> f32 {
    let (groups, dk) = (rows.groups.max(1), rows.dk);
    let gs = (h / groups).max(1);
    let visible = visible.min(rows.cap);
    let mut logits = vec![0.0f32; visible];
    let mut widened = Vec::new();
    let mut mass = 0.0f64;
    for hh in 0..h {
        let g = rows.group(hh / gs);
        let qh = &q[hh * dk..(hh + 1) * dk];
        for (j, l) in logits.iter_mut().enumerate() {
            *l = scale * dot(qh, E::widen(g.key(j), &mut widened));
        }
        mass += softmax_mass_on(&logits, idx);
    }
    (mass / h as f64) as f32
}
