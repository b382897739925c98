//! The config parser and validator on any text: an error that names what is
//! wrong, or a config; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(file) = anteroom::config::FileConfig::parse(text) {
        // No environment: the same text validates the same way on every run.
        if let Err(e) = file.validate_with(&|_| None) {
            assert!(!e.0.is_empty());
        }
    }
});
