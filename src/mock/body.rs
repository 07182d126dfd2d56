//! The mock's response body: a small body written at once, or a paced server-sent-event
//! stream.
//!
//! A stream's events are built when the request is answered and released on a timer by the
//! body itself, not by a spawned task: when the client goes away hyper drops the body and the
//! stream simply stops, with nothing left running.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// A mock model's response body.
#[derive(Debug)]
pub struct MockBody {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    Paced(Paced),
}

#[derive(Debug)]
struct Paced {
    /// Events still to send, in order.
    events: VecDeque<Bytes>,
    /// Of those, how many still wait `interval` before going out. The first event goes at
    /// once and the closing `[DONE]` right after the last chunk.
    paced: usize,
    interval: Duration,
    /// When the next paced event is due; boxed so the body stays `Unpin`.
    timer: Pin<Box<Sleep>>,
    /// The first event has not gone out yet.
    first: bool,
}

impl MockBody {
    /// A body of `bytes`, sent in one frame.
    pub(crate) fn full(bytes: impl Into<Bytes>) -> MockBody {
        MockBody {
            kind: Kind::Full(Some(bytes.into())),
        }
    }

    /// `chunks` followed by `tail`: the first chunk at once, then one every `interval`, then
    /// `tail` straight after the last chunk.
    pub(crate) fn paced(chunks: Vec<Bytes>, tail: Bytes, interval: Duration) -> MockBody {
        let paced = chunks.len().saturating_sub(1);
        let mut events: VecDeque<Bytes> = chunks.into();
        events.push_back(tail);
        MockBody {
            kind: Kind::Paced(Paced {
                events,
                paced,
                interval,
                timer: Box::pin(tokio::time::sleep_until(Instant::now())),
                first: true,
            }),
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.get_mut().kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Paced(p) => {
                if p.first {
                    p.first = false;
                    // Space events from the first one, not from when the head went out.
                    let start = Instant::now();
                    p.timer.as_mut().reset(start + p.interval);
                } else if p.paced > 0 && !p.events.is_empty() {
                    if p.timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    p.paced -= 1;
                    // Next deadline from the previous one, so the pace does not drift with
                    // scheduling delays.
                    let next = p.timer.deadline() + p.interval;
                    p.timer.as_mut().reset(next);
                }
                Poll::Ready(p.events.pop_front().map(|b| Ok(Frame::data(b))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Paced(p) => p.events.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            // Unknown on purpose: a stream is sent chunked (h1) or as open DATA frames (h2).
            Kind::Paced(_) => SizeHint::default(),
        }
    }
}
