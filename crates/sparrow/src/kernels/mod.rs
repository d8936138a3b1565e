//! Our own CPU kernels, each a candle custom op with a backward pass, and each with a
//! plain reference (`reference.rs`, built from candle's composable ops) that the tests
//! compare it with on random inputs of awkward sizes.
//!
//! - [`softmax::CausalSoftmax`]: `softmax(scale * scores + causal mask)` in one parallel
//!   pass per row (attention), and its backward.
//! - [`adamw`]: AdamW's update in one in-place pass per parameter (training).
//! - [`cross_entropy::CrossEntropy`]: mean NLL of targets under logits in one pass, and its
//!   backward `(softmax - onehot) / N`.
//! - [`linear_cross_entropy`]: the LM head and the cross-entropy fused for training,
//!   in row chunks: the (N, V) logits never enter the autograd graph.
//! - [`indexer`]: DSA indexer scoring fused with a streaming top-k ([`topk`]); the
//!   [queries x keys] score matrix is never materialised. [`index_int8`]: the int8
//!   index cache's keys and integer (VNNI) scoring.
//! - [`selected_scores::SelectedScores`]: the indexer's differentiable scores of each
//!   query's selected positions (the sparse stage's KL), with backward; the gathered
//!   (B * T, K, di) keys never enter the autograd graph.
//! - [`sparse_attention::SparseAttention`]: attention over the selected positions, with
//!   backward, and the straight-through gate [`sparse_attention::SteGate`].
//! - [`decode_attention`]: dense flash-decoding of one query over a KV cache, and
//!   causal prefill over it, for every entry store ([`kv_rows::KvRows`]).
//! - [`const_matmul::ConstWeightMatmul`]: `x W^T` for a frozen weight in training, its
//!   backward `dx` alone (candle's would compute and keep a weight-sized dW too).
//! - [`matmul`]: `x W^T` for inference rows, batch-invariant (each output one fixed-order
//!   dot product), each weight row read once per four rows.
//! - [`lanes_avx2`]: the AVX2 build of the f32 weight kernel's 16-lane tile (and the
//!   8-wide weight widening the f16 / bf16 kernel shares);
//!   `attention_avx2` the AVX2 builds of the attention scans, `attention_avx512` the
//!   AVX-512 build of the small-group decode scan.
//! - [`hmatmul`]: `x W^T` with f16 / bf16 weights packed in 16-row panels and widened
//!   in registers (inference).
//! - [`experts`]: MoE dispatch: rows grouped by expert, gathered once, and the weighted
//!   combine back per token, with backward passes.
//! - [`hyper`]: the hyper-connections' row norm, Sinkhorn normalisation, stream
//!   collapse and merge (V4), each one op with its backward.
//! - [`rms_norm::WeightedRmsNorm`]: RMSNorm with its weight in one pass, and both
//!   gradients in one more (one activation per norm kept for the backward, not three).
//! - [`rotary::PairRotation`]: RoPE of the trailing dims in interleaved pairs (V4) in
//!   one pass, its backward the inverse rotation.
//! - [`swiglu::SwiGlu`]: the feed-forward's activation `silu(gate) * up` (with V4's
//!   clamp) in one pass, and both gradients in one more.
//! - [`simd`]: a vectorisable `exp` and AVX-512 detection for the hot loops.
//! - [`pool`]: the parallel loop of the inference kernels (workers that spin between
//!   calls; rayon stays for training).

pub mod adamw;
#[cfg(target_arch = "x86_64")]
mod attention_avx2;
#[cfg(target_arch = "x86_64")]
mod attention_avx512;
pub mod const_matmul;
pub mod cross_entropy;
pub mod decode_attention;
pub mod experts;
pub mod hmatmul;
pub mod hyper;
pub mod index_int8;
mod index_shape;
pub mod indexer;
pub mod kv_rows;
pub mod lanes_avx2;
pub mod linear_cross_entropy;
pub mod matmul;
pub mod pool;
pub mod qmatmul;
pub mod reference;
pub mod rms_norm;
pub mod rotary;
mod scan_parts;
pub mod selected_scores;
pub mod simd;
pub mod sink_softmax;
pub mod softmax;
pub mod sparse_attention;
pub mod swiglu;
pub mod topk;

