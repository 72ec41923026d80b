//! The one HTTP client (rustls + hyper): the reference EES client, the `jwks_url` and CRL
//! fetchers, the load generator, the CLI's control-socket requests and the tests all speak
//! to servers through it. A [`Connection`] runs over any byte stream (TLS, plain TCP, a
//! Unix socket) and carries one request after another; [`HttpsClient`] opens them.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A response, whole.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
    /// The ALPN protocol the server chose, if any.
    pub alpn: Option<Vec<u8>>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Client errors, as text: the callers only report them.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientError(pub String);

fn err(e: impl std::fmt::Display) -> ClientError {
    ClientError(e.to_string())
}

/// Which HTTP version to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// An HTTPS client with fixed trust roots and an optional client certificate.
#[derive(Clone)]
pub struct HttpsClient {
    config: Arc<rustls::ClientConfig>,
    version: HttpVersion,
    timeout: Duration,
}

/// The crypto provider for every TLS endpoint of this process: aws-lc-rs, named explicitly
/// so that feature unification elsewhere can never switch it.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Trust roots from a PEM bundle.
pub fn root_store(roots_pem: &[u8]) -> Result<rustls::RootCertStore, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(roots_pem) {
        roots.add(c.map_err(err)?).map_err(err)?;
    }
    if roots.is_empty() {
        return Err(ClientError("no CA certificate in the trust file".into()));
    }
    Ok(roots)
}

/// The system's web trust roots (the operating system's CA bundle), as PEM: what an HTTPS
/// fetch trusts when the configuration names no CA of its own. Never the ECS's own CA, whose
/// EES certificates carry serverAuth.
pub fn system_roots_pem() -> Result<Vec<u8>, String> {
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() {
        return Err(format!(
            "no system trust roots could be read ({}); name a CA file instead",
            found
                .errors
                .first()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "the system bundle is empty".into())
        ));
    }
    let mut pem = Vec::new();
    for c in &found.certs {
        pem.extend_from_slice(ecs_ca_backends::der_to_pem(c, "CERTIFICATE").as_bytes());
    }
    Ok(pem)
}

impl HttpsClient {
    /// A client trusting the PEM roots, presenting `identity` (certificate chain PEM, key PEM)
    /// when given.
    pub fn new(
        roots_pem: &[u8],
        identity: Option<(&[u8], &[u8])>,
        version: HttpVersion,
    ) -> Result<Self, ClientError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(err)?
            .with_root_certificates(root_store(roots_pem)?);
        let mut config = match identity {
            Some((chain, key)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
                    .collect::<Result<_, _>>()
                    .map_err(err)?;
                let key = PrivateKeyDer::from_pem_slice(key).map_err(err)?;
                builder.with_client_auth_cert(chain, key).map_err(err)?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = match version {
            HttpVersion::Http1 => vec![b"http/1.1".to_vec()],
            HttpVersion::Http2 => vec![b"h2".to_vec()],
        };
        Ok(Self::from_config(Arc::new(config), version))
    }

    /// A client over a caller-built rustls configuration (tests use it to pin versions).
    pub fn from_config(config: Arc<rustls::ClientConfig>, version: HttpVersion) -> Self {
        HttpsClient {
            config,
            version,
            timeout: Duration::from_secs(30),
        }
    }

    /// Sends one request on a new connection and reads the whole answer.
    pub async fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Response, ClientError> {
        // Trust material (JWKS, CRLs) and the EES API are fetched over TLS only.
        if split_url(url)?.scheme != Scheme::Https {
            return Err(ClientError(format!("{url:?} is not an https:// URL")));
        }
        let exchange = async {
            let (mut conn, path) = self.connect(url).await?;
            conn.send(method, &path, headers, body).await
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError(format!("{method} {url}: timed out")))?
    }

    /// Opens a connection to the URL's server (TLS for `https://`, plain TCP for
    /// `http://`); returns it and the URL's path.
    pub async fn connect(&self, url: &str) -> Result<(Connection, String), ClientError> {
        let target = split_url(url)?;
        let (host, port) = (&target.host, target.port);
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| ClientError(format!("connect {host}:{port}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let authority = if port == target.scheme.default_port() {
            host.clone()
        } else {
            format!("{host}:{port}")
        };
        let conn = match target.scheme {
            Scheme::Http => Connection::over(tcp, HttpVersion::Http1, authority, None).await?,
            Scheme::Https => {
                let name = ServerName::try_from(host.clone()).map_err(err)?;
                let tls = TlsConnector::from(self.config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ClientError(format!("TLS with {host}:{port}: {e}")))?;
                let alpn = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
                let resumed =
                    tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                let mut conn = Connection::over(tls, self.version, authority, alpn).await?;
                conn.resumed = resumed;
                conn
            }
        };
        Ok((conn, target.path))
    }
}

/// One HTTP connection: requests go one after another (HTTP/1.1 keep-alive) or side by side
/// (HTTP/2) until it closes.
pub struct Connection {
    send: Sender,
    authority: String,
    alpn: Option<Vec<u8>>,
    /// The TLS session was resumed with a ticket (no full handshake).
    resumed: bool,
}

enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Connection {
    /// Speaks `version` over `io`; `authority` names the server in each request.
    pub async fn over<IO>(
        io: IO,
        version: HttpVersion,
        authority: String,
        alpn: Option<Vec<u8>>,
    ) -> Result<Self, ClientError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        let send = match version {
            HttpVersion::Http1 => {
                let (send, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(err)?;
                tokio::spawn(conn);
                Sender::Http1(send)
            }
            HttpVersion::Http2 => {
                let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(err)?;
                tokio::spawn(conn);
                Sender::Http2(send)
            }
        };
        Ok(Connection {
            send,
            authority,
            alpn,
            resumed: false,
        })
    }

    /// Whether TLS resumed an earlier session with a ticket instead of a full handshake.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Sends one request; the answer comes with its body still to be read (a stream).
    pub async fn send_streamed(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let mut req = Request::builder().method(method);
        req = match self.send {
            Sender::Http1(_) => req.uri(path).header("host", &self.authority),
            Sender::Http2(_) => req.uri(format!("https://{}{path}", self.authority)),
        };
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(err)?;
        match &mut self.send {
            Sender::Http1(send) => {
                send.ready().await.map_err(err)?;
                send.send_request(req).await.map_err(err)
            }
            Sender::Http2(send) => {
                send.ready().await.map_err(err)?;
                send.send_request(req).await.map_err(err)
            }
        }
    }

    /// Sends one request and reads the whole answer.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Response, ClientError> {
        let resp = self.send_streamed(method, path, headers, body).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(err)?
            .to_bytes()
            .to_vec();
        Ok(Response {
            status,
            headers,
            body,
            alpn: self.alpn.clone(),
        })
    }
}

/// The URL schemes the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// A URL taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    pub path: String,
}

/// `http[s]://host[:port]/path` → its parts.
pub fn split_url(url: &str) -> Result<Target, ClientError> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (Scheme::Https, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (Scheme::Http, rest)
    } else {
        return Err(ClientError(format!("{url:?} is not an http(s):// URL")));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6
            .split_once(']')
            .ok_or_else(|| ClientError(format!("{url:?}: bad IPv6 host")))?;
        (h.to_string(), p.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse()
            .map_err(|_| ClientError(format!("{url:?}: bad port")))?,
        None => scheme.default_port(),
    };
    Ok(Target {
        scheme,
        host,
        port,
        path,
    })
}
