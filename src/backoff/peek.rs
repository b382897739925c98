//! A refusal dressed as a stream: vLLM answers some streamed requests it
//! has no room for with `200 OK` and a single SSE event,
//! `data: {"error": {…, "code": 503}}`, then `[DONE]`. Passed on, the
//! client gets a 200 that carries only an error, and the record says `ok`
//! with no tokens. So the first event of a streamed answer to an admitted
//! request is read before the answer goes on: if it is an error whose code
//! is 429 or 503, the answer is turned into what it is, a refusal with that
//! status and the error as its JSON body, and back-off handles it like any
//! other (retried within the budget, or passed to the client with a
//! `Retry-After`). Any other first event goes on, unchanged, ahead of the
//! rest of the body.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::BoxError;

/// The most read while looking for the end of the first event: a first
/// event longer than this is not an error event.
const MAX_FIRST_EVENT: usize = 64 * 1024;

pin_project_lite::pin_project! {
    /// A response body, maybe with its first bytes read ahead (and handed
    /// on first), or replaced by a refusal's JSON.
    #[derive(Debug)]
    pub struct Peeked<B> {
        first: Option<Bytes>,
        #[pin]
        inner: Inner<B>,
    }
}

pin_project_lite::pin_project! {
    #[project = InnerProj]
    #[derive(Debug)]
    enum Inner<B> {
        // As it came: no cost but a branch.
        Plain { #[pin] body: B },
        // Read from (a stream, once): boxed so it could be polled before.
        Read { body: Pin<Box<B>> },
        // A refusal: `first` is the whole body.
        Gone,
    }
}

impl<B> Peeked<B> {
    /// `inner` as it is.
    pub fn plain(inner: B) -> Self {
        Self {
            first: None,
            inner: Inner::Plain { body: inner },
        }
    }
}

impl<B> Body for Peeked<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        match this.inner.project() {
            InnerProj::Plain { body } => body.poll_frame(cx),
            InnerProj::Read { body } => body.as_mut().poll_frame(cx),
            InnerProj::Gone => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none()
            && match &self.inner {
                Inner::Plain { body } => body.is_end_stream(),
                Inner::Read { body } => body.is_end_stream(),
                Inner::Gone => true,
            }
    }

    fn size_hint(&self) -> SizeHint {
        let first = self.first.as_ref().map_or(0, |f| f.len() as u64);
        let mut hint = match &self.inner {
            Inner::Plain { body } => body.size_hint(),
            Inner::Read { body } => body.size_hint(),
            Inner::Gone => SizeHint::with_exact(0),
        };
        // Upper first: a lower bound may never pass the upper.
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper.saturating_add(first));
        }
        hint.set_lower(hint.lower().saturating_add(first));
        hint
    }
}

/// Whether `resp` is a streamed answer whose first event must be read.
pub fn is_stream<B>(resp: &Response<B>) -> bool {
    resp.status() == StatusCode::OK
        && resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|ct| {
                let ct = ct.as_bytes();
                ct.len() >= 17 && ct[..17].eq_ignore_ascii_case(b"text/event-stream")
            })
}

/// The status a first SSE event refuses with: an `{"error": …}` object
/// whose `code` is 429 or 503 (a number, or a string of one).
pub fn refusal(event: &[u8]) -> Option<(StatusCode, Bytes)> {
    let text = std::str::from_utf8(event).ok()?;
    let data = text.lines().find_map(|l| l.strip_prefix("data:"))?.trim();
    if !data.starts_with('{') || !data.contains("\"error\"") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(data).ok()?;
    let code = v.get("error")?.get("code")?;
    let code = code
        .as_u64()
        .or_else(|| code.as_str().and_then(|s| s.parse().ok()))?;
    let status = match code {
        429 => StatusCode::TOO_MANY_REQUESTS,
        503 => StatusCode::SERVICE_UNAVAILABLE,
        _ => return None,
    };
    Some((status, Bytes::from(data.to_owned())))
}

/// Read `resp`'s first SSE event (up to its blank line, [`MAX_FIRST_EVENT`]
/// or the end of the body) and decide: a refusal becomes a response of its
/// status with the error as its JSON body; anything else goes on with what
/// was read handed on first.
pub async fn first_event<B>(resp: Response<B>) -> Result<Response<Peeked<B>>, BoxError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = resp.into_parts();
    let mut body = Box::pin(body);
    let mut read = BytesMut::new();
    loop {
        let Some(frame) = body.frame().await else {
            break;
        };
        match frame.map_err(Into::into)?.into_data() {
            Ok(data) => read.extend_from_slice(&data),
            // Trailers: nothing more of the first event will come.
            Err(_) => break,
        }
        let event_done = memchr::memmem::find(&read, b"\n\n").is_some()
            || memchr::memmem::find(&read, b"\r\n\r\n").is_some();
        if event_done || read.len() > MAX_FIRST_EVENT {
            break;
        }
    }
    let read = read.freeze();
    if let Some((status, json)) = refusal(&read) {
        parts.status = status;
        parts.headers.remove(http::header::CONTENT_LENGTH);
        parts.headers.remove(http::header::TRANSFER_ENCODING);
        parts.headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        // The rest of the refused stream is dropped unread (its connection
        // is not reused).
        return Ok(Response::from_parts(
            parts,
            Peeked {
                first: Some(json),
                inner: Inner::Gone,
            },
        ));
    }
    Ok(Response::from_parts(
        parts,
        Peeked {
            first: (!read.is_empty()).then_some(read),
            inner: Inner::Read { body },
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_by_their_code() {
        let vllm = b"data: {\"error\": {\"object\": \"error\", \"message\": \"busy\", \"type\": \"ServiceUnavailableError\", \"param\": null, \"code\": 503}}\n\n";
        let (status, json) = refusal(vllm).unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(json.starts_with(b"{\"error\""));
        assert_eq!(
            refusal(b"data: {\"error\":{\"code\":\"429\",\"message\":\"slow down\"}}\n\n")
                .map(|r| r.0),
            Some(StatusCode::TOO_MANY_REQUESTS)
        );
        for other in [
            // A real first chunk.
            &b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n"[..],
            // An error that is not about capacity.
            b"data: {\"error\":{\"code\":400,\"message\":\"bad\"}}\n\n",
            // anteroom's own stream-guard event.
            b"\n\ndata: {\"error\":{\"code\":\"first_token_timeout\"}}\n\n",
            // Content that talks about errors.
            b"data: {\"choices\":[{\"delta\":{\"content\":\"\\\"error\\\" 503\"}}]}\n\n",
            b"data: [DONE]\n\n",
            b"",
            b"\xff\xfe",
        ] {
            assert_eq!(refusal(other), None, "{:?}", String::from_utf8_lossy(other));
        }
    }

    #[test]
    fn the_size_hint_counts_what_was_read_ahead() {
        let gone: Peeked<http_body_util::Empty<Bytes>> = Peeked {
            first: Some(Bytes::from_static(b"{}")),
            inner: Inner::Gone,
        };
        assert_eq!(gone.size_hint().exact(), Some(2));
        let ahead = Peeked {
            first: Some(Bytes::from_static(b"data: x\n\n")),
            inner: Inner::Plain {
                body: http_body_util::Full::new(Bytes::from_static(b"rest")),
            },
        };
        assert_eq!(ahead.size_hint().exact(), Some(13));
        assert!(!ahead.is_end_stream());
    }
}
