#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| logvault_fuzz::cluster(data));
