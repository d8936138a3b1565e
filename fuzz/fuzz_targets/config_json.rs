//! `config.json` texts of every family Sparrow imports (sparrow, llama, mixtral,
//! deepseek_v3, deepseek_v32): a named error or a validated config, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = sparrow::formats::hf::parse_config(text, Path::new("config.json"));
    let _ = sparrow::ModelConfig::from_json(text);
});
