//! Tokenizer training and exact round trips on arbitrary UTF-8.

mod common;
use common::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparrow::tokenizer::{Tokenizer, BOS_ID, EOS_ID};

fn trained(dir: &std::path::Path) -> Tokenizer {
    write_synthetic_corpus(dir);
    let files = sparrow::data::corpus::list_text_files(dir).unwrap();
    Tokenizer::train(&files, 400, false).unwrap()
}

fn assert_round_trip(tok: &Tokenizer, s: &str) {
    let ids = tok.encode(s).unwrap();
    let back = tok.decode(&ids, false).unwrap();
    assert_eq!(back, s, "round trip failed for {s:?} (ids {ids:?})");
}

#[test]
fn round_trip_is_exact_on_arbitrary_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let tok = trained(dir.path());
    assert_eq!(tok.bos_id, BOS_ID);
    assert_eq!(tok.eos_id, EOS_ID);
    assert!(tok.vocab_size() <= 400);
    for s in [
        "",
        " ",
        "The whale watched the grey horizon.",
        "  leading and trailing spaces  ",
        "emoji: 🐋🚢👩‍👩‍👧 and flags 🇯🇵",
        "CJK: 鯨は海を泳ぐ。고래",
        "control: \u{0}\u{1}\t\r\n\u{7f}\u{85}\u{2028}",
        "combining: e\u{301} a\u{308}\u{323}",
        "special-looking text: <|eos|> <|bos|>",
        "\n\n\n",
    ] {
        assert_round_trip(&tok, s);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..300 {
        let len = rng.random_range(0..40);
        let s: String = (0..len)
            .map(|_| loop {
                let cp = match rng.random_range(0..4) {
                    0 => rng.random_range(0..0x80),
                    1 => rng.random_range(0x80..0x800),
                    2 => rng.random_range(0x800..0x10000),
                    _ => rng.random_range(0x10000..0x110000),
                };
                if let Some(c) = char::from_u32(cp) {
                    break c;
                }
            })
            .collect();
        assert_round_trip(&tok, &s);
    }
}

#[test]
fn save_and_load_keep_the_same_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let tok = trained(&dir.path().join("corpus"));
    let path = dir.path().join("tokenizer.json");
    tok.save(&path).unwrap();
    let loaded = Tokenizer::from_file(&path).unwrap();
    let text = "A sailor remembered the morning tide.";
    assert_eq!(tok.encode(text).unwrap(), loaded.encode(text).unwrap());
    // It learned merges: common words are fewer tokens than bytes.
    assert!(tok.encode(text).unwrap().len() < text.len() / 2);
}

#[test]
fn bad_tokenizer_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = Tokenizer::from_file(&dir.path().join("nope.json")).unwrap_err();
    assert!(missing.to_string().contains("nope.json"), "{missing}");
    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, b"{ not json").unwrap();
    assert!(Tokenizer::from_file(&garbage).is_err());
    assert!(Tokenizer::train(&[], 400, false).is_err());
    // Found by the tokenizer_json fuzz target: a syntax error inside the `decoder`
    // object made the `tokenizers` crate panic; it is an error naming the JSON fault.
    let seed = std::fs::read_to_string(repo_root().join("fuzz/seeds/tokenizer_json/tiny-bpe.json"))
        .unwrap();
    assert!(
        Tokenizer::from_json(&seed).is_ok(),
        "the seed itself parses"
    );
    let broken = seed.replacen(
        "\"trim_offsets\": true, \"use_regex\": true}, \"model\"",
        "\"trim_offsets\": tru,e \"use_regex\": true}, \"model\"",
        1,
    );
    assert_ne!(broken, seed);
    let err = Tokenizer::from_json(&broken).unwrap_err().to_string();
    assert!(err.contains("not valid JSON"), "{err}");
    let file = dir.path().join("broken-decoder.json");
    std::fs::write(&file, &broken).unwrap();
    let err = Tokenizer::from_file(&file).unwrap_err().to_string();
    assert!(
        err.contains("broken-decoder.json") && err.contains("line 1"),
        "{err}"
    );
}

#[test]
fn round_trip_on_the_shared_corpus_when_present() {
    let shared = repo_root().join("../shared/corpus/mobydick.txt");
    if !shared.exists() {
        eprintln!("../shared/corpus absent: skipping the real-text round trip");
        return;
    }
    let text = std::fs::read_to_string(&shared).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let piece = &text[..text
        .char_indices()
        .nth(200_000)
        .map(|(i, _)| i)
        .unwrap_or(text.len())];
    std::fs::write(dir.path().join("moby.txt"), piece).unwrap();
    let tok = Tokenizer::train(
        &sparrow::data::corpus::list_text_files(dir.path()).unwrap(),
        1000,
        false,
    )
    .unwrap();
    assert_round_trip(&tok, piece);
}
