//! The engine's batched step against the training-style forward: for every attention
//! layout (MHA, GQA, MQA with >= 8 heads per KV head, DSA with either indexer past its
//! top-k, MLA, MLA + DSA) and MoE, the logits of a sequence fed in uneven chunks while
//! other sequences share its steps at other positions equal the full forward's within
//! 1e-5; sampled generation is the same alone and batched; incremental text equals the
//! whole decode; the run lock keeps a second trainer out; `bench generate` counts what a
//! decode step reads.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use sparrow::config::IndexerKind;
use sparrow::engine::detok::Detokenizer;
use sparrow::engine::sampler::SamplerConfig;
use sparrow::engine::{Engine, EngineOptions, FinishReason, Sequence, SequenceParams};
use sparrow::model::cache::SeqCache;
use sparrow::model::step::StepOptions;
use sparrow::model::{Model, StepInput};
use sparrow::tokenizer::Tokenizer;
use sparrow::ModelConfig;

fn ids(n: usize, vocab: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 97 + 13 + seed * 31 + (i * i) % 7) % vocab as u32)
        .collect()
}

fn mqa_wide() -> ModelConfig {
    let mut cfg = tiny_config();
    cfg.hidden_size = 64;
    cfg.num_attention_heads = 8;
    cfg.num_key_value_heads = Some(1);
    cfg.validate().unwrap();
    cfg
}

/// MLA + DSA with 8 heads over the latent (the kernels' 16-lane path) and the
/// non-interleaved RoPE layout.
fn mla_wide() -> ModelConfig {
    let mut cfg = tiny_mla_config(Some(9), Some(9));
    cfg.hidden_size = 32;
    cfg.num_attention_heads = 8;
    cfg.num_key_value_heads = Some(8);
    cfg.rope_interleave = false;
    cfg.validate().unwrap();
    cfg
}

/// Every layout the step serves, named.
fn configs() -> Vec<(&'static str, ModelConfig)> {
    let mut mha = tiny_config();
    mha.num_key_value_heads = Some(4);
    let mut dsa_many_heads = tiny_dsa_config(IndexerKind::Lightning, 9);
    dsa_many_heads.index_n_heads = 16;
    let mut moe_noaux = tiny_config();
    moe_noaux.router_kind = sparrow::config::RouterKind::NoauxBias;
    let mut moe_hash = tiny_config();
    moe_hash.router_kind = sparrow::config::RouterKind::Hash;
    vec![
        ("gqa + moe", tiny_config()),
        ("mha", mha),
        ("mqa 8 heads", mqa_wide()),
        ("dsa lightning", dsa_many_heads),
        ("dsa mlp_gate", tiny_dsa_config(IndexerKind::MlpGate, 9)),
        ("mla", tiny_mla_config(None, None)),
        ("mla + dsa", tiny_mla_config(Some(9), Some(9))),
        ("mla + dsa, 8 heads in lanes, rotate-half RoPE", mla_wide()),
        ("moe noaux_bias", moe_noaux),
        ("moe hash", moe_hash),
    ]
}

fn random_model(cfg: &ModelConfig, seed: u64) -> Model {
    let mut cfg = cfg.clone();
    cfg.initializer_range = 0.2;
    Model::new_random(&cfg, seed, DType::F32, &Device::Cpu).unwrap()
}

