//! Any bytes: parsing never panics, and a parsed tag survives its header form.
#![no_main]
use ifmatch::etag::ETag;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(tag) = ETag::parse(data) {
        let again = ETag::parse(tag.to_header().as_bytes()).expect("a tag's header form parses");
        assert_eq!(again, tag);
        assert!(tag.weak_eq(&again));
        assert_eq!(tag.strong_eq(&again), !tag.is_weak());
    }
});
