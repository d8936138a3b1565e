//! Each hand-written kernel against its plain reference on fresh random inputs of
//! awkward sizes, at whatever instruction-set level the calling test binary allows
//! (`simd::set_max_level` is process-wide, so each level runs in its own binary:
//! `portable_kernels.rs`, `avx2_kernels.rs`; the others run the widest path). Every
//! binary that includes it also includes `common`.
#![allow(dead_code)]

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparrow::formats::ggml::GgmlType;
use sparrow::kernels::hmatmul::{self, HalfKind, HalfMatrix};
use sparrow::kernels::indexer::{self, IndexShape, KeyPrecision, KeyStore, ScoreAct, TopkQueries};
use sparrow::kernels::kv_rows::KvRows;
use sparrow::kernels::qmatmul::{qxwt, reference, QMatrix};
use sparrow::kernels::sparse_attention::{self, SparseDims};
use sparrow::kernels::topk::{topk_by_sort, NONE};
use sparrow::kernels::{decode_attention, matmul, simd};

pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

/// max |a - b| / max |b|.
pub fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / b.iter().fold(0.0f32, |m, y| m.max(y.abs())).max(1e-30)
}

/// Cap the kernels at `level` and run every check there. Returns false (having run
/// nothing) when this CPU lacks `level`.
pub fn all_at(level: simd::Level) -> bool {
    simd::set_max_level(level);
    if simd::level() != level {
        eprintln!("this CPU has no {level:?} path: nothing to check");
        return false;
    }
    attention_and_indexer();
    f32_products();
    half_products();
    quantized_products(11);
    extreme_q8_0_weights_and_activations_do_not_saturate();
    cross_entropy_f32();
    true
}

