//! The client's TLS connector.
//!
//! In TLS 1.3 the client finishes its handshake before the server has
//! checked the client certificate, so a server that refuses the certificate
//! shows up later as a bare "connection closed" on the first call. This
//! connector performs the handshake itself and then waits (briefly) for the
//! server's first bytes — an HTTP/2 server speaks first, with its SETTINGS
//! frame — so that a refusal arrives here as the server's TLS alert
//! (`CertificateRequired`, `UnknownCA`, `CertificateExpired`…) and can be
//! reported as such. The bytes read are replayed to hyper.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

/// How long to wait for the server's first bytes after the handshake. A
/// server that stays silent this long is not refusing us: carry on.
const FIRST_BYTES_WAIT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct TlsConnector {
    pub(crate) config: Arc<rustls::ClientConfig>,
    pub(crate) server_name: ServerName<'static>,
    pub(crate) address: String,
}

impl tower::Service<tonic::codegen::http::Uri> for TlsConnector {
    type Response = TokioIo<PrefixedStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: tonic::codegen::http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(&this.address).await?;
            tcp.set_nodelay(true)?;
            let mut tls = tokio_rustls::TlsConnector::from(this.config).connect(this.server_name, tcp).await?;
            let mut first = vec![0u8; 16 * 1024];
            let n = match tokio::time::timeout(FIRST_BYTES_WAIT, tls.read(&mut first)).await {
                Ok(Ok(0)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the server closed the connection right after the TLS handshake",
                    ));
                }
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(e),
                Err(_) => 0,
            };
            first.truncate(n);
            Ok(TokioIo::new(PrefixedStream { prefix: first, offset: 0, inner: tls }))
        })
    }
}

/// A TLS stream with bytes already read from it put back in front.
pub struct PrefixedStream {
    prefix: Vec<u8>,
    offset: usize,
    inner: TlsStream<TcpStream>,
}

impl AsyncRead for PrefixedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.offset < self.prefix.len() {
            let n = (self.prefix.len() - self.offset).min(buf.remaining());
            let start = self.offset;
            buf.put_slice(&self.prefix[start..start + n]);
            self.offset += n;
            if self.offset == self.prefix.len() {
                self.prefix = Vec::new();
                self.offset = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PrefixedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
