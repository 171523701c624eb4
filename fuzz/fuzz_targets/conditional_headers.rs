//! Any bytes, split into the five conditional headers: parsing and evaluating never panic,
//! and evaluation is deterministic.
#![no_main]
use http::header::{IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE};
use http::{HeaderMap, HeaderValue};
use ifmatch::etag::ETag;
use ifmatch::precondition::{evaluate, Preconditions, Resource};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    let names = [IF_MATCH, IF_NONE_MATCH, IF_UNMODIFIED_SINCE, IF_MODIFIED_SINCE, IF_RANGE, IF_MATCH];
    for (name, part) in names.iter().zip(data.split(|&b| b == b'\n')) {
        if let Ok(v) = HeaderValue::from_bytes(part) {
            headers.append(name.clone(), v);
        }
    }
    let Ok(pre) = Preconditions::parse(&headers) else { return };
    let tagged = Resource {
        exists: true,
        tag: ETag::strong("abc").ok(),
        last_modified: Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000)),
    };
    for r in [Resource::default(), tagged] {
        for read in [false, true] {
            assert_eq!(evaluate(&pre, read, &r), evaluate(&pre, read, &r));
        }
    }
});