/// Feed `main` in the chunks `chunks` (sum = its length) with two other sequences in
/// the same steps (at other positions, one prefilling while the other decodes);
/// returns main's logits, (T, V).
fn stepped_logits(model: &Model, main: &[u32], chunks: &[usize], dense: bool) -> Tensor {
    let n_layers = model.cfg.num_hidden_layers;
    let v = model.cfg.vocab_size;
    let mut caches = [
        SeqCache::new(n_layers, model.cfg.kv_cache_dtype),
        SeqCache::new(n_layers, model.cfg.kv_cache_dtype),
        SeqCache::new(n_layers, model.cfg.kv_cache_dtype),
    ];
    let others = [ids(60, v, 5), ids(60, v, 9)];
    let mut fed = [0usize; 2];
    let mut rows = Vec::new();
    let mut at = 0;
    for (step, &n) in chunks.iter().enumerate() {
        let [c0, c1, c2] = &mut caches;
        let want = [if step % 2 == 0 { 3 } else { 1 }, 1 + step % 3];
        let t1 = &others[0][fed[0]..fed[0] + want[0]];
        let t2 = &others[1][fed[1]..fed[1] + want[1]];
        let mut inputs = vec![
            StepInput {
                tokens: &main[at..at + n],
                cache: c0,
            },
            StepInput {
                tokens: t1,
                cache: c1,
            },
            StepInput {
                tokens: t2,
                cache: c2,
            },
        ];
        let opts = StepOptions {
            all_logits: true,
            dense,
            profile: step == 0,
            telemetry: false,
        };
        let out = model.step(&mut inputs, &opts).unwrap();
        assert_eq!(out.logits.dims(), &[n + want[0] + want[1], v]);
        assert_eq!(out.profile.is_some(), step == 0);
        rows.push(out.logits.narrow(0, 0, n).unwrap());
        at += n;
        fed[0] += want[0];
        fed[1] += want[1];
    }
    assert_eq!(at, main.len());
    assert_eq!(caches[0].len(), main.len());
    Tensor::cat(&rows, 0).unwrap()
}

#[test]
fn step_logits_equal_the_full_forward_for_every_layout() {
    let chunks = [5, 1, 1, 13, 1, 4, 1, 1, 6];
    let t: usize = chunks.iter().sum();
    for (name, cfg) in configs() {
        for seed in [1, 2] {
            let model = random_model(&cfg, seed);
            let x = ids(t, cfg.vocab_size, seed as u32);
            let full = model
                .forward(&Tensor::from_slice(&x, (1, t), &Device::Cpu).unwrap())
                .unwrap()
                .logits
                .squeeze(0)
                .unwrap(); // (T, V)
            let stepped = stepped_logits(&model, &x, &chunks, false);
            let err = rel_err(&stepped, &full);
            assert!(err < 1e-5, "{name} seed {seed}: step differs by {err:e}");
        }
    }
}

#[test]
fn dense_steps_equal_the_dense_twin() {
    // DSA weights stepped with every selector set to all positions equal the same
    // weights without indexers; sparse steps past k do not.
    let chunks = [7, 1, 12, 1, 1];
    let t: usize = chunks.iter().sum();
    for kind in [IndexerKind::Lightning, IndexerKind::MlpGate] {
        let model = random_model(&tiny_dsa_config(kind, 6), 3);
        let mut cfg = model.cfg.clone();
        cfg.layer_types = None;
        let tensors = model
            .store
            .vars()
            .into_iter()
            .filter(|(n, _)| !n.contains(".indexer."))
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        let twin =
            Model::from_tensors(&cfg, tensors, "twin".as_ref(), DType::F32, &Device::Cpu).unwrap();
        let x = ids(t, cfg.vocab_size, 4);
        let dense = stepped_logits(&model, &x, &chunks, true);
        let twin_logits = stepped_logits(&twin, &x, &chunks, false);
        let err = rel_err(&dense, &twin_logits);
        assert!(
            err < 1e-5,
            "{kind:?}: dense step differs from the twin by {err:e}"
        );
        let sparse = stepped_logits(&model, &x, &chunks, false);
        assert!(
            rel_err(&sparse, &twin_logits) > 1e-4,
            "{kind:?}: selection unused"
        );
    }
}

fn params(seed: u64, max_new: usize) -> SequenceParams {
    SequenceParams {
        max_new_tokens: max_new,
        sampler: SamplerConfig {
            temperature: 0.9,
            top_p: 0.95,
            top_k: 0,
        },
        seed,
        stop_tokens: vec![],
        stop_strings: vec![],
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        logprobs: None,
    }
}

