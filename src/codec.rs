//! The protobuf codec of the gRPC services (`registry.v1`, `registry.admin.v1`).
//!
//! Owns: how a message that does not decode is answered. tonic's default
//! codec answers INTERNAL, which tells the client the *server* failed; a
//! request that is not a valid message is the client's error, so it is
//! INVALID_ARGUMENT here, with prost's description (which names the message
//! and field, e.g. `RegisterRequest.name: invalid string value`). Encoding is
//! tonic-prost's, unchanged.

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// tonic-prost's codec, with decode failures answered INVALID_ARGUMENT.
#[derive(Debug)]
pub struct RegistryCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for RegistryCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for RegistryCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = InvalidArgumentDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        InvalidArgumentDecoder(ProstCodec::<T, U>::default().decoder())
    }
}

/// A prost decoder whose errors are the sender's fault.
#[derive(Debug)]
pub struct InvalidArgumentDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for InvalidArgumentDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0
            .decode(buf)
            .map_err(|s| Status::invalid_argument(format!("malformed message: {}", s.message())))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
