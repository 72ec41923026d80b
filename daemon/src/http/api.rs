//! The EES-facing HTTPS listener (HTTP/2 and HTTP/1.1 on one port) and its routes, with
//! graceful shutdown that lets in-flight registrations finish.

use super::{Body, response};
use crate::app::App;
use crate::audit::Action;
use crate::problem::{ApiError, Cause};
use crate::registration::{self, Reply, RequestCtx};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Largest request body accepted (`contract/api.md` §1).
pub const MAX_BODY: usize = 64 * 1024;
const API_PREFIX: &str = "/eecs-eesregistration/v1/registrations";

/// What a connection knows about its peer, shared by every request on it.
#[derive(Clone)]
struct Conn {
    addr: SocketAddr,
    /// The client's certificate chain as presented, end entity first.
    client_chain: Arc<Vec<Vec<u8>>>,
}

fn problem(e: &ApiError) -> Response<Body> {
    let mut r = response(e.status(), "application/problem+json", e.body());
    for (k, v) in e.headers() {
        if let Ok(v) = v.parse() {
            r.headers_mut().insert(k, v);
        }
    }
    r
}

fn reply(r: Reply) -> Response<Body> {
    let body = r.body.unwrap_or_default();
    let ct = if body.is_empty() {
        ""
    } else {
        "application/json"
    };
    let mut resp = response(r.status, ct, body);
    if let Some(l) = r.location
        && let Ok(v) = l.parse()
    {
        resp.headers_mut().insert(hyper::header::LOCATION, v);
    }
    resp
}

/// Checks the content type against `expected` (parameters such as charset allowed).
fn check_content_type(req: &Request<Incoming>, expected: &str) -> Result<(), ApiError> {
    let ct = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = ct.split(';').next().unwrap_or("").trim();
    if media.eq_ignore_ascii_case(expected) {
        Ok(())
    } else {
        Err(ApiError::new(
            Cause::UnsupportedMediaType,
            format!("content type must be {expected}, not {media:?}"),
        ))
    }
}

/// Reads the body, refusing more than [`MAX_BODY`] bytes before reading them when the
/// length is announced, and as soon as they arrive otherwise.
async fn read_body(req: Request<Incoming>, within: Duration) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            Cause::PayloadTooLarge,
            format!("the body is over {MAX_BODY} bytes"),
        )
    };
    if let Some(len) = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > MAX_BODY as u64
    {
        return Err(too_large());
    }
    let collected = tokio::time::timeout(within, Limited::new(req.into_body(), MAX_BODY).collect())
        .await
        .map_err(|_| ApiError::new(Cause::InvalidMsgFormat, "the body did not arrive in time"))?;
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::new(
            Cause::InvalidMsgFormat,
            format!("the body could not be read: {e}"),
        )),
    }
}

/// Content type first, then the size: both are refused before anything is parsed.
async fn checked_body(
    app: &App,
    req: Request<Incoming>,
    content_type: &str,
) -> Result<Bytes, ApiError> {
    check_content_type(&req, content_type)?;
    let within = Duration::from_secs(app.cfg.limits.request_body_timeout.as_secs());
    read_body(req, within).await
}