#[test]
fn sampled_generation_is_the_same_alone_and_batched() {
    for (name, cfg) in [
        ("dsa", tiny_dsa_config(IndexerKind::Lightning, 9)),
        ("mqa", mqa_wide()),
    ] {
        let model = random_model(&cfg, 7);
        let prompts: Vec<Vec<u32>> = [3usize, 17, 8, 30]
            .iter()
            .enumerate()
            .map(|(i, &n)| ids(n, cfg.vocab_size, 11 + i as u32))
            .collect();
        let opts = EngineOptions {
            prefill_chunk: 5,
            ..Default::default()
        };
        let engine = Engine::new(&model, None, opts).unwrap();
        let alone: Vec<Vec<u32>> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut s =
                    [
                        Sequence::new(i as u64, p.clone(), params(40 + i as u64, 20), &model.cfg)
                            .unwrap(),
                    ];
                engine.run(&mut s, |_| {}).unwrap();
                assert_eq!(s[0].finish_reason(), Some(&FinishReason::Length));
                s[0].generated().to_vec()
            })
            .collect();
        let mut all: Vec<Sequence> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Sequence::new(i as u64, p.clone(), params(40 + i as u64, 20), &model.cfg).unwrap()
            })
            .collect();
        let mut events = 0;
        engine.run(&mut all, |_| events += 1).unwrap();
        assert!(events >= 4 * 20);
        for (i, s) in all.iter().enumerate() {
            assert_eq!(
                s.generated(),
                alone[i].as_slice(),
                "{name}: sequence {i} batched"
            );
            assert_eq!(s.generated().len(), 20);
        }
        // Another seed gives another text.
        let mut other =
            [Sequence::new(9, prompts[1].clone(), params(999, 20), &model.cfg).unwrap()];
        engine.run(&mut other, |_| {}).unwrap();
        assert_ne!(other[0].generated(), alone[1].as_slice());
    }
}

/// A sequence started on another's cache cut back to a shared prompt prefix (prefix
/// reuse; the dense row of `bench generate`) generates what a fresh one does, for
/// every layout: the cut drops the later keys, values, latents and index keys (the
/// index blocks' tails zeroed, as if never written), so nothing of them is read.
#[test]
fn a_cache_cut_back_to_a_prompt_prefix_serves_a_new_sequence() {
    for (name, cfg) in configs() {
        let model = random_model(&cfg, 5);
        let engine = Engine::new(&model, None, EngineOptions::default()).unwrap();
        // 23 prompt tokens: the cut (at 21 and at 16) falls inside an index block.
        let prompt = ids(23, cfg.vocab_size, 3);
        for keep in [22usize, 16, 1, 0] {
            let mut fresh = [Sequence::new(1, prompt.clone(), params(8, 12), &model.cfg).unwrap()];
            engine.run(&mut fresh, |_| {}).unwrap();
            let want = fresh[0].generated().to_vec();
            let [done] = fresh;
            let mut cache = done.into_cache();
            assert!(cache.len() > keep);
            cache.truncate(keep);
            assert_eq!(cache.len(), keep, "{name}");
            let mut again =
                [
                    Sequence::with_cached_prefix(
                        2,
                        prompt.clone(),
                        params(8, 12),
                        &model.cfg,
                        cache,
                    )
                    .unwrap(),
                ];
            engine.run(&mut again, |_| {}).unwrap();
            assert_eq!(again[0].generated(), want.as_slice(), "{name}: kept {keep}");
        }
    }
    // The last prompt token must be left to feed; the layer count must match.
    let cfg = tiny_config();
    let full = SeqCache::new(cfg.num_hidden_layers, cfg.kv_cache_dtype);
    assert!(Sequence::with_cached_prefix(0, vec![1], params(1, 2), &cfg, full.clone()).is_ok());
    let model = random_model(&cfg, 5);
    let mut s = [Sequence::new(0, vec![1, 2, 3], params(1, 1), &model.cfg).unwrap()];
    Engine::new(&model, None, EngineOptions::default())
        .unwrap()
        .run(&mut s, |_| {})
        .unwrap();
    let [s] = s;
    let err = Sequence::with_cached_prefix(0, vec![1, 2, 3], params(1, 2), &cfg, s.into_cache())
        .unwrap_err()
        .to_string();
    assert!(err.contains("last token"), "{err}");
    let wrong = SeqCache::new(cfg.num_hidden_layers + 1, cfg.kv_cache_dtype);
    assert!(Sequence::with_cached_prefix(0, vec![1, 2], params(1, 2), &cfg, wrong).is_err());
}

