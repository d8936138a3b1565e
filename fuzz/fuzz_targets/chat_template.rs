//! Chat templates (the first line of the input is the template, the rest the user
//! message): compiled and rendered within minijinja's fuel and the rendered-size limit,
//! a named error or a prompt, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sparrow::chat::{ChatTemplate, Message};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (source, user) = text.split_once('\n').unwrap_or((text, "hi"));
    let Ok(t) = ChatTemplate::new(source, "<s>", "</s>") else {
        return;
    };
    let messages = [
        Message::new("system", "You are helpful."),
        Message::new("user", user),
        Message::new("assistant", "ok"),
    ];
    let _ = t.render(&messages, true);
});
