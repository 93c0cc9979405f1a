//! gRPC message framing of request bodies, checked before tonic decodes it.
//!
//! Owns: the answer to a request body that is not a sequence of whole gRPC
//! messages (1 flag byte, 4 length bytes, the message). tonic answers a body
//! that ends inside a message with `INTERNAL` ("Unexpected EOF decoding
//! stream."), and an unknown flag byte likewise — both blame the server for
//! the client's malformed request (found by `fuzz/`'s `grpc_service`
//! target), and so is a unary request without any message ("Missing
//! request message."). [`FramingChecked`] wraps the service and passes the
//! body through a parser that answers these `INVALID_ARGUMENT`, saying what
//! is wrong. The compressed flag without a `grpc-encoding` is left to tonic:
//! the gRPC spec requires `INTERNAL` for it.
//!
//! Must not touch: the messages themselves (the codec decodes them), or any
//! registry state. The body's bytes pass through uncopied.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

/// gRPC message header: compressed flag + big-endian length.
const HEADER_LEN: usize = 5;

/// A service whose request bodies are checked for whole gRPC messages.
#[derive(Debug, Clone)]
pub struct FramingChecked<S> {
    inner: S,
    streaming: &'static [&'static str],
}

impl<S> FramingChecked<S> {
    /// Wraps `inner`; the methods in `streaming` (paths such as
    /// `/pkg.Service/Method`) take a stream of requests, which may be empty;
    /// every other method needs a message.
    pub fn new(inner: S, streaming: &'static [&'static str]) -> Self {
        Self { inner, streaming }
    }
}

impl<S: NamedService> NamedService for FramingChecked<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for FramingChecked<S>
where
    S: Service<http::Request<Body>, Error = Infallible>,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let needs_message = !self.streaming.contains(&parts.uri.path());
        let body = Body::new(FramedBody {
            inner: body,
            parser: Parser {
                needs_message,
                ..Parser::default()
            },
            failed: false,
        });
        self.inner.call(http::Request::from_parts(parts, body))
    }
}

/// Where the parser is in the stream of messages.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Parser {
    header: [u8; HEADER_LEN],
    /// Header bytes seen of the current message (0 between messages).
    header_len: usize,
    /// Message bytes still to come after a complete header.
    remaining: u64,
    /// Declared length of the current message.
    declared: u64,
    /// Message headers seen.
    messages: u64,
    /// The method takes exactly one message (not a stream).
    needs_message: bool,
}

impl Parser {
    fn advance(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = (data.len() as u64).min(self.remaining);
                self.remaining -= n;
                data = &data[n as usize..];
                continue;
            }
            let n = (HEADER_LEN - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len == HEADER_LEN {
                let flag = self.header[0];
                if flag > 1 {
                    return Err(Status::invalid_argument(format!(
                        "malformed request: gRPC message flag {flag} (only 0, uncompressed, \
                         and 1, compressed, exist)"
                    )));
                }
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                self.declared = u64::from(len);
                self.remaining = u64::from(len);
                self.header_len = 0;
                self.messages += 1;
            }
        }
        Ok(())
    }

    /// The error for a body that ended here, if this is not a boundary.
    fn check_end(&self) -> Result<(), Status> {
        if self.header_len > 0 {
            return Err(Status::invalid_argument(format!(
                "malformed request: the body ended inside a gRPC message header \
                 ({} of {HEADER_LEN} bytes)",
                self.header_len
            )));
        }
        if self.remaining > 0 {
            return Err(Status::invalid_argument(format!(
                "malformed request: the body ended inside a gRPC message \
                 ({} of the {} bytes its header declares)",
                self.declared - self.remaining,
                self.declared
            )));
        }
        if self.needs_message && self.messages == 0 {
            return Err(Status::invalid_argument(
                "malformed request: the body holds no message, and this method takes one",
            ));
        }
        Ok(())
    }
}

struct FramedBody {
    inner: Body,
    parser: Parser,
    failed: bool,
}

impl HttpBody for FramedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref()
                    && let Err(status) = this.parser.advance(data)
                {
                    this.failed = true;
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(status)) => Poll::Ready(Some(Err(status))),
            None => match this.parser.check_end() {
                Ok(()) => Poll::Ready(None),
                Err(status) => {
                    this.failed = true;
                    Poll::Ready(Some(Err(status)))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not at the end while an error is still to be reported.
        self.failed || (self.inner.is_end_stream() && self.parser.check_end().is_ok())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(flag: u8, declared: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![flag];
        out.extend_from_slice(&declared.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn whole_messages_in_any_split_end_on_a_boundary() {
        let mut body = framed(0, 3, b"abc");
        body.extend(framed(0, 0, b""));
        body.extend(framed(1, 2, b"xy"));
        for cut in 0..=body.len() {
            let mut p = Parser::default();
            p.advance(&body[..cut]).unwrap();
            p.advance(&body[cut..]).unwrap();
            assert!(p.check_end().is_ok(), "cut at {cut}");
        }
    }

    #[test]
    fn a_body_ending_inside_a_message_or_header_is_invalid_argument() {
        let mut p = Parser::default();
        p.advance(&framed(0, 10, b"abc")).unwrap();
        let status = p.check_end().unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("3 of the 10 bytes"), "{status:?}");

        let mut p = Parser::default();
        p.advance(&[0, 0]).unwrap();
        let status = p.check_end().unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("2 of 5 bytes"), "{status:?}");
    }

    #[test]
    fn a_method_taking_a_message_refuses_an_empty_body_a_stream_does_not() {
        let unary = Parser {
            needs_message: true,
            ..Parser::default()
        };
        let status = unary.check_end().unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("no message"), "{status:?}");
        let mut with_one = unary;
        with_one.advance(&framed(0, 0, b"")).unwrap();
        assert!(with_one.check_end().is_ok());
        assert!(Parser::default().check_end().is_ok());
    }

    #[test]
    fn an_unknown_flag_is_invalid_argument() {
        let mut p = Parser::default();
        let status = p.advance(&framed(7, 1, b"a")).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("flag 7"), "{status:?}");
    }
}
