//! MoE routers and expert execution: the bucketed execution against the per-token
//! reference for every router, finite-difference gradients through the routing weights,
//! capacity placement, group-limited selection, the hash table, the `noaux_bias` bias
//! (a buffer: updated toward balance, never trained, checkpointed), the loss formulas
//! and the utilization metrics.

mod common;
use candle_core::{DType, Device, Tensor, Var};
use common::*;
use sparrow::config::RouterKind;
use sparrow::model::moe::Moe;
use sparrow::model::params::VarStore;
use sparrow::model::router::{
    apply_capacity, demand_capacities, group_limited_top_k, hash_experts, top_k_indices, DROPPED,
};
use sparrow::model::utilization::RoutingStats;
use sparrow::model::Model;
use sparrow::ModelConfig;

const F64: DType = DType::F64;

/// Awkward sizes: 6 experts in 3 groups, top-2, a shared expert, capacity small enough
/// that some slots drop, z-loss on.
fn moe_config(kind: RouterKind) -> ModelConfig {
    let mut cfg = tiny_config();
    cfg.hidden_size = 16;
    cfg.n_routed_experts = 6;
    cfg.num_experts_per_tok = 2;
    cfg.moe_intermediate_size = 7;
    cfg.router_kind = kind;
    cfg.capacity_factor = 0.9;
    cfg.n_group = 3;
    cfg.topk_group = 2;
    cfg.routed_scaling_factor = 1.7;
    cfg.router_z_loss_coef = 1e-3;
    cfg.initializer_range = 0.3;
    cfg.validate().unwrap();
    cfg
}

fn token_ids(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 5) % 500).collect()
}

#[test]
fn bucketed_execution_matches_the_per_token_reference_for_every_router() {
    for kind in RouterKind::ALL {
        let cfg = moe_config(kind);
        let s = VarStore::random(7, F64, &Device::Cpu);
        let moe = Moe::new(&s.root().pp("mlp"), &cfg, 1, 0.3).unwrap();
        let x = randn(&[3, 7, cfg.hidden_size], 11, F64);
        let ids = token_ids(21);
        for capacity in [false, true] {
            let (y, st) = moe.forward(&x, &ids, capacity).unwrap();
            let (y_ref, st_ref) = moe.forward_reference(&x, &ids, capacity).unwrap();
            let err = rel_err(&y, &y_ref);
            assert!(err < 1e-12, "{kind:?} capacity={capacity}: rel err {err:e}");
            assert_eq!(st.routing, st_ref.routing);
            let dropped = st.routing.dropped();
            if capacity && kind.has_capacity() {
                assert!(dropped > 0, "{kind:?}: capacity 0.9 should drop some slots");
            } else {
                assert_eq!(dropped, 0, "{kind:?} capacity={capacity} dropped slots");
            }
        }
    }
}

#[test]
fn gradients_through_routing_weights_for_every_router() {
    for kind in RouterKind::ALL {
        let cfg = moe_config(kind);
        let s = VarStore::random(5, F64, &Device::Cpu);
        let moe = Moe::new(&s.root().pp("mlp"), &cfg, 1, 0.3).unwrap();
        let x = Var::from_tensor(&randn(&[2, 9, cfg.hidden_size], 1, F64)).unwrap();
        let ids = token_ids(18);
        let probe = randn(&[2, 9, cfg.hidden_size], 2, F64);
        let loss = || {
            let (y, st) = moe.forward(x.as_tensor(), &ids, true).unwrap();
            let mut l = (y * &probe).unwrap().sum_all().unwrap();
            // capacity_aware's CV^2 loss has a straight-through gradient (the hard
            // load's value, the soft demand's gradient): checked in its own test.
            if kind != RouterKind::CapacityAware {
                if let Some(a) = st.aux_loss {
                    l = (l + a).unwrap();
                }
            }
            (l + st.z_loss.unwrap()).unwrap()
        };
        let mut vars = s.vars();
        assert!(
            vars.iter()
                .all(|(n, _)| !n.contains("e_score_correction_bias")),
            "the selection bias must not be trainable"
        );
        vars.push(("<input>".into(), x.clone()));
        check_gradients(&vars, loss, 5);
    }
}

