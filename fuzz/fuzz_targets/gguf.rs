//! A GGUF file from arbitrary bytes: the header, metadata, tensor infos and alignment
//! must give a named error or a file whose every tensor lies inside it; on a file that
//! parses, the model config, the tokenizer and every tensor's dequantization run too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sparrow::formats::{gguf::GgufFile, gguf_model};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(data.to_vec(), Path::new("fuzz.gguf")) else {
        return;
    };
    let _ = gguf_model::read_config(&file);
    let _ = sparrow::tokenizer::Tokenizer::from_gguf(&file);
    for t in file.tensors.iter() {
        let bytes = file.tensor_data(t);
        assert!(
            bytes.len() <= data.len(),
            "tensor data larger than the file"
        );
        let _ = file.dequantize(t);
    }
});