/// The fused cross-entropy in f32 (vectorised exp, sums in lanes) against its f64 path
/// (libm exp, row order) on the same logits: loss and gradient, rows of awkward widths
/// (tails of every length, one lane, the vocabulary of 8192 + 1) and a wide spread whose
/// small terms underflow.
pub fn cross_entropy_f32() {
    use candle_core::{DType, Device, Tensor, Var};
    use sparrow::kernels::cross_entropy::CrossEntropy;
    let grad = |x: &Var, loss: &Tensor| -> Vec<f32> {
        let g = loss.backward().unwrap();
        let g = g.get(x.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
        g.flatten_all().unwrap().to_vec1().unwrap()
    };
    for &(n, v, spread) in &[
        (1usize, 1usize, 6.0f32),
        (3, 2, 6.0),
        (7, 13, 6.0),
        (4, 16, 6.0),
        (5, 17, 6.0),
        (33, 1001, 6.0),
        (3, 8193, 6.0),
        (6, 300, 90.0),
    ] {
        let vals: Vec<f32> = rand_vec(n * v, (n * v) as u64)
            .iter()
            .map(|x| x * spread)
            .collect();
        let targets: Vec<u32> = (0..n).map(|i| ((i * 7919) % v) as u32).collect();
        let t = Tensor::from_vec(targets, n, &Device::Cpu).unwrap();
        let x32 = Var::from_tensor(&Tensor::from_vec(vals.clone(), (n, v), &Device::Cpu).unwrap())
            .unwrap();
        let x64 = Var::from_tensor(&x32.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
        let l32 = CrossEntropy::apply(x32.as_tensor(), &t).unwrap();
        let l64 = CrossEntropy::apply(x64.as_tensor(), &t).unwrap();
        let (a, b): (f32, f64) = (l32.to_scalar().unwrap(), l64.to_scalar().unwrap());
        assert!(
            ((a as f64 - b) / b.abs().max(1e-30)).abs() < 2e-6,
            "loss {n}x{v} spread {spread}: {a} vs {b}"
        );
        let g32 = grad(&x32, &(l32 * 2.5).unwrap());
        let g64 = grad(&x64, &(l64 * 2.5).unwrap());
        let err = max_rel(&g32, &g64);
        assert!(err < 1e-5, "gradient {n}x{v} spread {spread}: {err:e}");
    }
}

/// Dense decode and causal prefill (per-head and lane paths, the MLA latent store),
/// sparse attention, and the indexer's top-k.
pub fn attention_and_indexer() {
    // Dense decode, lane path (16 heads over one KV head) and per-head path.
    for &(h, kv, s, d) in &[
        (16usize, 1usize, 2999usize, 64usize),
        (12, 1, 130, 20),
        (4, 2, 77, 24),
        // Per-head groups of 3 (SmolLM2), 7, 5, 1 (multi-head), key blocks and tails.
        (9, 3, 1031, 64),
        (7, 1, 200, 40),
        (10, 2, 67, 20),
        (3, 3, 65, 13),
        // Values of 64 columns a pass, then 16, then single columns.
        (6, 2, 129, 88),
    ] {
        let (q, k, v) = (
            rand_vec(h * d, 1),
            rand_vec(kv * s * d, 2),
            rand_vec(kv * s * d, 3),
        );
        let scale = 1.0 / (d as f32).sqrt();
        let rows = KvRows::separate(&k, &v, kv, d);
        let got = decode_attention::decode(&q, rows, s, scale);
        let want = decode_attention::reference(&q, rows, s, scale).unwrap();
        assert!(max_rel(&got, &want) < 1e-5, "decode ({h},{kv},{s},{d})");
    }
    // Causal prefill (lanes of several queries with per-lane limits) against decoding
    // each query over its own prefix.
    for &(h, kv, t, d) in &[
        (9usize, 3usize, 21usize, 16usize),
        (16, 1, 7, 24),
        (9, 3, 150, 64),
        (2, 1, 70, 12),
    ] {
        let (q, k, v) = (
            rand_vec(t * h * d, 21),
            rand_vec(kv * t * d, 22),
            rand_vec(kv * t * d, 23),
        );
        let rows = KvRows::separate(&k, &v, kv, d);
        let got = decode_attention::prefill_at(&q, rows, t, 0, 0.25);
        for ti in 0..t {
            let want =
                decode_attention::reference(&q[ti * h * d..(ti + 1) * h * d], rows, ti + 1, 0.25)
                    .unwrap();
            let row = &got[ti * h * d..(ti + 1) * h * d];
            assert!(
                max_rel(row, &want) < 1e-5,
                "prefill ({h},{kv},{t},{d}) query {ti}"
            );
        }
    }
    // The MLA latent store (values = the first dv of each key row), lanes and per-head.
    for &(h, s, dk, dv) in &[(16usize, 301usize, 45usize, 37usize), (5, 90, 20, 12)] {
        let (q, k) = (rand_vec(h * dk, 11), rand_vec(s * dk, 12));
        let rows = KvRows::key_prefix(&k, dk, dv);
        let got = decode_attention::decode(&q, rows, s, 0.2);
        let want = decode_attention::reference(&q, rows, s, 0.2).unwrap();
        assert!(
            max_rel(&got, &want) < 1e-5,
            "latent decode ({h},{s},{dk},{dv})"
        );
    }
    // Sparse attention, f32 fast path vs the generic kernel.
    let dims = SparseDims {
        b: 2,
        t: 5,
        h: 16,
        kv: 1,
        s: 37,
        d: 24,
        k: 9,
    };
    let q = rand_vec(2 * 5 * 16 * 24, 4);
    let k = rand_vec(2 * 37 * 24, 5);
    let v = rand_vec(2 * 37 * 24, 6);
    let idx: Vec<u32> = (0..2 * 5 * 9)
        .map(|i| {
            if i % 9 == 8 {
                NONE
            } else {
                ((i * 7) % 37) as u32
            }
        })
        .collect();
    let fast = sparse_attention::forward_f32(dims, 0.3, &q, &k, &v, &idx).unwrap();
    let generic = sparse_attention::forward(dims, 0.3, &q, &k, &v, &idx).unwrap();
    assert!(max_rel(&fast, &generic) < 1e-5);
    half_cache_attention();
    // Indexer top-k: prefill and decode equal the sort of the full scores.
    let shape = IndexShape {
        heads: 3,
        dim: 13,
        act: ScoreAct::Relu,
    };
    let (t, s, kk) = (9usize, 200usize, 31usize);
    let (iq, iw) = (rand_vec(t * 3 * 13, 7), rand_vec(t * 3, 8));
    let mut store = KeyStore::new(13, KeyPrecision::Int8);
    store.extend_rows(&rand_vec(s * 13, 9));
    let rows = [TopkQueries {
        q: &iq,
        w: &iw,
        offset: s - t,
    }];
    let got = indexer::topk_prefill(&rows, &[&store], shape, t, kk);
    let scores = indexer::scores_reference(&rows[0], &store, shape, t);
    for ti in 0..t {
        let visible = s - t + ti + 1;
        assert_eq!(
            &got[ti * kk..(ti + 1) * kk],
            &topk_by_sort(&scores[ti * s..ti * s + visible], kk)[..]
        );
    }
    let dec = indexer::topk_decode(&iq[(t - 1) * 39..], &iw[(t - 1) * 3..], &store, shape, kk);
    assert_eq!(dec, got[(t - 1) * kk..].to_vec());
}

/// The attention kernels over an f16 cache (rows widened in registers or per key
/// block) against the reference over the same rows: dense decode (per-head and lane
/// paths), causal prefill, the latent store, and sparse attention against the same
/// selection over the rows widened to f32 beforehand.
pub fn half_cache_attention() {
    let half = |x: &[f32]| -> Vec<f16> { x.iter().map(|&v| f16::from_f32(v)).collect() };
    let wide = |x: &[f16]| -> Vec<f32> { x.iter().map(|v| v.to_f32()).collect() };
    for &(h, kv, s, d) in &[
        (9usize, 3usize, 1031usize, 64usize),
        (16, 1, 300, 64),
        (5, 1, 77, 20),
    ] {
        let (q, k, v) = (
            rand_vec(h * d, 31),
            half(&rand_vec(kv * s * d, 32)),
            half(&rand_vec(kv * s * d, 33)),
        );
        let scale = 1.0 / (d as f32).sqrt();
        let rows = KvRows::separate(&k, &v, kv, d);
        let got = decode_attention::decode(&q, rows, s, scale);
        let want = decode_attention::reference(&q, rows, s, scale).unwrap();
        assert!(max_rel(&got, &want) < 1e-5, "f16 decode ({h},{kv},{s},{d})");
        // Causal prefill of the last 70 positions over the rest.
        let t = 70;
        let qt = rand_vec(t * h * d, 34);
        let got = decode_attention::prefill_at(&qt, rows, t, s - t, scale);
        for ti in [0, t / 2, t - 1] {
            let want = decode_attention::reference(
                &qt[ti * h * d..][..h * d],
                rows,
                s - t + ti + 1,
                scale,
            )
            .unwrap();
            assert!(
                max_rel(&got[ti * h * d..][..h * d], &want) < 1e-5,
                "f16 prefill ({h},{kv},{s},{d}) query {ti}"
            );
        }
        // Sparse: the same selection over f16 rows and over their f32 widening.
        let idx: Vec<u32> = (0..2 * 40)
            .map(|i| {
                if i % 13 == 5 {
                    NONE
                } else {
                    ((i * 37) % s) as u32
                }
            })
            .collect();
        let qs = rand_vec(2 * h * d, 35);
        let got = sparse_attention::attend_selected(&qs, rows, 2, &idx, scale);
        let (kw, vw) = (wide(&k), wide(&v));
        let want = sparse_attention::attend_selected(
            &qs,
            KvRows::separate(&kw, &vw, kv, d),
            2,
            &idx,
            scale,
        );
        assert!(max_rel(&got, &want) < 1e-6, "f16 sparse ({h},{kv},{s},{d})");
    }
    for &(h, s, dk, dv) in &[(16usize, 301usize, 45usize, 37usize), (5, 90, 20, 12)] {
        let (q, k) = (rand_vec(h * dk, 36), half(&rand_vec(s * dk, 37)));
        let rows = KvRows::key_prefix(&k, dk, dv);
        let got = decode_attention::decode(&q, rows, s, 0.2);
        let want = decode_attention::reference(&q, rows, s, 0.2).unwrap();
        assert!(
            max_rel(&got, &want) < 1e-5,
            "f16 latent decode ({h},{s},{dk},{dv})"
        );
    }
}

/// The f32 inference product (`kernels::matmul`): against the f64 reference, each row
/// alone the same bits as in the batch. Returns every product for comparisons across
/// levels.
pub fn f32_products() -> Vec<Vec<f32>> {
    let mut outs = Vec::new();
    for (i, &(m, k, n)) in [
        (1usize, 7usize, 5usize),
        (3, 33, 17),
        (4, 256, 130),
        (9, 64, 1000),
        (17, 100, 3),
        (16, 576, 37),
    ]
    .iter()
    .enumerate()
    {
        let x = rand_vec(m * k, 40 + i as u64);
        let w = rand_vec(n * k, 60 + i as u64);
        let y = matmul::xwt(&x, &w, m, k, n);
        let r = matmul::reference(&x, &w, m, k, n);
        let err = max_rel(&y, &r);
        assert!(err < 1e-5, "({m}, {k}, {n}): rel err {err:e}");
        for row in 0..m {
            let alone = matmul::xwt(&x[row * k..(row + 1) * k], &w, 1, k, n);
            assert_eq!(
                alone,
                y[row * n..(row + 1) * n],
                "({m}, {k}, {n}) row {row}"
            );
        }
        outs.push(y);
    }
    outs
}

/// The f16 / bf16 product (`kernels::hmatmul`): against the f64 reference, each row
/// alone the same bits as in the batch, each matrix of a fused call (`xwt_many`) the
/// same bits as alone. Sizes cover partial panels, tiles of 1-3 panels, several tasks
/// and row tiles of 1-8. Returns every product for comparisons across levels.
pub fn half_products() -> Vec<Vec<f32>> {
    let mut outs = Vec::new();
    for kind in [HalfKind::F16, HalfKind::Bf16] {
        let sizes = [
            (1usize, 7usize),
            (5, 16),
            (37, 33),
            (64, 100),
            (9, 577),
            (150, 21),
        ];
        for &(rows, cols) in &sizes {
            let w = HalfMatrix::from_f32(kind, rows, cols, &rand_vec(rows * cols, 1));
            let back = w.to_f32();
            let other = HalfMatrix::from_f32(kind, 19, cols, &rand_vec(19 * cols, 3));
            for (i, v) in rand_vec(rows * cols, 1).into_iter().enumerate() {
                assert_eq!(
                    back[i],
                    kind.to_f32(kind.from_f32(v)),
                    "{kind:?} unpacked {i}"
                );
            }
            for m in [1usize, 2, 3, 4, 5, 9, 16, 17] {
                let x = rand_vec(m * cols, 2 + m as u64);
                let fused = hmatmul::xwt_many(&x, m, &[&w, &other]);
                assert_eq!(fused[0], hmatmul::xwt(&x, m, &w), "{kind:?} fused first");
                assert_eq!(
                    fused[1],
                    hmatmul::xwt(&x, m, &other),
                    "{kind:?} fused second"
                );
                let x = rand_vec(m * cols, 2 + m as u64);
                let want = hmatmul::reference(&x, m, &w);
                let got = hmatmul::xwt(&x, m, &w);
                let tag = format!("{kind:?} {rows}x{cols} m={m} {:?}", simd::level());
                assert!(crate::common::rel_err_f64(&got, &want) < 1e-5, "{tag}");
                for i in 0..m {
                    let alone = hmatmul::xwt(&x[i * cols..(i + 1) * cols], 1, &w);
                    assert_eq!(alone, got[i * rows..(i + 1) * rows], "{tag}: row {i}");
                }
                outs.push(got);
            }
        }
    }
    outs
}

/// Random blocks of `ty`: random nibbles / int8 values with small finite scales.
pub fn random_matrix(rng: &mut ChaCha8Rng, ty: GgmlType, rows: usize, cols: usize) -> QMatrix {
    QMatrix::new(ty, rows, cols, random_blocks(rng, ty, rows, cols)).unwrap()
}

/// The encoded bytes of a random (rows, cols) matrix of a native quantized type: random
/// quants, small random scales (and Q4_1 minimums).
pub fn random_blocks(rng: &mut ChaCha8Rng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let nb = rows * cols / 32;
    let mut data = Vec::with_capacity(nb * ty.block_bytes());
    for _ in 0..nb {
        let mut block: Vec<u8> = (0..ty.block_bytes()).map(|_| rng.random()).collect();
        let d = half::f16::from_f32(rng.random_range(-0.02..0.02));
        block[..2].copy_from_slice(&d.to_le_bytes());
        if ty == GgmlType::Q4_1 {
            let m = half::f16::from_f32(rng.random_range(-0.1..0.1));
            block[2..4].copy_from_slice(&m.to_le_bytes());
        }
        data.extend(block);
    }
    data
}

/// Every native quantized type on awkward sizes: against the reference's integer
/// arithmetic, within quantization error of the f32 product, each row batch-invariant.
pub fn quantized_products(seed: u64) {
    let tag = format!("{:?}", simd::level());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        for (m, rows, cols) in [
            (1, 1, 32),
            (3, 7, 96),
            (5, 65, 544),
            (33, 130, 64),
            (2, 200, 1536),
            // 11 blocks: a group of eight, a pair, a single block.
            (4, 9, 352),
        ] {
            let w = random_matrix(&mut rng, ty, rows, cols);
            let x: Vec<f32> = (0..m * cols).map(|_| rng.random_range(-3.0..3.0)).collect();
            let got = qxwt(&x, m, &w);
            let want = reference(&x, m, &w);
            let err = max_rel(&got, &want);
            assert!(
                err < 2e-6,
                "{} {m}x{cols} * {rows}: rel err {err:e} ({tag})",
                ty.name()
            );
            // Within quantization error of the f32 product with the dequantized weight.
            let wf = w.dequantize();
            let exact: Vec<f32> = (0..m)
                .flat_map(|r| {
                    let (x, wf) = (&x, &wf);
                    (0..rows).map(move |c| {
                        (0..cols)
                            .map(|i| x[r * cols + i] * wf[c * cols + i])
                            .sum::<f32>()
                    })
                })
                .collect();
            let err = max_rel(&got, &exact);
            // (Q4_1 carries the f16-rounded activation sums of ggml's Q8_1 blocks.)
            assert!(err < 0.1, "{}: {err:e} from the f32 product", ty.name());
            // Batch invariance: each row alone gives the same bits as in the batch.
            for r in [0, m - 1] {
                let alone = qxwt(&x[r * cols..(r + 1) * cols], 1, &w);
                assert_eq!(
                    alone,
                    got[r * rows..(r + 1) * rows],
                    "{} row {r}",
                    ty.name()
                );
            }
        }
    }
}

/// Every Q8_0 weight byte -128 against activations at +-127 after quantization.
pub fn extreme_q8_0_weights_and_activations_do_not_saturate() {
    // Every weight byte -128 against activations at +-127 after quantization: the
    // largest 16-bit pair sums any int8 path forms (2 * 128 * 127 = 32512).
    let (rows, cols) = (3, 64);
    let mut data = Vec::new();
    for _ in 0..rows * cols / 32 {
        data.extend(half::f16::from_f32(0.01).to_le_bytes());
        data.extend([0x80u8; 32]);
    }
    let w = QMatrix::new(GgmlType::Q8_0, rows, cols, data).unwrap();
    for sign in [1.0f32, -1.0] {
        let x = vec![sign * 2.0; 2 * cols];
        let got = qxwt(&x, 2, &w);
        let want = reference(&x, 2, &w);
        assert!(
            max_rel(&got, &want) < 2e-6,
            "sign {sign}: {got:?} vs {want:?}"
        );
    }
}
