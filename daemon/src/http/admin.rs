//! The admin surfaces: the TCP `admin_listen` (probes and metrics, which reveal nothing) and
//! the control socket (policy reload, registrations, audit records), whose file mode is the
//! access control.

use super::{Body, response};
use crate::app::App;
use bytes::Bytes;
use http_body_util::Either;
use http_body_util::channel::Channel;
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Which admin surface a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Surface {
    /// The TCP `admin_listen`: probes and metrics only, which reveal nothing.
    Probes,
    /// The control socket, guarded by its file mode: everything.
    Control,
}

/// Serves one plain-HTTP admin connection, with a header deadline and a bound on its life.
fn serve_admin_connection<S>(app: Arc<App>, io: S, surface: Surface)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let app = app.clone();
            async move {
                let streamed = surface == Surface::Control
                    && req.method() == Method::GET
                    && req.uri().path() == "/admin/v1/store/backup";
                Ok::<_, std::convert::Infallible>(if streamed {
                    backup(app)
                } else {
                    admin(app, surface, req).await.map(Either::Left)
                })
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(ADMIN_HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(io), svc);
        // A probe or a page of records takes well under this; a connection that holds on
        // longer is cut. A backup over the private control socket may take its time.
        let lifetime = match surface {
            Surface::Probes => ADMIN_CONNECTION_LIFETIME,
            Surface::Control => CONTROL_CONNECTION_LIFETIME,
        };
        let _ = tokio::time::timeout(lifetime, conn).await;
    });
}

const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const ADMIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
const CONTROL_CONNECTION_LIFETIME: Duration = Duration::from_secs(6 * 3600);

type Streamed = Either<Body, Channel<Bytes>>;

/// `GET /admin/v1/store/backup`: the backup file of the store this daemon holds, streamed
/// as it is written (`ecsd store backup` asks for it when it cannot open the store itself).
fn backup(app: Arc<App>) -> Response<Streamed> {
    let (mut tx, body) = Channel::<Bytes>::new(8);
    tokio::spawn(async move {
        let (mut writer, mut reader) = tokio::io::duplex(1 << 16);
        let engine = app.cfg.storage.kind.name();
        let write = async move {
            let r = crate::store::backup::write(app.store.as_ref(), engine, &mut writer).await;
            drop(writer);
            r
        };
        // Owns the reading half: when the client goes away it is dropped, the writer's next
        // write fails, and the snapshot (a read transaction, or sled's commit lock) ends.
        let forward = async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx
                            .send_data(Bytes::copy_from_slice(&buf[..n]))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        };
        let (written, ()) = tokio::join!(write, forward);
        match written {
            Ok(counts) => tracing::info!(%counts, "backup streamed over the control socket"),
            // The file then lacks its end record: the reader sees a cut backup.
            Err(e) => tracing::error!(error = %e, "backup failed"),
        }
    });
    let mut r = Response::new(Either::Right(body));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

/// Backs off after a failed accept (out of file descriptors, say) instead of spinning.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "admin accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Runs the TCP admin listener (`/healthz`, `/readyz`, `/metrics`).
pub async fn serve_admin(
    app: Arc<App>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => { accept_failed(e).await; continue; }
            },
            _ = shutdown.changed() => return,
        };
        serve_admin_connection(app.clone(), tcp, Surface::Probes);
    }
}

/// Runs the control socket: everything of the admin API, for whoever may open the socket.
pub async fn serve_control(
    app: Arc<App>,
    listener: tokio::net::UnixListener,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => { accept_failed(e).await; continue; }
            },
            _ = shutdown.changed() => return,
        };
        serve_admin_connection(app.clone(), stream, Surface::Control);
    }
}

fn query_param<T: std::str::FromStr>(query: &str, name: &str) -> Option<T> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

fn json_response(v: serde_json::Value) -> Response<Body> {
    response(200, "application/json", v.to_string().into_bytes())
}

/// The most items one page of a dump holds.
pub const ADMIN_PAGE_MAX: usize = 1000;

async fn admin(app: Arc<App>, surface: Surface, req: Request<Incoming>) -> Response<Body> {
    let query = req.uri().query().unwrap_or("").to_string();
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/healthz" => return response(200, "text/plain", b"ok\n".to_vec()),
        "/readyz" => {
            let mut problems = Vec::new();
            if app.store.audit_head().await.is_err() {
                problems.push("store: unavailable".to_string());
            }
            for (name, ready) in app.backend_readiness().await {
                if let Err(why) = ready {
                    problems.push(format!("backend {name}: {why}"));
                }
            }
            return if problems.is_empty() {
                response(200, "text/plain", b"ready\n".to_vec())
            } else {
                response(
                    503,
                    "text/plain",
                    format!("{}\n", problems.join("\n")).into_bytes(),
                )
            };
        }
        "/metrics" => {
            if let Ok(c) = app.store.counts().await {
                app.metrics
                    .active_registrations
                    .set(c.active_registrations as i64);
                app.metrics.store_bytes.set(c.bytes as i64);
            }
            return response(200, "text/plain; version=0.0.4", app.metrics.render());
        }
        _ => {}
    }
    if surface != Surface::Control {
        return response(404, "text/plain", b"not found\n".to_vec());
    }
    let limit = query_param::<usize>(&query, "limit")
        .unwrap_or(ADMIN_PAGE_MAX)
        .clamp(1, ADMIN_PAGE_MAX);
    match path.as_str() {
        "/admin/v1/policy/reload" => {
            if req.method() != Method::POST {
                return response(405, "text/plain", b"POST\n".to_vec());
            }
            let result = app.reload_policy_recorded("admin socket").await;
            match result {
                Ok((old, new)) => json_response(
                    serde_json::json!({"reloaded": true, "oldPolicyHash": old, "policyHash": new}),
                ),
                Err(e) => response(
                    409,
                    "application/json",
                    serde_json::json!({"reloaded": false, "error": e})
                        .to_string()
                        .into_bytes(),
                ),
            }
        }
        // Paged by registration ID: `after` the last ID of the previous page.
        "/admin/v1/registrations" => {
            let after: String = query_param(&query, "after").unwrap_or_default();
            match app.store.active_registrations(&after, limit).await {
                Ok(list) => {
                    let next = (list.len() == limit)
                        .then(|| list.last().map(|(r, _)| r.id.clone()))
                        .flatten();
                    let page: Vec<serde_json::Value> = list
                        .into_iter()
                        .map(|(r, c)| serde_json::json!({"registration": r, "cert": c}))
                        .collect();
                    json_response(serde_json::json!({ "registrations": page, "next": next }))
                }
                Err(_) => response(500, "text/plain", b"store error\n".to_vec()),
            }
        }
        // Paged by sequence number: `from` the first record wanted.
        "/admin/v1/audit/records" => {
            let from = query_param(&query, "from").unwrap_or(1u64).max(1);
            let records = app.store.audit_records(from, limit + 1).await;
            match (records, app.store.audit_head().await) {
                (Ok(mut records), Ok(head)) => {
                    let more = records.len() > limit;
                    records.truncate(limit);
                    let next = more.then(|| records.last().map(|r| r.seq + 1)).flatten();
                    json_response(serde_json::json!({
                        "head": {"seq": head.0, "hash": head.1},
                        "records": records,
                        "next": next,
                    }))
                }
                _ => response(500, "text/plain", b"store error\n".to_vec()),
            }
        }
        _ => response(404, "text/plain", b"not found\n".to_vec()),
    }
}
