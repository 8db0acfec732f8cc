//! An HTTP forward proxy on loopback standing in for an egress proxy: it tunnels
//! `CONNECT` and passes on absolute-form requests, whatever host they name, to one
//! upstream address, and records what it was asked.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// The first request of a connection to the proxy.
#[derive(Clone, Debug)]
pub struct Proxied {
    /// Its request line: `CONNECT host:443 HTTP/1.1`, `POST http://host/path HTTP/1.1`.
    pub line: String,
    /// Its `Proxy-Authorization` header.
    pub authorization: Option<String>,
}

pub struct ForwardProxy {
    /// Where it listens, by name: `localhost:{port}` (prefix a scheme to use it).
    pub address: String,
    seen: Arc<Mutex<Vec<Proxied>>>,
}

impl ForwardProxy {
    /// A proxy that sends everything to `upstream`.
    pub async fn start(upstream: SocketAddr) -> ForwardProxy {
        Self::listen(upstream, None).await
    }

    /// The same, reached over TLS (an `https://` proxy), presenting `tls`'s certificate.
    pub async fn start_tls(upstream: SocketAddr, tls: TlsAcceptor) -> ForwardProxy {
        Self::listen(upstream, Some(tls)).await
    }

    async fn listen(upstream: SocketAddr, tls: Option<TlsAcceptor>) -> ForwardProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("localhost:{}", listener.local_addr().unwrap().port());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (record, tls) = (record.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => relay(client, upstream, record).await,
                        // A refused handshake (the client distrusting the certificate) ends here.
                        Some(tls) => {
                            if let Ok(client) = tls.accept(client).await {
                                relay(client, upstream, record).await;
                            }
                        }
                    }
                });
            }
        });
        ForwardProxy { address, seen }
    }

    /// What it was asked so far (one entry per connection).
    pub fn requests(&self) -> Vec<Proxied> {
        self.seen.lock().unwrap().clone()
    }
}

async fn relay<C: AsyncRead + AsyncWrite + Unpin>(mut client: C, upstream: SocketAddr, seen: Arc<Mutex<Vec<Proxied>>>) {
    // The request head; a body's first bytes may come with it and are passed on as read.
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or_default().to_string();
    let authorization = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("proxy-authorization"))
        .map(|(_, value)| value.trim().to_string());
    let tunnel = line.starts_with("CONNECT ");
    seen.lock().unwrap().push(Proxied { line, authorization });
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        let _ = client
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    };
    let passed = if tunnel {
        client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await
    } else {
        server.write_all(&head).await
    };
    if passed.is_ok() {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    }
}
