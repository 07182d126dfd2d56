//! A body fed frame by frame from a channel, used for streamed responses (SSE, gRPC trailers,
//! endless streams) and streamed (chunked) request bodies.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

/// A body whose frames come from an `mpsc` channel; it ends when every sender is dropped.
/// It reports no exact size, so hyper frames it as chunked (HTTP/1.1) or plain DATA (h2).
pub struct ChannelBody {
    rx: mpsc::Receiver<Frame<Bytes>>,
    guard: Option<DropGuard>,
}

/// Counts a body dropped before its end: that is how an upstream learns the client went away
/// (hyper drops the response body when the connection or stream closes).
pub struct DropGuard {
    counter: Arc<AtomicUsize>,
    finished: bool,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.counter.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl ChannelBody {
    /// A body and the sender that feeds it.
    pub fn channel() -> (mpsc::Sender<Frame<Bytes>>, ChannelBody) {
        let (tx, rx) = mpsc::channel(16);
        (tx, ChannelBody { rx, guard: None })
    }

    /// Like [`ChannelBody::channel`], but `counter` goes up by one if the body is dropped
    /// before it ended.
    pub fn channel_with_drop_counter(
        counter: Arc<AtomicUsize>,
    ) -> (mpsc::Sender<Frame<Bytes>>, ChannelBody) {
        let (tx, mut body) = Self::channel();
        body.guard = Some(DropGuard {
            counter,
            finished: false,
        });
        (tx, body)
    }

    /// A body made of the given data chunks, all available at once, with no declared length.
    pub fn from_chunks<I>(chunks: I) -> ChannelBody
    where
        I: IntoIterator,
        I::Item: Into<Bytes>,
    {
        let chunks: Vec<Bytes> = chunks.into_iter().map(Into::into).collect();
        let (tx, rx) = mpsc::channel(chunks.len().max(1));
        for c in chunks {
            tx.try_send(Frame::data(c))
                .expect("channel sized for all chunks");
        }
        ChannelBody { rx, guard: None }
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(frame)) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) => {
                if let Some(g) = self.guard.as_mut() {
                    g.finished = true;
                }
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
