#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| raftmap_node::fuzz::write_request(data));
