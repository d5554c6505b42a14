//! Any bytes as the first flight of a TCP connection: the SNI reader never
//! panics and never claims more bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_gateway::sni::{MeshName, client_hello_sni};
use trellis_gateway::tunnel::Decoded;

fuzz_target!(|data: &[u8]| {
    if let Ok(Decoded::Complete { value, consumed }) = client_hello_sni(data) {
        assert!(consumed <= data.len());
        if let Some(sni) = value {
            let _ = MeshName::parse(&sni, "mesh");
        }
    }
});
