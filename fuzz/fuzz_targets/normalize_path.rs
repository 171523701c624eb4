//! Any ASCII path: normalising never panics, is idempotent, and leaves no dot segment.
#![no_main]
use ifmatch::key::normalize_path;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    if !path.is_ascii() {
        return;
    }
    let n = normalize_path(path);
    assert!(n.starts_with('/'));
    assert_eq!(normalize_path(&n), n);
    assert!(!n.split('/').any(|s| s == "." || s == ".."));
});