#[test]
fn capacity_places_first_choices_before_second_choices() {
    // 4 tokens, k = 2: first choices 0,0,0,1; second choices 1,1,2,0; capacity 2 each.
    let chosen = [0, 1, 0, 1, 0, 2, 1, 0];
    let kept = apply_capacity(&chosen, 2, &[2, 2, 2]);
    // Expert 0: first choices of tokens 0 and 1 fit, token 2's first choice drops, and
    // token 3's second choice (0) drops too. Expert 1: token 3's first choice, then token
    // 0's second choice; token 1's second choice drops.
    assert_eq!(kept, vec![0, 1, 0, DROPPED, DROPPED, 2, 1, DROPPED]);
}

#[test]
fn switch_capacity_caps_every_expert_in_a_batch() {
    let cfg = moe_config(RouterKind::SwitchCapacity);
    let s = VarStore::random(3, F64, &Device::Cpu);
    let moe = Moe::new(&s.root().pp("mlp"), &cfg, 1, 0.3).unwrap();
    let n = 40;
    let x = randn(&[1, n, cfg.hidden_size], 4, F64);
    let (_, st) = moe.forward(&x, &token_ids(n), true).unwrap();
    let cap = (0.9f64 * (n * 2) as f64 / 6.0).ceil() as u64;
    let r = st.routing;
    for (e, (&l, &d)) in r.load.iter().zip(&r.demand).enumerate() {
        assert_eq!(
            l,
            d.min(cap),
            "expert {e}: load {l}, demand {d}, capacity {cap}"
        );
    }
    assert_eq!(r.demand.iter().sum::<u64>(), (n * 2) as u64);
}

#[test]
fn capacity_aware_shares_the_budget_by_soft_demand_with_a_floor() {
    // 4 tokens over 3 experts (binary-exact values); soft demand D = (2.25, 1.5, 0.25).
    let probs = [
        0.75f32, 0.25, 0.0, 0.5, 0.5, 0.0, 0.625, 0.125, 0.25, 0.375, 0.625, 0.0,
    ];
    let caps = demand_capacities(&probs, 3, 2, 1.25, 0.5);
    // ceil(1.25 * 2 * D) = (6, 4, 1); floor = ceil(0.5 * 1.25 * 8 / 3) = 2.
    assert_eq!(caps, vec![6, 4, 2]);
}

#[test]
fn group_limited_selection_stays_inside_the_best_groups() {
    let row = [0.9f32, 0.1, 0.2, 0.8, 0.7, 0.05, 0.3, 0.3, 0.6];
    // Groups (3 x 3): top-2 sums 1.1, 1.5, 0.9 -> groups 1 and 0 stay.
    assert_eq!(group_limited_top_k(&row, 3, 2, 3), vec![0, 3, 4]);
    // One group: the best two experts of group 1.
    assert_eq!(group_limited_top_k(&row, 3, 1, 2), vec![3, 4]);
    // No grouping: plain top-k.
    assert_eq!(group_limited_top_k(&row, 1, 1, 3), top_k_indices(&row, 3));
    // Random rows: every choice lies in at most topk_group groups and is a top-k of the
    // experts of the groups it uses.
    for seed in 0..50u64 {
        let v = common::to_f64_vec(&randn(&[16], seed, F64));
        let row: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        let sel = group_limited_top_k(&row, 4, 2, 3);
        let groups: std::collections::BTreeSet<u32> = sel.iter().map(|e| e / 4).collect();
        assert!(groups.len() <= 2);
        let min_sel = sel
            .iter()
            .map(|&e| row[e as usize])
            .fold(f32::MAX, f32::min);
        assert_eq!(sel.len(), 3);
        for g in &groups {
            for e in g * 4..g * 4 + 4 {
                if !sel.contains(&e) {
                    assert!(row[e as usize] <= min_sel);
                }
            }
        }
    }
}

#[test]
fn hash_table_is_fixed_distinct_and_spreads_the_vocabulary() {
    let (e, k) = (16, 2);
    let mut load = vec![0u32; e];
    for v in 0..20_000u32 {
        let a = hash_experts(v, 3, e, k);
        assert_eq!(a, hash_experts(v, 3, e, k));
        assert_eq!(a.len(), k);
        assert_ne!(a[0], a[1]);
        for x in a {
            load[x as usize] += 1;
        }
    }
    let mean = 40_000.0 / e as f64;
    for (x, &l) in load.iter().enumerate() {
        assert!(
            (l as f64 - mean).abs() < 0.1 * mean,
            "expert {x}: {l} of mean {mean}"
        );
    }
    assert_ne!(
        (0..64)
            .map(|v| hash_experts(v, 0, e, k))
            .collect::<Vec<_>>(),
        (0..64)
            .map(|v| hash_experts(v, 1, e, k))
            .collect::<Vec<_>>(),
        "layers get different tables"
    );
}

