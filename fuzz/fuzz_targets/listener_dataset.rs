#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| radflow_listener::fuzzing::dataset(data));
