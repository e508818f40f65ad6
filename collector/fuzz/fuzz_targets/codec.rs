#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| collector::fuzz::codec(data));
