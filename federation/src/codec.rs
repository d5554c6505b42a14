//! The gRPC codec of every Trellis service: prost, with a smaller encode
//! buffer than tonic's default.
//!
//! A server holds one watch stream per proxy for as long as the proxy
//! lives. tonic's encoder gathers a stream's messages in one buffer until
//! 32 KiB before it hands them on, and the buffer keeps the size it grew
//! to for the stream's whole life: after a snapshot, about 32 KiB per
//! proxy on every server, the largest single share of a server's memory
//! per proxy (heaptrack, `testbed/README.md`). Handing on every 4 KiB
//! keeps each buffer near that size, at the cost of more, smaller HTTP/2
//! frames while a snapshot is sent.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Where an encode buffer starts.
const ENCODE_BUFFER: usize = 1024;
/// How much an encode buffer gathers before it is handed to HTTP/2.
const ENCODE_YIELD: usize = 4 * 1024;

/// prost encoding with Trellis's buffer sizes; named by the generated
/// clients and servers (`build.rs`).
#[derive(Debug, Clone, Copy)]
pub struct TrellisCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for TrellisCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for TrellisCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(ENCODE_BUFFER, ENCODE_YIELD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::default())
    }
}
