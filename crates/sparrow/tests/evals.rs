//! The long-context evaluations' parts against independent computations: the greedy
//! decoder equals `generate` at temperature 0, perplexity equals the training loss
//! function on the same window, and retrieval prompts put the key where they say.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use sparrow::data::retrieval::{Passkey, RetrievalMix};
use sparrow::engine::generate::{generate, greedy_continue, GenerateOptions};
use sparrow::engine::sampler::SamplerConfig;
use sparrow::eval::perplexity::{measure, Scoring};
use sparrow::eval::retrieval::{self, RetrievalOptions, Task};
use sparrow::model::Model;
use sparrow::tokenizer::Tokenizer;
use sparrow::train::loss::cross_entropy;

/// A tiny model with a dense first layer and a lightning-DSA second layer of top-`topk`,
/// sized for [`setup`]'s tokenizer and windows.
fn dsa_model(topk: usize) -> Model {
    let mut cfg = tiny_dsa_config(sparrow::config::IndexerKind::Lightning, topk);
    cfg.initializer_range = 0.3;
    cfg.max_position_embeddings = 512;
    Model::new_random(&cfg, 5, DType::F32, &Device::Cpu).unwrap()
}

fn setup() -> (Model, Tokenizer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_corpus(dir.path());
    let files = sparrow::data::corpus::list_text_files(dir.path()).unwrap();
    let tok = Tokenizer::train(&files, 400, false).unwrap();
    let mut cfg = tiny_config();
    cfg.initializer_range = 0.3;
    cfg.max_position_embeddings = 512;
    let model = Model::new_random(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    (model, tok, dir)
}

#[test]
fn greedy_continue_equals_generate_at_temperature_zero() {
    let (model, tok, _dir) = setup();
    let prompt = "The whale watched the grey horizon. A sailor";
    let opts = GenerateOptions {
        max_tokens: 12,
        sampler: SamplerConfig {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
        },
        seed: 0,
        stop_at_eos: true,
    };
    let (ids, _) = generate(&model, &tok, prompt, &opts, |_| {}).unwrap();
    let mut input = vec![tok.bos_id];
    input.extend(tok.encode(prompt).unwrap());
    let greedy = greedy_continue(&model, &input, 12, tok.eos_id).unwrap();
    assert_eq!(greedy, ids);
    assert!(greedy_continue(&model, &input, 1000, tok.eos_id).is_err());
}

#[test]
fn perplexity_equals_the_training_loss_on_the_same_window() {
    let (model, tok, dir) = setup();
    let files = sparrow::data::corpus::list_text_files(dir.path()).unwrap();
    let tokens = tok
        .encode(&std::fs::read_to_string(&files[0]).unwrap())
        .unwrap();
    let n = 77;
    let rows = measure(&model, &tokens, &[n], 1, Scoring::Window, false).unwrap();
    let inp = Tensor::from_slice(&tokens[..n], (1, n), &Device::Cpu).unwrap();
    let tgt = Tensor::from_slice(&tokens[1..n + 1], n, &Device::Cpu).unwrap();
    let logits = model.forward(&inp).unwrap().logits.squeeze(0).unwrap();
    let want = cross_entropy(&logits, &tgt)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let got = rows[0].loss;
    assert!((got - want).abs() / want < 1e-5, "{got} vs {want}");
    assert!((rows[0].perplexity - want.exp()).abs() / want.exp() < 1e-5);
    assert!(rows[0].loss_second_half.is_finite());
    assert!(measure(&model, &tokens, &[100_000], 1, Scoring::Window, false).is_err());
}

#[test]
fn perplexity_through_the_chunked_prefill_equals_the_whole_window() {
    // A dense model and a DSA one whose 77-token windows are past its top-16 (the
    // chunked prefill selects per chunk over the cache, the window forward over the
    // window): the same positions scored, so the same losses up to f32 rounding.
    let (dense, tok, dir) = setup();
    let dsa = dsa_model(16);
    let files = sparrow::data::corpus::list_text_files(dir.path()).unwrap();
    let text = std::fs::read_to_string(&files[0]).unwrap();
    let tokens = tok.encode(&text).unwrap();
    for model in [&dense, &dsa] {
        let whole = measure(model, &tokens, &[77, 130], 2, Scoring::Window, false).unwrap();
        for chunk in [1, 19, 77, 500] {
            let stepped = measure(
                model,
                &tokens,
                &[77, 130],
                2,
                Scoring::Prefill(chunk),
                false,
            )
            .unwrap();
            for (a, b) in whole.iter().zip(&stepped) {
                assert_eq!((a.context, a.windows), (b.context, b.windows));
                for (x, y) in [(a.loss, b.loss), (a.loss_second_half, b.loss_second_half)] {
                    assert!((x - y).abs() / x < 1e-4, "chunk {chunk}: {x} vs {y}");
                }
            }
        }
    }
    let zero = measure(&dense, &tokens, &[77], 1, Scoring::Prefill(0), false);
    assert!(zero.unwrap_err().to_string().contains("chunk"));
}

#[test]
fn passkey_report_counts_cells_and_lengths() {
    let (model, tok, _dir) = setup();
    let opts = RetrievalOptions {
        lengths: vec![200, 300],
        depths: vec![0.0, 0.5, 1.0],
        trials: 2,
        max_new_tokens: 4,
        seed: 5,
        chat: false,
        key_selection: false,
    };
    let r = retrieval::passkey(&model, &tok, &opts, false).unwrap();
    assert_eq!(r.task, Task::Passkey);
    assert_eq!(r.trials.len(), 12);
    assert_eq!(r.cells.len(), 6);
    assert_eq!(r.by_length.len(), 2);
    for t in &r.trials {
        assert!(
            t.prompt_tokens <= t.length,
            "{} > {}",
            t.prompt_tokens,
            t.length
        );
        assert_eq!(t.expected.len(), 5);
        assert_eq!(
            t.correct,
            retrieval::is_correct(Task::Passkey, &t.output, &t.expected)
        );
    }
    // The same seed draws the same keys; another seed other keys.
    let again = retrieval::passkey(&model, &tok, &opts, false).unwrap();
    let keys = |r: &retrieval::RetrievalReport| -> Vec<String> {
        r.trials.iter().map(|t| t.expected.clone()).collect()
    };
    assert_eq!(keys(&again), keys(&r));
    let other = retrieval::passkey(
        &model,
        &tok,
        &RetrievalOptions {
            seed: 6,
            ..opts.clone()
        },
        false,
    )
    .unwrap();
    assert_ne!(keys(&other), keys(&r));
    // In a chat turn (this tokenizer has no template: the plain `role: content` one):
    // the same keys, longer fixed parts, still within each length.
    let chat = retrieval::passkey(
        &model,
        &tok,
        &RetrievalOptions {
            chat: true,
            ..opts.clone()
        },
        false,
    )
    .unwrap();
    assert_eq!(keys(&chat), keys(&r));
    let unit = Passkey::new(&tok).unwrap().filler_len();
    for c in &chat.trials {
        // Whole filler units fill what the turn leaves: less than one unit is unused.
        assert!(
            c.prompt_tokens <= c.length,
            "{} > {}",
            c.prompt_tokens,
            c.length
        );
        assert!(
            c.prompt_tokens + unit > c.length,
            "{} of {}",
            c.prompt_tokens,
            c.length
        );
    }
    assert!(
        chat.trials
            .iter()
            .zip(&r.trials)
            .any(|(c, p)| c.prompt_tokens != p.prompt_tokens || c.output != p.output),
        "the chat turn changed nothing"
    );
    for bad in [
        RetrievalOptions {
            depths: vec![1.5],
            ..opts.clone()
        },
        RetrievalOptions {
            lengths: vec![510],
            ..opts.clone()
        },
        RetrievalOptions {
            trials: 0,
            ..opts.clone()
        },
    ] {
        assert!(retrieval::passkey(&model, &tok, &bad, false).is_err());
    }
}

/// The key line starts at `key_at`, and no digit comes before it (the filler has none).
#[test]
fn passkey_prompt_carries_its_key_where_it_says() {
    let (_, tok, _dir) = setup();
    let pk = Passkey::new(&tok).unwrap();
    for depth in [0.0, 0.3, 1.0] {
        let d = pk.build(400, depth, 24680).unwrap();
        let after = tok.decode(&d.prompt[d.key_at..], true).unwrap();
        assert_eq!(retrieval::first_integer(&after), Some("24680"));
        let before = tok.decode(&d.prompt[..d.key_at], true).unwrap();
        assert_eq!(retrieval::first_integer(&before), None);
    }
    assert!(RetrievalMix::new(&tok, 0.9).is_ok());
    assert!(RetrievalMix::new(&tok, 1.5).is_err());
}

/// `key_selection`: each sparse layer's share of the key line among the positions the
/// question's last query attends, against the whole-window forward's own selection.
#[test]
fn key_selection_reports_the_key_line_share_each_sparse_layer_selects() {
    use sparrow::kernels::topk::NONE;
    use sparrow::model::options::{Collect, ForwardOptions};
    let (_, tok, _dir) = setup();
    let model = dsa_model(40);
    let opts = RetrievalOptions {
        lengths: vec![200, 300],
        depths: vec![0.0, 0.5, 1.0],
        trials: 2,
        max_new_tokens: 2,
        seed: 3,
        chat: false,
        key_selection: true,
    };
    let r = retrieval::passkey(&model, &tok, &opts, false).unwrap();
    let pk = Passkey::new(&tok).unwrap();
    let mut shares = Vec::new();
    for t in &r.trials {
        let got = t.key_selected.as_ref().expect("asked for");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], None, "the dense layer attends everything");
        // The same prompt again (BOS + the document for this key), and the window
        // forward's top-k of its last query.
        let doc = pk
            .build(t.length - 1, t.depth, t.expected.parse().unwrap())
            .unwrap();
        let mut ids = vec![tok.bos_id];
        ids.extend(&doc.prompt);
        assert_eq!(ids.len(), t.prompt_tokens);
        let o = ForwardOptions {
            collect: Collect {
                selection: true,
                ..Collect::default()
            },
            ..Default::default()
        };
        let x = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
        let out = model.net.forward_with(&x, &o).unwrap();
        let sel = out.diagnostics.layers[1].selection.as_ref().unwrap();
        let k = sel.len() / ids.len();
        let span = 1 + doc.key_at..1 + doc.key_at + doc.key_len;
        let kept = sel[(ids.len() - 1) * k..]
            .iter()
            .filter(|&&p| p != NONE && span.contains(&(p as usize)))
            .count();
        let want = kept as f64 / doc.key_len as f64;
        let share = got[1].expect("past the top-k: the layer ran sparse");
        assert!((share - want).abs() < 1e-12, "{share} vs {want}");
        shares.push(share);
    }
    assert!(
        shares.iter().any(|&s| s > 0.0) && shares.iter().any(|&s| s < 1.0),
        "{shares:?}"
    );
    let by_layer = retrieval::key_selected_by_layer(&r.trials);
    assert_eq!(by_layer[0], None);
    let mean = shares.iter().sum::<f64>() / shares.len() as f64;
    assert!((by_layer[1].unwrap() - mean).abs() < 1e-12);
    // Without the option nothing is recorded.
    let plain = retrieval::passkey(
        &model,
        &tok,
        &RetrievalOptions {
            key_selection: false,
            ..opts
        },
        false,
    )
    .unwrap();
    assert!(plain.trials.iter().all(|t| t.key_selected.is_none()));
}