#[test]
fn sequences_stop_at_tokens_budget_and_context() {
    let mut cfg = tiny_config();
    cfg.max_position_embeddings = 24;
    let model = random_model(&cfg, 2);
    let engine = Engine::new(&model, None, EngineOptions::default()).unwrap();
    let prompt = ids(10, cfg.vocab_size, 1);
    // Greedy: find the first generated token, then stop on it.
    let mut s =
        [Sequence::new(0, prompt.clone(), SequenceParams::greedy(5, vec![]), &cfg).unwrap()];
    engine.run(&mut s, |_| {}).unwrap();
    let first = s[0].generated()[0];
    let mut s = [Sequence::new(
        0,
        prompt.clone(),
        SequenceParams::greedy(5, vec![first]),
        &cfg,
    )
    .unwrap()];
    engine.run(&mut s, |_| {}).unwrap();
    assert_eq!(s[0].finish_reason(), Some(&FinishReason::StopToken(first)));
    assert!(s[0].generated().is_empty());
    // The context: 24 positions, 10 of prompt -> 14 tokens.
    let mut s =
        [Sequence::new(0, prompt.clone(), SequenceParams::greedy(100, vec![]), &cfg).unwrap()];
    engine.run(&mut s, |_| {}).unwrap();
    assert_eq!(s[0].finish_reason(), Some(&FinishReason::ContextFull));
    assert_eq!(s[0].generated().len(), 24 - 10);
    assert_eq!(s[0].position(), 23);
    // Bad requests are errors, not panics.
    assert!(Sequence::new(0, vec![], SequenceParams::greedy(1, vec![]), &cfg).is_err());
    assert!(Sequence::new(0, ids(24, 512, 0), SequenceParams::greedy(1, vec![]), &cfg).is_err());
    assert!(Sequence::new(0, vec![600], SequenceParams::greedy(1, vec![]), &cfg).is_err());
    let mut zero = [Sequence::new(0, prompt, SequenceParams::greedy(0, vec![]), &cfg).unwrap()];
    engine.run(&mut zero, |_| {}).unwrap();
    assert!(zero[0].generated().is_empty());
}

fn bundled_tokenizer() -> Tokenizer {
    Tokenizer::from_file(&repo_root().join("models/sparrow-small/tokenizer.json")).unwrap()
}

#[test]
fn incremental_text_equals_the_whole_decode() {
    let tok = bundled_tokenizer();
    let text = "Caf\u{e9} \u{1F600} na\u{ef}ve \u{4E2D}\u{6587} text, \u{1F980}\u{1F980}! done.";
    let mut stream: Vec<u32> = tok.encode(text).unwrap();
    // Plus ids that decode to lone bytes of multi-byte characters, in random order.
    stream.extend((0..200u32).map(|i| (i * 7919 + 3) % tok.vocab_size() as u32));
    let mut d = Detokenizer::new();
    let mut out = String::new();
    for &id in &stream {
        out.push_str(&d.push(&tok, id).unwrap());
    }
    out.push_str(&d.flush(&tok).unwrap());
    assert_eq!(out, tok.decode(&stream, true).unwrap());
    assert!(out.starts_with(text));
}

#[test]
fn stop_strings_end_generation_and_are_not_emitted() {
    let tok = bundled_tokenizer();
    let model = random_model(&tiny_config(), 5);
    let engine = Engine::new(&model, Some(&tok), EngineOptions::default()).unwrap();
    let prompt = ids(6, 512, 3);
    let mut s = [Sequence::new(0, prompt.clone(), params(1, 30), &model.cfg).unwrap()];
    engine.run(&mut s, |_| {}).unwrap();
    let full = s[0].text().to_string();
    let full_ids = s[0].generated().to_vec();
    assert_eq!(full, tok.decode(&full_ids, true).unwrap());
    // Stop on a piece from the middle of that text: the same seed reproduces the text up
    // to it, and it is not emitted.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 12, "text too short: {full:?}");
    let stop: String = chars[8..11].iter().collect();
    let at = full.find(&stop).unwrap();
    let mut p = params(1, 30);
    p.stop_strings = vec![stop.clone()];
    let mut s = [Sequence::new(0, prompt, p, &model.cfg).unwrap()];
    let mut streamed = String::new();
    engine.run(&mut s, |e| streamed.push_str(&e.text)).unwrap();
    assert_eq!(s[0].finish_reason(), Some(&FinishReason::StopString(stop)));
    assert_eq!(s[0].text(), &full[..at]);
    assert_eq!(streamed, &full[..at]);
}

