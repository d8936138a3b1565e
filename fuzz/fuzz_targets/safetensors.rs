//! A safetensors file from arbitrary bytes: a named error or every tensor read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = sparrow::weights::parse(
        data,
        Path::new("fuzz.safetensors"),
        &candle_core::Device::Cpu,
    );
});