fn bearer(req: &Request<Incoming>) -> Option<String> {
    let v = req
        .headers()
        .get(hyper::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

fn not_allowed(allow: &str) -> ApiError {
    ApiError::new(Cause::MethodNotAllowed, format!("allowed methods: {allow}"))
}

fn method_not_allowed(allow: &str) -> Response<Body> {
    let mut r = problem(&not_allowed(allow));
    r.headers_mut()
        .insert(hyper::header::ALLOW, allow.parse().expect("static"));
    r
}

async fn handle(app: Arc<App>, conn: Conn, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let ctx = RequestCtx {
        client_addr: conn.addr.to_string(),
        client_cert: conn.client_chain.first().cloned(),
        client_chain: conn.client_chain.clone(),
        bearer: bearer(&req),
    };
    let result = route(&app, &ctx, &method, &path, req).await;
    let resp = match result {
        Ok(r) => r,
        Err(e) => problem(&e),
    };
    tracing::debug!(%method, %path, status = resp.status().as_u16(), client = %conn.addr, "request");
    resp
}

async fn route(
    app: &Arc<App>,
    ctx: &RequestCtx,
    method: &Method,
    path: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    if path == API_PREFIX {
        if method != Method::POST {
            registration::refuse(app, ctx, Action::Register, not_allowed("POST")).await;
            return Ok(method_not_allowed("POST"));
        }
        let body = match checked_body(app, req, "application/json").await {
            Ok(b) => b,
            Err(e) => return Err(registration::refuse(app, ctx, Action::Register, e).await),
        };
        return registration::create(app, ctx, &body).await.map(reply);
    }
    if let Some(id) = path
        .strip_prefix(API_PREFIX)
        .and_then(|r| r.strip_prefix('/'))
    {
        let action = match *method {
            Method::GET => Action::Get,
            Method::PUT => Action::Update,
            Method::PATCH => Action::Patch,
            Method::DELETE => Action::Deregister,
            _ => Action::Request,
        };
        if id.is_empty() || id.contains('/') || id.len() > 128 {
            let e = ApiError::new(Cause::RegistrationNotFound, "no registration with this ID");
            return Err(registration::refuse(app, ctx, action, e).await);
        }
        return match *method {
            Method::GET => registration::get(app, ctx, id).await.map(reply),
            Method::PUT => match checked_body(app, req, "application/json").await {
                Ok(body) => registration::put(app, ctx, id, &body).await.map(reply),
                Err(e) => Err(registration::refuse(app, ctx, Action::Update, e).await),
            },
            Method::PATCH => match checked_body(app, req, "application/merge-patch+json").await {
                Ok(body) => registration::patch(app, ctx, id, &body).await.map(reply),
                Err(e) => Err(registration::refuse(app, ctx, Action::Patch, e).await),
            },
            Method::DELETE => registration::delete(app, ctx, id).await.map(reply),
            _ => {
                let allow = "GET, PUT, PATCH, DELETE";
                registration::refuse(app, ctx, action, not_allowed(allow)).await;
                Ok(method_not_allowed(allow))
            }
        };
    }
    let backend = match path {
        "/pki/v1/ca" | "/pki/v1/crl" => Some(app.default_backend()),
        p => p
            .strip_prefix("/pki/v1/crl/")
            .or_else(|| p.strip_prefix("/pki/v1/ca/"))
            .and_then(|name| app.backend(name)),
    };
    if let Some(b) = backend {
        if method != Method::GET && method != Method::HEAD {
            return Ok(method_not_allowed("GET, HEAD"));
        }
        if path.starts_with("/pki/v1/ca") {
            let pem = b.chain_pem().concat().into_bytes();
            return Ok(response(200, "application/pem-certificate-chain", pem));
        }
        if !b.issuer.revocation_published() {
            return Err(ApiError::new(
                Cause::ResourceNotFound,
                format!(
                    "backend {} is an external CA that publishes its own CRL",
                    b.name
                ),
            ));
        }
        let crl = app.crl(&b).await?;
        let mut r = response(200, "application/pkix-crl", crl.to_vec());
        r.headers_mut().insert(
            hyper::header::CACHE_CONTROL,
            "max-age=60".parse().expect("static"),
        );
        return Ok(r);
    }
    Err(ApiError::new(
        Cause::ResourceNotFound,
        format!("no resource at {path}"),
    ))
}

/// Runs the EES-facing listener until `shutdown` turns true, then waits (at most `grace`)
/// for in-flight requests.
pub async fn serve_api(
    app: Arc<App>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let limits = app.cfg.limits.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(limits.header_read_timeout.as_secs()));
    let keepalive = Duration::from_secs(limits.h2_keepalive_interval.as_secs().max(1));
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .keep_alive_interval(Some(keepalive))
        .keep_alive_timeout(keepalive);
    let handshake_timeout = Duration::from_secs(limits.tls_handshake_timeout.as_secs());
    let first_request = Duration::from_secs(limits.header_read_timeout.as_secs());
    let idle = Duration::from_secs(limits.idle_timeout.as_secs());
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let per_address = super::idle::AddressSlots::new(limits.max_connections_per_address);
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        // Over the limit: close at once rather than queue without bound.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(client = %addr, "connection limit reached; closing");
            drop(tcp);
            continue;
        };
        let Some(address_slot) = per_address.take(addr.ip()) else {
            tracing::warn!(client = %addr, "connection limit per address reached; closing");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let _address_slot = address_slot;
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(client = %addr, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(client = %addr, "TLS handshake timed out");
                    return;
                }
            };
            let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            app.metrics.tls_handshake(resumed);
            let client_chain = Arc::new(
                tls.get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| c.iter().map(|d| d.to_vec()).collect())
                    .unwrap_or_default(),
            );
            let conn = Conn { addr, client_chain };
            // From here the connection must keep asking: see `idle`.
            let activity = super::idle::Activity::new(first_request, idle);
            let io = super::idle::Guarded::new(tls, activity.clone());
            let svc = hyper::service::service_fn(move |req| {
                let app = app.clone();
                let conn = conn.clone();
                let in_hand = activity.request();
                async move {
                    let resp = handle(app, conn, req).await;
                    drop(in_hand);
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let fut = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
            if let Err(e) = watcher.watch(fut.into_owned()).await {
                tracing::debug!(client = %addr, error = %e, "connection ended with an error");
            }
        });
    }
    let grace = Duration::from_secs(app.cfg.server.shutdown_grace.as_secs());
    tracing::info!("stopped accepting; waiting for in-flight requests");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within {grace:?}");
    }
}
