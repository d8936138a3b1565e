//! `tokenizer.json` texts: a named error or a tokenizer that encodes and decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(tok) = sparrow::tokenizer::Tokenizer::from_json(text) {
        if let Ok(ids) = tok.encode("Hello, world! 123 \u{e9}\u{1F600}\n\n  x") {
            let _ = tok.decode(&ids, false);
        }
    }
});
