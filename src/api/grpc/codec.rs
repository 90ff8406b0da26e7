//! The protobuf codec of every `dsreg.v1` service: prost's, except that a request that does
//! not decode (bytes that are no protobuf message, a string field that is not UTF-8) is the
//! caller's mistake, INVALID_ARGUMENT naming the field, where prost answers INTERNAL.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use super::status::invalid;

/// The codec the generated services and clients use (`build.rs` names it).
#[derive(Debug, Clone)]
pub struct Codec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec {
            _types: PhantomData,
        }
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(ProstDecoder::new(BufferSettings::default()))
    }
}

/// prost's decoder, with decode errors mapped to INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct Decoder<U>(ProstDecoder<U>);

impl<U: Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            if status.code() == tonic::Code::Internal {
                malformed(status.message())
            } else {
                status
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// INVALID_ARGUMENT for a message prost could not decode. prost's description reads
/// `failed to decode Protobuf message: Message.field: reason`; the field is named when known.
fn malformed(message: &str) -> Status {
    let detail = message
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(message);
    let field = detail
        .split_once(": ")
        .and_then(|(path, _)| path.split_once('.'))
        .map(|(_, field)| field)
        .filter(|f| {
            !f.is_empty()
                && f.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        });
    match field {
        Some(field) => invalid(field, format!("the request does not decode: {detail}")),
        None => invalid("request", format!("the request does not decode: {detail}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decode_error_names_the_field() {
        let status = malformed(
            "failed to decode Protobuf message: RunTestRequest.datasource_id: invalid string value: data is not UTF-8 encoded",
        );

        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("not UTF-8"),
            "{}",
            status.message()
        );
        use tonic_types::StatusExt;
        let details = status.get_details_bad_request().expect("field details");
        assert_eq!(details.field_violations[0].field, "datasource_id");
    }
}
