//! TLS on the wire: the accepting side (each connection's caller judged once, after its
//! handshake) and the connecting side (a tonic connector that checks which node it reached).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::material::principal_of;
use super::{Expect, Principal, Security, TlsError};

/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is calling, as established when its connection was accepted (a request extension).
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) addr: Option<SocketAddr>,
    pub(crate) auth: Arc<Auth>,
}

/// What the caller's certificate proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Auth {
    /// This node runs without TLS: callers are not authenticated.
    Insecure,
    /// TLS without a client certificate.
    NoCertificate,
    /// A certificate that is not valid here, and why.
    Invalid(String),
    Verified(Principal),
}

/// An accepted connection.
pub(crate) enum Conn {
    Plain(TcpStream, Caller),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, Caller),
}

impl Connected for Conn {
    type ConnectInfo = Caller;
    fn connect_info(&self) -> Caller {
        match self {
            Conn::Plain(_, c) | Conn::Tls(_, c) => c.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s, _) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections `listener` accepts, each through its TLS handshake (run concurrently, so a
/// slow client holds up no other) when `security` has an identity.
pub(crate) fn incoming(
    listener: TcpListener,
    security: Security,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Small request/response messages: without TCP_NODELAY, Nagle's algorithm and
            // delayed acknowledgements add tens of milliseconds to some of them.
            let _ = tcp.set_nodelay(true);
            let Some(m) = security.material() else {
                let caller = Caller {
                    addr: Some(addr),
                    auth: Arc::new(Auth::Insecure),
                };
                if tx.send(Ok(Conn::Plain(tcp, caller))).await.is_err() {
                    return;
                }
                continue;
            };
            let Some(server) = m.server.clone() else {
                tracing::error!("no certificate to serve with; connection dropped");
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(server);
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(peer = %addr, "TLS handshake timed out");
                        return;
                    }
                };
                let auth = match tls.get_ref().1.peer_certificates() {
                    None | Some([]) => Auth::NoCertificate,
                    Some(chain) => match m.judge_client(chain) {
                        Ok(p) => Auth::Verified(p),
                        Err(why) => Auth::Invalid(why),
                    },
                };
                let caller = Caller {
                    addr: Some(addr),
                    auth: Arc::new(auth),
                };
                let _ = tx.send(Ok(Conn::Tls(Box::new(tls), caller))).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// tonic connector: TCP, then TLS with the identity current at connect time, then a check that
/// the server is the node expected.
#[derive(Debug, Clone)]
pub(crate) struct Connector {
    security: Security,
    addr: Arc<str>,
    expect: Expect,
}

impl Connector {
    pub(crate) fn new(security: Security, addr: &str, expect: Expect) -> Self {
        Self {
            security,
            addr: addr.into(),
            expect,
        }
    }
}

type ClientStream = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower::Service<http::Uri> for Connector {
    type Response = ClientStream;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<ClientStream, TlsError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), TlsError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let addr = me.addr.to_string();
            let fail = |problem: String| TlsError::Connect {
                addr: addr.clone(),
                problem,
            };
            let m = me
                .security
                .material()
                .ok_or_else(|| fail("no TLS identity".into()))?;
            let tcp = TcpStream::connect(&*me.addr)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let host = me
                .addr
                .rsplit_once(':')
                .map_or(&*me.addr, |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']');
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| fail(format!("{host:?} is not a host name: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(m.client.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let server = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or_else(|| fail("the server presented no certificate".into()))
                .and_then(|leaf| principal_of(leaf).map_err(&fail))?;
            if let Expect::Node(id) = me.expect {
                if server.node_id() != Some(id) {
                    return Err(fail(format!(
                        "expected node {id}, the server is {server} (a reused address?)"
                    )));
                }
            }
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}
