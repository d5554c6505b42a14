//! Any bytes fed to the header and reply decoders: no panic, and whatever
//! decodes re-encodes to exactly the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_gateway::tunnel::{Decoded, Header, Reply};

fuzz_target!(|data: &[u8]| {
    if let Ok(Decoded::Complete { value, consumed }) = Header::decode(data) {
        assert_eq!(value.encode().expect("decoded header re-encodes"), &data[..consumed]);
    }
    if let Ok(Decoded::Complete { value, consumed }) = Reply::decode(data) {
        assert_eq!(value.encode(), &data[..consumed]);
    }
});
