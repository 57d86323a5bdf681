//! A TCP connection that is plaintext or TLS, upgraded in place for STARTTLS.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A client connection (server-side TLS).
pub type ClientStream = Stream<crate::server_tls::ServerTls>;
/// A backend connection (client-side TLS).
pub type BackendStream = Stream<tokio_rustls::client::TlsStream<TcpStream>>;

/// Plaintext TCP, or TLS over TCP. The TLS state is boxed: it is large, and most
/// idle plaintext sessions never need it.
pub enum Stream<T> {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS.
    Tls(Box<T>),
}

impl<T> Stream<T> {
    /// True once TLS is established.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }
}

impl crate::relay::FinalWrite for ClientStream {
    /// Plain TCP: TCP_CORK, so the close sends the last bytes and the FIN in one segment
    /// (the close pushes corked data at once). TLS writes as usual: its close_notify
    /// follows.
    fn hold_for_close(&mut self) {
        if let Stream::Plain(tcp) = self {
            let _ = socket2::SockRef::from(&*tcp).set_tcp_cork(true);
        }
    }
}

impl crate::relay::FinalWrite for BackendStream {}

impl BackendStream {
    /// Makes the close reset the connection (`SO_LINGER` 0) instead of sending a FIN. For
    /// a backend that has already closed its side and has been read to the end: it is
    /// waiting for nothing, and a reset spares it a TIME_WAIT socket and both hosts a
    /// FIN/ACK exchange per session (what HAProxy's `option nolinger` does).
    pub fn reset_on_close(&self) {
        let tcp = match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(t) => t.get_ref().0,
        };
        let _ = tcp.set_zero_linger();
    }
}

impl ClientStream {
    /// The negotiated TLS version, if any.
    pub fn tls_version(&self) -> Option<rustls::ProtocolVersion> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(t) => t.protocol_version(),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}
