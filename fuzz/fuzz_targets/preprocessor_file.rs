#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| radflow_preprocessor::fuzzing::file(data));
