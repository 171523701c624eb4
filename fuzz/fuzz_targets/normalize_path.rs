//! Any path (raw UTF-8 too, which hyper lets through): normalising never panics, is
//! idempotent, leaves no dot segment, and gives ASCII.
#![no_main]
use ifmatch::key::normalize_path;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    let n = normalize_path(path);
    assert!(n.starts_with('/'));
    assert!(n.is_ascii());
    assert_eq!(normalize_path(&n), n);
    assert!(!n.split('/').any(|s| s == "." || s == ".."));
});
