//! Client connections that stop reading are closed. A client that stops reading the
//! answer it asked for would otherwise hold its connection, its task and whatever of
//! the answer is in flight (a cold piece, a chunk, a reserved KV page, a forwarded
//! stream) for as long as the socket lives, and enough such clients exhaust the node.
//! [`Guarded`] fails a write that has waited `limit` without a byte going through, as
//! S3 does (its `RequestTimeout`: "Your socket connection to the server was not read
//! from or written to within the timeout period"); hyper then drops the request and its
//! answer.
//!
//! Reads are not timed here: while a request is being served hyper keeps a read
//! pending to notice the client leaving, so a read that waits says nothing about the
//! client. A request head that does not arrive (idle keep-alive connections included)
//! is bounded by hyper's `header_read_timeout` instead.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// An I/O stream whose writes fail after waiting `limit` without progress.
pub struct Guarded<T> {
    io: T,
    limit: Duration,
    /// Since the first of the writes that have been waiting.
    write: Option<Pin<Box<Sleep>>>,
}

impl<T> Guarded<T> {
    pub fn new(io: T, limit: Duration) -> Self {
        Self {
            io,
            limit,
            write: None,
        }
    }
}

/// After the inner stream answered Pending: Pending while the wait that began then is
/// shorter than `limit`, else the error that ends the connection.
fn waited<T>(
    deadline: &mut Option<Pin<Box<Sleep>>>,
    limit: Duration,
    cx: &mut Context<'_>,
) -> Poll<io::Result<T>> {
    let sleep = deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
    match sleep.as_mut().poll(cx) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client read nothing for {limit:?}: connection closed"),
        ))),
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Pending => waited(&mut this.write, this.limit, cx),
            done => {
                this.write = None;
                done
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            Poll::Pending => waited(&mut this.write, this.limit, cx),
            done => {
                this.write = None;
                done
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending => waited(&mut this.write, this.limit, cx),
            done => {
                this.write = None;
                done
            }
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_shutdown(cx) {
            Poll::Pending => waited(&mut this.write, this.limit, cx),
            done => {
                this.write = None;
                done
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_write_nobody_reads_fails_after_the_limit_and_progress_resets_it() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut a = Guarded::new(a, Duration::from_millis(300));
        // Progress: a reader keeps taking bytes, so writes never wait long.
        let reader = tokio::spawn(async move {
            let mut buf = vec![0; 1024];
            let mut got = 0;
            while got < 64 * 1024 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                got += b.read(&mut buf).await.unwrap();
            }
            b
        });
        let chunk = vec![7u8; 4096];
        let mut sent = 0;
        while sent < 64 * 1024 {
            a.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
        let _b = reader.await.unwrap();
        // Nobody reads any more: the write fails once it has waited the limit.
        let t0 = tokio::time::Instant::now();
        let err = loop {
            if let Err(e) = a.write_all(&chunk).await {
                break e;
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(t0.elapsed() >= Duration::from_millis(300));
    }
}
