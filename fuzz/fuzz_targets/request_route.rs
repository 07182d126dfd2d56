//! Bytes -> a request head (pin header, sticky header or cookie, path, host, model) ->
//! the real request handler in front of a fixed table; the version that answers must be
//! the one SPEC §4 prescribes (see the harness).
#![no_main]

#[path = "../../tests/fuzz_harness/mod.rs"]
mod fuzz_harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fuzz_harness::request_route(data);
});