use candle_core::{CpuStorage, Layout};

/// The contiguous f32/f64 slice behind a CPU tensor, or an error naming `op`.
pub(crate) fn contiguous_slice<'a, T: candle_core::WithDType>(
    op: &str,
    data: &'a [T],
    layout: &Layout,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// The contiguous `T` slice behind a CPU storage, or an error naming `op` (a storage of
/// another dtype, a strided layout).
pub(crate) fn storage_slice<'a, T: candle_core::WithDType>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [T]> {
    use candle_core::backend::BackendStorage;
    if storage.dtype() != T::DTYPE {
        candle_core::bail!("{op}: expected {:?}, got {:?}", T::DTYPE, storage.dtype());
    }
    contiguous_slice(op, storage.as_slice::<T>()?, layout)
}

/// Evaluates `$body` with the type alias `$t` set to the float type of `$dtype`: our
/// kernels run in f32, and in f64 for the tests' finite differences; any other dtype is
/// an error naming `$op`. One dispatch for every kernel instead of a match arm per dtype.
macro_rules! by_dtype {
    ($op:expr, $dtype:expr, |$t:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            other => candle_core::bail!("{}: unsupported dtype {other:?}", $op),
        }
    };
}
pub(crate) use by_dtype;

/// A contiguous host copy of `t` in its own dtype, detached (the backward passes get
/// tensors, not storage).
pub(crate) fn host<T: candle_core::WithDType>(
    t: &candle_core::Tensor,
) -> candle_core::Result<Vec<T>> {
    t.detach().contiguous()?.flatten_all()?.to_vec1::<T>()
}

/// `a + b` elementwise, into `a`: the reduction of per-task gradient accumulators.
pub(crate) fn add_parts<T: num_traits::Float>(mut a: Vec<T>, b: Vec<T>) -> Vec<T> {
    for (x, y) in a.iter_mut().zip(b) {
        *x = *x + y;
    }
    a
}

/// Dtype name of a storage, for errors.
pub(crate) fn dtype_name(s: &CpuStorage) -> String {
    use candle_core::backend::BackendStorage;
    format!("{:?}", s.dtype())
}

/// Dot product with 16 lane-wise partial sums (vectorises without reassociating a
/// single running sum), then the lanes in order, then the tail.
#[inline(always)]
pub(crate) fn dot<T: num_traits::Float>(a: &[T], b: &[T]) -> T {
    const L: usize = 16;
    let mut acc = [T::zero(); L];
    let mut ca = a.chunks_exact(L);
    let mut cb = b.chunks_exact(L);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..L {
            acc[l] = acc[l] + x[l] * y[l];
        }
    }
    let mut tail = T::zero();
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        tail = tail + x * y;
    }
    acc.iter().fold(T::zero(), |s, &x| s + x) + tail
}

/// [`dot`] with the 16 lane sums added as a tree (8 + 8, 4 + 4, 2 + 2, 1 + 1: four
/// dependent additions instead of fifteen), a fixed order too: for hot loops whose
/// dot products sit on the critical path (decode attention over a few heads).
#[inline(always)]
pub(crate) fn dot_tree(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let mut ca = a.chunks_exact(L);
    let mut cb = b.chunks_exact(L);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    let mut w = L;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0] + tail
}

/// `0..n` cut into one contiguous part per rayon thread, each at least `min_len` long
/// (a long scan split for parallel partial results that are merged afterwards).
pub(crate) fn thread_parts(n: usize, min_len: usize) -> Vec<std::ops::Range<usize>> {
    let threads = pool::threads();
    let per = n.div_ceil(threads).max(min_len).max(1);
    (0..n).step_by(per).map(|s| s..(s + per).min(n)).collect()
}

/// Rows per rayon task: enough work per task to amortise scheduling.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}