#[test]
fn the_model_is_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Model>();
    let model = random_model(&mqa_wide(), 1);
    let prompt = ids(9, 512, 2);
    let run = |seed: u64| {
        let engine = Engine::new(&model, None, EngineOptions::default()).unwrap();
        let mut s = [Sequence::new(0, prompt.clone(), params(seed, 12), &model.cfg).unwrap()];
        engine.run(&mut s, |_| {}).unwrap();
        s[0].generated().to_vec()
    };
    let (a, b) = std::thread::scope(|sc| {
        let h1 = sc.spawn(|| run(3));
        let h2 = sc.spawn(|| run(3));
        (h1.join().unwrap(), h2.join().unwrap())
    });
    assert_eq!(a, b);
    assert_eq!(a, run(3));
}

#[test]
fn a_run_directory_is_locked_against_a_second_trainer() {
    use sparrow::train::lock::RunLock;
    let dir = tempfile::tempdir().unwrap();
    let first = RunLock::acquire(dir.path()).unwrap();
    let err = RunLock::acquire(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("in use by process") && err.contains(&std::process::id().to_string()),
        "{err}"
    );
    drop(first);
    let again = RunLock::acquire(dir.path()).unwrap();
    assert!(again.path().exists());
}

/// `bench generate`'s accounting of a decode step: caches counted in their storage
/// precision, every sequence's own; weights as held, with the routed experts a batch
/// touches on average under uniform routing; flops of the weights a token multiplies
/// (its k experts, not the untied embedding's lookup), linear in the batch; and the
/// machine bound built from them.
#[test]
fn bench_generate_counts_what_a_decode_step_reads() {
    use sparrow::bench::generate::{run, step_bound_ms, GenerateBench};
    let mut cfg = tiny_config(); // 2 layers, the second MoE: 4 experts, 2 a token
    cfg.kv_cache_dtype = sparrow::config::KvCacheDtype::Float16;
    let model = random_model(&cfg, 3);
    let bench = GenerateBench {
        contexts: vec![20],
        batches: vec![1, 3],
        decode_tokens: 2,
        prefill_chunk: 8,
        dense_baseline: false,
        dense_prefill_max: 64,
        synthetic_cache: false,
        seed: 1,
    };
    let rows = run(&model, &bench, |_| {}).unwrap();
    let (one, three) = (&rows[0], &rows[1]);
    // K and V rows of 2 heads x 8 in f16, in 2 layers: 128 bytes a position.
    let positions = one.decode_cache_bytes / 128.0;
    assert!(
        positions.fract() == 0.0 && (20.0..=22.0).contains(&positions),
        "cache bytes {} are not 128 per position",
        one.decode_cache_bytes
    );
    assert_eq!(three.decode_cache_bytes, 3.0 * one.decode_cache_bytes);
    let (total, _) = model.parameter_counts();
    let total = total as f64;
    let per_expert = 3.0 * 32.0 * 32.0;
    // One token skips 2 of 4 experts; three skip 4 x (1 - 1/2)^3 = 0.5 on average.
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs();
    assert!(close(
        one.decode_weight_bytes,
        4.0 * (total - 2.0 * per_expert)
    ));
    assert!(close(
        three.decode_weight_bytes,
        4.0 * (total - 0.5 * per_expert)
    ));
    let lookup = 512.0 * 32.0;
    assert!(close(
        one.decode_weight_flops,
        2.0 * (total - 2.0 * per_expert - lookup)
    ));
    assert_eq!(three.decode_weight_flops, 3.0 * one.decode_weight_flops);
    // Bandwidth-bound weights, then flops-bound ones.
    let want = 1e3 * (one.decode_weight_bytes / 1e10 + one.decode_cache_bytes / 1e10);
    assert!(close(step_bound_ms(one, 10.0, 1e6), want));
    let want = 1e3 * (one.decode_weight_flops / 1e9 + one.decode_cache_bytes / 1e10);
    assert!(close(step_bound_ms(one, 10.0, 1.0), want));
}