#[test]
fn noaux_bias_moves_toward_balance_steers_selection_and_is_checkpointed() {
    let mut cfg = moe_config(RouterKind::NoauxBias);
    cfg.n_group = 1;
    cfg.topk_group = 1;
    cfg.router_bias_update_speed = 0.25;
    let model = Model::new_random(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let name = "model.layers.1.mlp.gate.e_score_correction_bias";
    assert!(model.store.vars().iter().all(|(n, _)| n != name));
    let bias = |m: &Model| -> Vec<f32> {
        let all = m.store.all_tensors();
        let (_, t) = all.iter().find(|(n, _)| n == name).unwrap();
        t.to_vec1().unwrap()
    };
    assert_eq!(bias(&model), vec![0.0; 6]);
    let mut stats = RoutingStats::new(6);
    stats.demand = vec![9, 0, 3, 3, 1, 2]; // mean 3
    model
        .net
        .update_router_biases(&[None, Some(stats)], 1.0)
        .unwrap();
    assert_eq!(bias(&model), vec![-0.25, 0.25, 0.0, 0.0, 0.25, 0.25]);
    // A scaled step (router_bias_update_follows_lr passes lr / peak lr).
    let mut stats = RoutingStats::new(6);
    stats.demand = vec![0, 9, 3, 3, 3, 0];
    model
        .net
        .update_router_biases(&[None, Some(stats)], 0.5)
        .unwrap();
    assert_eq!(bias(&model), vec![-0.125, 0.125, 0.0, 0.0, 0.25, 0.375]);

    // A large bias on expert 4 makes every token choose it (weights still come from the
    // unbiased scores).
    let mut stats = RoutingStats::new(6);
    stats.demand = vec![1, 1, 1, 1, 0, 1];
    for _ in 0..40 {
        model
            .net
            .update_router_biases(&[None, Some(stats.clone())], 1.0)
            .unwrap();
    }
    let ids = Tensor::from_vec(token_ids(10), (1, 10), &Device::Cpu).unwrap();
    let out = model.forward(&ids).unwrap();
    let r = out.diagnostics.layers[1].routing.as_ref().unwrap();
    assert_eq!(r.load[4], 10, "{:?}", r.load);

    // Saved and loaded with the model.
    let dir = tempfile::tempdir().unwrap();
    sparrow::model_dir::save_at(&model, dir.path(), None).unwrap();
    let (back, _) = sparrow::model_dir::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(bias(&back), bias(&model));
}

#[test]
fn noaux_weights_are_normalised_unbiased_scores_times_the_scaling_factor() {
    let cfg = moe_config(RouterKind::NoauxBias);
    let s = VarStore::random(9, F64, &Device::Cpu);
    let moe = Moe::new(&s.root().pp("mlp"), &cfg, 1, 0.3).unwrap();
    let x = randn(&[5, cfg.hidden_size], 3, F64);
    let r = moe.gate.route(&x, &token_ids(5), false).unwrap();
    let w = common::to_f64_vec(&r.weights);
    for t in 0..5 {
        let sum = w[2 * t] + w[2 * t + 1];
        assert!((sum - 1.7).abs() < 1e-12, "token {t}: weights sum {sum}");
    }
}

#[test]
fn z_loss_and_cv2_loss_follow_their_formulas() {
    let cfg = moe_config(RouterKind::CapacityAware);
    let s = VarStore::random(9, F64, &Device::Cpu);
    let moe = Moe::new(&s.root().pp("mlp"), &cfg, 1, 0.3).unwrap();
    let n = 13;
    let x = randn(&[n, cfg.hidden_size], 8, F64);
    let r = moe.gate.route(&x, &token_ids(n), true).unwrap();
    let logits = common::to_f64_vec(&moe.gate.gate.forward(&x).unwrap());
    let z: f64 = logits
        .chunks(6)
        .map(|l| {
            let m = l.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + l.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            lse * lse
        })
        .sum::<f64>()
        / n as f64;
    let got: f64 = r.z_loss.unwrap().to_scalar().unwrap();
    assert!((got - z).abs() < 1e-12 * z.abs(), "z-loss {got} vs {z}");
    // CV^2 of the chosen slots' shares (before the capacity limit).
    let d: Vec<f64> = r.stats.demand.iter().map(|&v| v as f64).collect();
    let mean = d.iter().sum::<f64>() / 6.0;
    let var = d.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 6.0;
    let cv2: f64 = r.aux_loss.clone().unwrap().to_scalar().unwrap();
    assert!((cv2 - var / (mean * mean)).abs() < 1e-12, "cv2 {cv2}");
    // Its gradient pushes the most loaded expert's router probability down: the gate row
    // of that expert moves against the mean input of the tokens.
    let (hot, _) = d
        .iter()
        .enumerate()
        .fold((0, f64::MIN), |a, (i, &v)| if v > a.1 { (i, v) } else { a });
    let g = r.aux_loss.unwrap().backward().unwrap();
    let gw = g.get(&moe.gate.gate.weight().unwrap()).unwrap(); // (E, C)
    let xm = x.mean(0).unwrap(); // (C)
    let along: f64 = (gw.get(hot).unwrap() * xm)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(
        along > 0.0,
        "descending the CV^2 loss must lower the hottest expert's logit"
    );
}

#[test]
fn utilization_metrics_on_known_loads() {
    let s = RoutingStats {
        tokens: 5,
        demand: vec![5, 0, 2, 3],
        load: vec![4, 0, 2, 2],
    };
    let u = s.utilization();
    assert!((u.max_vio - 1.0).abs() < 1e-12);
    assert!((u.cv - (2.0f64).sqrt() / 2.0).abs() < 1e-12);
    assert!((u.entropy - 0.75).abs() < 1e-12);
    assert!((u.drop_rate - 0.2).abs() < 1e-12);
    assert_eq!(u.dead, 1);
    assert!((u.demand_max_vio - (5.0 / 2.5 - 1.0)).abs() < 1e-12);
}

#[test]
fn inference_never_drops_and_cached_decode_matches_the_full_forward() {
    for kind in [
        RouterKind::SwitchCapacity,
        RouterKind::CapacityAware,
        RouterKind::Hash,
    ] {
        let mut cfg = moe_config(kind);
        cfg.hidden_size = 32;
        let model = Model::new_random(&cfg, 2, DType::F32, &Device::Cpu).unwrap();
        let t = 9;
        let ids_v = token_ids(t);
        let ids = Tensor::from_vec(ids_v.clone(), (1, t), &Device::Cpu).unwrap();
        let full = model.forward(&ids).unwrap();
        assert!(full
            .diagnostics
            .routing()
            .iter()
            .flatten()
            .all(|r| r.dropped() == 0));
        let (stepped, cache) = stepped(&model, &ids_v, &vec![1; t]);
        assert_eq!(cache.len(), t);
        let err = rel_err(&stepped, &full.logits);
        assert!(err < 1e-5, "{kind:?}: cached decode differs by {err:e}");
    }
}

/// Random routing of n tokens with k slots over e experts, about a fifth dropped.
fn random_ids(n: usize, k: usize, e: usize, seed: u64) -> Vec<u32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .flat_map(|_| {
            let mut row: Vec<u32> = Vec::new();
            while row.len() < k {
                let x = rng.random_range(0..e as u32);
                if !row.contains(&x) {
                    row.push(x);
                }
            }
            row.into_iter()
                .map(|x| {
                    if rng.random_range(0..5) == 0 {
                        DROPPED
                    } else {
                        x
                    }
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn dispatch_kernels_match_the_index_reference_forward_and_backward() {
    use sparrow::kernels::experts::{CombineSlots, Dispatch, GatherRows};
    use sparrow::kernels::reference::{moe_combine_reference, moe_gather_reference};
    use std::sync::Arc;
    for (n, k, e, c, dtype) in [
        (37, 2, 5, 13, F64),
        (300, 3, 7, 33, DType::F32),
        (1, 1, 1, 5, F64),
    ] {
        let ids = random_ids(n, k, e, n as u64);
        let plan = Arc::new(Dispatch::new(&ids, k, e).unwrap());
        let x = Var::from_tensor(&randn(&[n, c], 1, dtype)).unwrap();
        let w = Var::from_tensor(&randn(&[n, k], 2, dtype)).unwrap();
        let probe = randn(&[n, c], 3, dtype);
        // The same expert computation between gather and combine (a nonlinearity, so the
        // backward of each kernel is exercised with non-trivial upstream gradients).
        let run = |fast: bool| {
            let xg = if fast {
                GatherRows(plan.clone()).apply(x.as_tensor()).unwrap()
            } else {
                moe_gather_reference(x.as_tensor(), &plan).unwrap()
            };
            let ys = xg.tanh().unwrap();
            let y = if fast {
                CombineSlots(plan.clone())
                    .apply(&ys, w.as_tensor())
                    .unwrap()
            } else {
                moe_combine_reference(&ys, w.as_tensor(), &plan).unwrap()
            };
            let loss = (&y * &probe).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            (
                y,
                g.get(x.as_tensor()).unwrap().clone(),
                g.get(w.as_tensor()).unwrap().clone(),
            )
        };
        let (y, dx, dw) = run(true);
        let (y_r, dx_r, dw_r) = run(false);
        let tol = if dtype == F64 { 1e-13 } else { 1e-5 };
        for (name, a, b) in [("y", &y, &y_r), ("dx", &dx, &dx_r), ("dw", &dw, &dw_r)] {
            let err = rel_err(a, b);
            assert!(err < tol, "n={n} k={k} e={e} c={c}: {name} rel err {err:e}");
        }
        // Dropped slots get no weight gradient.
        let dwv = common::to_f64_vec(&dw);
        for (slot, &id) in ids.iter().enumerate() {
            if id == DROPPED {
                assert_eq!(dwv[slot], 0.0);
            }
        }
    }
}

#[test]
fn dispatch_kernel_gradients_match_finite_differences() {
    use sparrow::kernels::experts::{CombineSlots, Dispatch, GatherRows};
    use std::sync::Arc;
    let (n, k, e, c) = (11, 2, 4, 6);
    let plan = Arc::new(Dispatch::new(&random_ids(n, k, e, 9), k, e).unwrap());
    let x = Var::from_tensor(&randn(&[n, c], 4, F64)).unwrap();
    let w = Var::from_tensor(&randn(&[n, k], 5, F64)).unwrap();
    let probe = randn(&[n, c], 6, F64);
    let loss = || {
        let xg = GatherRows(plan.clone()).apply(x.as_tensor()).unwrap();
        let ys = xg.sqr().unwrap();
        let y = CombineSlots(plan.clone())
            .apply(&ys, w.as_tensor())
            .unwrap();
        (y * &probe).unwrap().sum_all().unwrap()
    };
    check_gradients(
        &[("x".into(), x.clone()), ("w".into(), w.clone())],
        loss,
        12,
    );
}

#[test]
fn dispatch_rejects_bad_routing() {
    use sparrow::kernels::experts::Dispatch;
    assert!(
        Dispatch::new(&[0, 1, 2], 2, 3).is_err(),
        "3 slots with k = 2"
    );
    assert!(Dispatch::new(&[0, 5], 2, 3).is_err(), "expert 5 of 3");
    let d = Dispatch::new(&[2, 0, DROPPED, 2], 2, 3).unwrap();
    assert_eq!(d.offsets, vec![0, 1, 1, 3]);
    assert_eq!(d.token_of, vec![0, 0, 1]);
    assert_eq!(d.slot_of, vec![1, 0, 3]);
    assert_eq!(d.pos, vec![1, 0, DROPPED, 2]);
}

/// Host reference of the sequence-wise balance loss: scores (N, E) row-major, chosen
/// (N * k), `sequences` equal sequences.
fn sequence_loss_reference(
    scores: &[f64],
    chosen: &[u32],
    e: usize,
    k: usize,
    sequences: usize,
) -> f64 {
    let n = scores.len() / e;
    let t = n / sequences;
    let mut total = 0.0;
    for b in 0..sequences {
        let mut f = vec![0.0; e];
        let mut p = vec![0.0; e];
        for tok in b * t..(b + 1) * t {
            for j in 0..k {
                f[chosen[tok * k + j] as usize] += e as f64 / (k * t) as f64;
            }
            let row = &scores[tok * e..(tok + 1) * e];
            let sum: f64 = row.iter().sum();
            for (pe, s) in p.iter_mut().zip(row) {
                *pe += s / sum / t as f64;
            }
        }
        total += f.iter().zip(&p).map(|(a, b)| a * b).sum::<f64>();
    }
    total / sequences as f64
}

#[test]
fn sequence_balance_loss_follows_its_formula_and_its_gradient() {
    for kind in [RouterKind::NoauxBias, RouterKind::TopkSoftmax] {
        let mut cfg = moe_config(kind);
        cfg.router_seq_aux_loss_coef = 1e-4;
        let s = VarStore::random(4, F64, &Device::Cpu);
        let moe = Moe::new(&s.root().pp("mlp"), &cfg, 1, 0.3).unwrap();
        let (b, t) = (3, 7);
        let x = randn(&[b * t, cfg.hidden_size], 6, F64);
        let r = moe
            .gate
            .route_sequences(&x, &token_ids(b * t), false, b)
            .unwrap();
        let logits = moe.gate.gate.forward(&x).unwrap();
        let scores = match kind {
            RouterKind::NoauxBias => candle_nn::ops::sigmoid(&logits).unwrap(),
            _ => candle_nn::ops::softmax(&logits, 1).unwrap(),
        };
        let want = sequence_loss_reference(&common::to_f64_vec(&scores), &r.expert_ids, 6, 2, b);
        let got: f64 = r.seq_loss.clone().unwrap().to_scalar().unwrap();
        assert!(
            (got - want).abs() < 1e-12 * want,
            "{kind:?}: {got} vs {want}"
        );
        // One sequence of the same tokens is another loss: sequences are separate.
        let whole: f64 = moe
            .gate
            .route(&x, &token_ids(b * t), false)
            .unwrap()
            .seq_loss
            .unwrap()
            .to_scalar()
            .unwrap();
        let want_whole =
            sequence_loss_reference(&common::to_f64_vec(&scores), &r.expert_ids, 6, 2, 1);
        assert!((whole - want_whole).abs() < 1e-12 * want_whole);
        // Gradient (the selection counts are constants) against finite differences.
        let xv = Var::from_tensor(&x).unwrap();
        let loss = || {
            moe.gate
                .route_sequences(xv.as_tensor(), &token_ids(b * t), false, b)
                .unwrap()
                .seq_loss
                .unwrap()
        };
        // Only the gate and the input reach the routing scores.
        let mut vars: Vec<(String, Var)> = s
            .vars()
            .into_iter()
            .filter(|(n, _)| n.ends_with(".gate.weight"))
            .collect();
        assert_eq!(vars.len(), 1);
        vars.push(("<input>".into(), xv.clone()));
        check_gradients(&vars, loss, 5);
        // Uneven sequences are an error, not a panic.
        let bad = moe.gate.route_sequences(&x, &token_ids(b * t), false, 4);
        assert!(bad.is_err());
    }
    // Off by default: no loss computed.
    let cfg = moe_config(RouterKind::NoauxBias);
    let s = VarStore::random(4, F64, &Device::Cpu);
    let moe = Moe::new(&s.root().pp("mlp"), &cfg, 1, 0.3).unwrap();
    let x = randn(&[6, cfg.hidden_size], 6, F64);
    assert!(moe
        .gate
        .route(&x, &token_ids(6), false)
        .unwrap()
        .seq_loss
        .is_none());
}

#[test]
fn proportional_bias_update_moves_by_the_relative_imbalance() {
    let mut cfg = moe_config(RouterKind::NoauxBias);
    cfg.router_bias_update_speed = 0.25;
    cfg.router_bias_update_rule = sparrow::config::BiasUpdateRule::Proportional;
    let model = Model::new_random(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let mut stats = RoutingStats::new(6);
    stats.demand = vec![9, 0, 3, 3, 1, 2]; // mean 3
    model
        .net
        .update_router_biases(&[None, Some(stats)], 1.0)
        .unwrap();
    let all = model.store.all_tensors();
    let (_, t) = all
        .iter()
        .find(|(n, _)| n == "model.layers.1.mlp.gate.e_score_correction_bias")
        .unwrap();
    let got: Vec<f32> = t.to_vec1().unwrap();
    let want: Vec<f32> = [9.0, 0.0, 3.0, 3.0, 1.0, 2.0]
        .iter()
        .map(|d: &f32| 0.25 * (3.0 - d) / 3.0)
        .collect();
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-7, "{got:?} vs {want:?}");
    }
}
