#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| imgsvc_fuzz::v1_request(data));
