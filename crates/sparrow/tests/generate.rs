//! Streaming generation: the streamed pieces add up to the decoded generation, the same
//! seed gives the same tokens, and a prompt longer than the context is an error.

mod common;
use candle_core::{DType, Device};
use common::*;
use sparrow::engine::generate::{generate, GenerateOptions};
use sparrow::engine::sampler::SamplerConfig;
use sparrow::model::Model;
use sparrow::tokenizer::Tokenizer;

fn options(seed: u64, max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampler: SamplerConfig {
            temperature: 1.5,
            top_p: 1.0,
            top_k: 0,
        },
        seed,
        stop_at_eos: false,
    }
}

#[test]
fn streamed_pieces_add_up_and_seeds_reproduce() {
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_corpus(dir.path());
    let files = sparrow::data::corpus::list_text_files(dir.path()).unwrap();
    let tok = Tokenizer::train(&files, 400, false).unwrap();
    let mut cfg = tiny_config();
    cfg.initializer_range = 0.5; // a sharp random model, so sampling wanders over all bytes
    let model = Model::new_random(&cfg, 2, DType::F32, &Device::Cpu).unwrap();

    // Multi-byte characters split across byte-level tokens are held back until whole.
    let mut pieces = Vec::new();
    let (ids, stats) = generate(&model, &tok, "The whale é 🐋", &options(9, 60), |p| {
        pieces.push(p.to_string())
    })
    .unwrap();
    assert_eq!(ids.len(), 60);
    assert_eq!(stats.generated_tokens, 60);
    assert_eq!(
        stats.prompt_tokens,
        1 + tok.encode("The whale é 🐋").unwrap().len()
    );
    assert_eq!(pieces.concat(), tok.decode(&ids, true).unwrap());

    let (again, _) = generate(&model, &tok, "The whale é 🐋", &options(9, 60), |_| {}).unwrap();
    assert_eq!(ids, again);
    let (other, _) = generate(&model, &tok, "The whale é 🐋", &options(10, 60), |_| {}).unwrap();
    assert_ne!(ids, other);

    // Generation stops at the context limit instead of failing mid-way.
    let (capped, _) = generate(&model, &tok, "", &options(1, 10_000), |_| {}).unwrap();
    assert_eq!(capped.len(), cfg.max_position_embeddings - 1);

    let long = "whale ".repeat(400);
    let e = generate(&model, &tok, &long, &options(1, 5), |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("context"), "{e}");
}
