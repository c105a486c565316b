//! Client connections that stop moving are closed. A client that stops reading the
//! answer it asked for, or stops sending the body it announced, would otherwise hold its
//! connection, its task and whatever the request holds (a KV body's or page's share of
//! the memory budget, a cold piece, a chunk, a forwarded stream) for as long as the
//! socket lives, and enough such clients exhaust the node. As S3 does (its
//! `RequestTimeout`: "Your socket connection to the server was not read from or written
//! to within the timeout period"):
//!
//! - [`Guarded`] fails a write that has waited `limit` without a byte going through (the
//!   socket's unsent data is kept to [`NOTSENT_LOWAT`], so a client that reads at all
//!   lets writes through often);
//! - [`Body`] fails a request body whose next piece has been awaited for `limit`;
//! - a request head that does not arrive within `limit` of the connection being idle is
//!   hyper's `header_read_timeout`.
//!
//! Socket reads are not timed as such: while a request is being served hyper keeps a
//! read pending to notice the client leaving, so a read that waits says nothing about
//! the client.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// An I/O stream whose writes fail after waiting `limit` without progress, and whose
/// orderly close lingers (see `poll_shutdown`).
pub struct Guarded<T> {
    io: T,
    limit: Duration,
    /// Since the first of the writes that have been waiting.
    write: Option<Pin<Box<Sleep>>>,
    /// The write side is shut down; what the client still sends is being discarded
    /// (this many bytes so far) until the deadline.
    lingering: Option<(Pin<Box<Sleep>>, usize)>,
}

/// How long, and for how many bytes, a closing connection reads and discards what the
/// client still sends.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;

impl<T> Guarded<T> {
    pub fn new(io: T, limit: Duration) -> Self {
        Self {
            io,
            limit,
            write: None,
            lingering: None,
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

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
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

    /// Shuts the write side down, then reads and discards what the client still sends
    /// until it closes too, for at most [`LINGER`] and [`LINGER_BYTES`] (a lingering
    /// close, as web servers do): an answer given before the request's body was read (a
    /// refusal) would otherwise be lost to the reset that closing a socket with unread
    /// data sends, before the client has read it.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.lingering.is_none() {
            match Pin::new(&mut this.io).poll_shutdown(cx) {
                Poll::Pending => return waited(&mut this.write, this.limit, cx),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    this.write = None;
                    this.lingering = Some((Box::pin(tokio::time::sleep(LINGER)), 0));
                }
            }
        }
        let Some((deadline, discarded)) = this.lingering.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let mut buf = [0u8; 8192];
        while *discarded < LINGER_BYTES {
            let mut rb = ReadBuf::new(&mut buf);
            match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => *discarded += rb.filled().len(),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    return match deadline.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Ok(())),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Unsent bytes a client socket holds before writes wait (`TCP_NOTSENT_LOWAT`): a
/// write waits for the client's reading (about half of this), not for a send buffer of
/// up to 4 MiB to drain by a third. 1 MiB keeps large answers to a few wake-ups per
/// MiB sent.
pub const NOTSENT_LOWAT: u32 = 1024 * 1024;

/// Keeps `stream`'s unsent data to [`NOTSENT_LOWAT`] (best effort).
pub fn limit_unsent(stream: &tokio::net::TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_notsent_lowat(NOTSENT_LOWAT) {
        tracing::debug!(error = %e, "TCP_NOTSENT_LOWAT not set");
    }
}

/// A request body that fails once its next piece has been awaited for `limit`.
///
/// The wait is counted from the first poll that found nothing. A reader that stopped
/// polling (busy with something else) and comes back after the deadline finds a fresh
/// wait rather than an error: a wait is only judged by a poll that comes soon after its
/// deadline, as the deadline's own wake-up does.
pub struct Body<B> {
    inner: B,
    limit: Duration,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<B> Body<B> {
    pub fn new(inner: B, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            deadline: None,
        }
    }
}

/// How late after its deadline a poll may come and still judge the wait.
const JUDGE_WITHIN: Duration = Duration::from_secs(1);

impl<B> http_body::Body for Body<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.deadline = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let limit = this.limit;
                let now = tokio::time::Instant::now();
                if let Some(d) = &this.deadline
                    && now > d.deadline() + JUDGE_WITHIN
                {
                    // Nobody was waiting when the deadline passed: a new wait.
                    this.deadline = None;
                }
                let sleep = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match sleep.as_mut().poll(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client sent nothing of the body for {limit:?}"),
                    ))))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
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

    #[tokio::test]
    async fn a_body_whose_client_goes_quiet_fails_and_a_late_reader_gets_a_fresh_wait() {
        use http_body_util::BodyExt;
        let (mut tx, rx) =
            futures::channel::mpsc::channel::<Result<http_body::Frame<Bytes>, io::Error>>(4);
        let inner = http_body_util::StreamBody::new(rx);
        let mut body = Body::new(inner, Duration::from_millis(300));
        tx.try_send(Ok(http_body::Frame::data(Bytes::from_static(b"a"))))
            .unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        // One poll finds nothing; the reader then does something else for longer than
        // the limit and more than JUDGE_WITHIN past it: its next wait starts afresh.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), body.frame())
                .await
                .is_err()
        );
        tokio::time::sleep(Duration::from_millis(300) + JUDGE_WITHIN + Duration::from_millis(200))
            .await;
        let mut late = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            late.try_send(Ok(http_body::Frame::data(Bytes::from_static(b"b"))))
                .unwrap();
        });
        // (Without the fresh wait this poll would fail at once.)
        assert!(body.frame().await.unwrap().is_ok());
        // Then the client goes quiet while the reader waits: the body fails.
        let t0 = tokio::time::Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("sent nothing"), "{err}");
        assert!(t0.elapsed() >= Duration::from_millis(300));
        drop(tx);
    }

    /// A server that answers before reading the body and closes: the client still
    /// sending reads the whole answer, not a reset.
    #[tokio::test]
    async fn an_answer_given_before_the_body_reaches_a_client_still_sending() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut s = Guarded::new(s, Duration::from_secs(5));
            let mut head = [0u8; 16];
            s.read_exact(&mut head).await.unwrap();
            // Unread data is waiting when the answer goes out.
            tokio::time::sleep(Duration::from_millis(200)).await;
            s.write_all(b"refused").await.unwrap();
            s.shutdown().await.unwrap();
        });
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(&[1u8; 16]).await.unwrap();
        // The body keeps coming while the server answers and closes.
        let (mut rd, mut wr) = c.into_split();
        let sender = tokio::spawn(async move {
            let piece = vec![0u8; 64 * 1024];
            for i in 0..32 {
                wr.write_all(&piece)
                    .await
                    .map_err(|e| format!("piece {i}: {e}"))?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, String>(())
        });
        let mut answer = Vec::new();
        rd.read_to_end(&mut answer)
            .await
            .expect("the answer, not a reset");
        assert_eq!(answer, b"refused");
        // The body sent after the answer was taken in and discarded, not reset.
        sender
            .await
            .unwrap()
            .expect("every piece of the body went out");
        server.await.unwrap();
    }
}
