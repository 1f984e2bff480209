#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| radflow_volume::fuzzing::nifti_reader(data));
