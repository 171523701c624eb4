//! Any text as a config file: validation never panics and every problem says something.
#![no_main]
use ifmatch::config::{Config, ConfigError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::parse(text, "fuzz.toml") {
        Ok(c) => assert!(!c.routes.is_empty()),
        Err(ConfigError::Invalid(problems)) => {
            assert!(!problems.is_empty());
            for p in problems {
                assert!(p.line >= 1);
                assert!(!p.message.is_empty());
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
