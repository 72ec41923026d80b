#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ecs_daemon::fuzzing::token(data));
