//! Any bytes as the start of a workload connection: the preamble reader
//! never panics, never claims more than it was given or more than
//! `MAX_LEN`, asks for more only while the bytes could still be a
//! preamble, and hands on only printable trace contexts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_gateway::preamble::{MAX_LEN, decode, encode};
use trellis_gateway::tunnel::Decoded;

fuzz_target!(|data: &[u8]| {
    match decode(data) {
        Ok(Decoded::Complete { value, consumed }) => {
            assert!(consumed <= data.len() && consumed <= MAX_LEN);
            if let Some(tp) = value {
                assert!(tp.bytes().all(|b| b.is_ascii_graphic()));
                // What a sidecar would send for it reads back the same.
                let again = encode(&tp);
                assert!(matches!(decode(&again), Ok(Decoded::Complete { value: Some(t), .. }) if t == tp));
            }
        }
        Ok(Decoded::Incomplete { needed }) => assert!(data.len() + needed <= MAX_LEN),
        Err(_) => {}
    }
});
