//! Path normal form: never a panic; a plain path is its own normal form; the
//! normal form of a normal form is itself (so no second reading of a path
//! reaches a different endpoint).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|path: &str| {
    let form = anteroom::path::normal_form(path);
    if anteroom::path::is_plain(path) {
        assert_eq!(form, path.as_bytes());
    }
    assert!(form.starts_with(b"/"));
    if let Ok(s) = std::str::from_utf8(&form) {
        // Escapes are decoded once: a form that still holds one (`%2561`
        // became `%61`) reads again differently, as a backend decoding
        // twice would; anteroom decodes once, as servers do.
        if !s.contains('%') {
            assert_eq!(anteroom::path::normal_form(s), form);
        }
    }
});
