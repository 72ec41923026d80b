#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ecs_ca_backends::fuzzing::csr(data));