/// `StepOptions::telemetry`: a DSA layer's sampled recall is the full forward's recall
/// of the same query (None while the layer still attends densely), and a MoE layer's
/// counts over the steps are the forward's routing demand.
#[test]
fn step_telemetry_matches_the_full_forward() {
    use sparrow::model::diagnostics::Collect;
    use sparrow::model::options::ForwardOptions;
    let chunks = [12, 1, 1, 7, 1, 1, 1];
    let t: usize = chunks.iter().sum();
    for (name, cfg) in configs() {
        let model = random_model(&cfg, 5);
        let x = ids(t, cfg.vocab_size, 5);
        let o = ForwardOptions {
            collect: Collect {
                recall_from: Some(0),
                ..Collect::default()
            },
            ..Default::default()
        };
        let full = model
            .net
            .forward_with(&Tensor::from_slice(&x, (1, t), &Device::Cpu).unwrap(), &o)
            .unwrap();
        let layers = &full.diagnostics.layers;
        let mut cache = SeqCache::new(cfg.num_hidden_layers, cfg.kv_cache_dtype);
        let mut at = 0;
        let mut demand: Vec<Option<Vec<u64>>> = vec![None; cfg.num_hidden_layers];
        let mut sampled = 0;
        for &n in &chunks {
            let mut inputs = [StepInput {
                tokens: &x[at..at + n],
                cache: &mut cache,
            }];
            let opts = StepOptions {
                telemetry: true,
                ..Default::default()
            };
            let out = model.step(&mut inputs, &opts).unwrap();
            assert_eq!(out.telemetry.len(), cfg.num_hidden_layers, "{name}");
            let last = at + n - 1;
            for (l, tel) in out.telemetry.iter().enumerate() {
                let topk = cfg.index_topk;
                let sparse = layers[l].recall.is_some() && last + 1 > topk;
                match (tel.recall, sparse) {
                    (Some(r), true) => {
                        let want = layers[l].recall.as_ref().unwrap()[last];
                        assert!(
                            (r - want).abs() < 1e-4,
                            "{name} layer {l} at {last}: {r} vs {want}"
                        );
                        sampled += 1;
                    }
                    (None, false) => {}
                    other => panic!("{name} layer {l} at {last}: {other:?}"),
                }
                assert_eq!(
                    tel.routing.is_some(),
                    layers[l].routing.is_some(),
                    "{name} {l}"
                );
                if let Some(r) = &tel.routing {
                    assert_eq!(r.tokens, n as u64, "{name}");
                    let d = demand[l].get_or_insert_with(|| vec![0; r.demand.len()]);
                    for (a, b) in d.iter_mut().zip(&r.demand) {
                        *a += b;
                    }
                }
            }
            at += n;
        }
        for (l, d) in demand.iter().enumerate() {
            if let Some(d) = d {
                let want = &layers[l].routing.as_ref().unwrap().demand;
                // Routing is per token; batching may round a near-tie differently.
                let off: u64 = d.iter().zip(want).map(|(a, b)| a.abs_diff(*b)).sum();
                assert!(off <= 2, "{name} layer {l}: {d:?} vs {want:?}");
            }
        }
        if name.contains("dsa") {
            assert!(sampled > 0, "{name}: no step ran sparse");
        }
    }
    // Off: nothing measured.
    let model = random_model(&tiny_config(), 1);
    let mut cache = SeqCache::new(model.cfg.num_hidden_layers, model.cfg.kv_cache_dtype);
    let out = model
        .step(
            &mut [StepInput {
                tokens: &[1, 2, 3],
                cache: &mut cache,
            }],
            &StepOptions::default(),
        )
        .unwrap();
    assert!(out.telemetry.is_empty());
}
