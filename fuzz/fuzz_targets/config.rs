//! Bytes -> the config parser and validator, as YAML and as TOML (see the harness).
#![no_main]

#[path = "../../tests/fuzz_harness/mod.rs"]
mod fuzz_harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_harness::config(data));
