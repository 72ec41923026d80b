//! `ecsd serve`: start everything, run until SIGTERM or SIGINT, stop cleanly.

use crate::app::App;
pub use crate::app::StartError;
use crate::config::Config;
use crate::http::{admin, api, tls};
use crate::registration;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Runs the daemon on a loaded configuration.
pub async fn serve(cfg: Config) -> Result<(), StartError> {
    let app = App::build(cfg).await?;
    let identity = tls::server_identity(&app)
        .await
        .map_err(StartError::Config)?;
    let not_after = identity.not_after();
    if let Some(t) = not_after {
        app.metrics.server_cert_not_after.set(t);
    }
    let server_cert = Arc::new(tls::ServerCertificate::new(identity).map_err(StartError::Config)?);
    let tls_config = tls::server_config(server_cert.clone()).map_err(StartError::Config)?;
    let signals = Signals::install()?;
    // Published from the first request on, whether or not anyone fetches it.
    sign_crls(&app).await;
    let listen = app.cfg.server.listen.clone();
    let listener = TcpListener::bind(&listen)
        .await
        .map_err(|e| StartError::Other(format!("server.listen: {listen}: {e}")))?;
    let admin = match &app.cfg.server.admin_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|e| StartError::Other(format!("server.admin_listen: {a}: {e}")))?,
        ),
        None => None,
    };
    let control_path = app.cfg.admin_socket_path();
    let control = bind_control_socket(&control_path, app.cfg.server.admin_group.as_deref())
        .map_err(StartError::Other)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or(listen),
        admin = app.cfg.server.admin_listen.as_deref().unwrap_or("(none)"),
        public_url = %app.cfg.server.public_url,
        "ecsd ready"
    );
    let api = tokio::spawn(api::serve_api(
        app.clone(),
        listener,
        tls_config,
        stop_rx.clone(),
    ));
    if let Some(l) = admin {
        tokio::spawn(admin::serve_admin(app.clone(), l, stop_rx.clone()));
    }
    tokio::spawn(admin::serve_control(app.clone(), control, stop_rx.clone()));
    let sweeper = tokio::spawn(sweep_loop(app.clone(), stop_rx.clone()));
    let checkpointer = tokio::spawn(checkpoint_loop(app.clone(), stop_rx.clone()));
    tokio::spawn(probe_loop(app.clone(), stop_rx.clone()));
    tokio::spawn(crl_loop(app.clone(), stop_rx.clone()));
    tokio::spawn(reload_on_sighup(
        app.clone(),
        signals.hup,
        server_cert.clone(),
    ));
    if app.cfg.server.tls_cert.is_none()
        && let Some(t) = not_after
    {
        tokio::spawn(renew_server_certificate(
            app.clone(),
            server_cert,
            t,
            stop_rx.clone(),
        ));
    }

    Signals::stop(signals.term, signals.int).await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = api.await;
    let _ = sweeper.await;
    let _ = checkpointer.await;
    registration::record_aggregated_refusals(&app, true).await;
    // Every acknowledged change was flushed when it was made; this flush catches the
    // records of refusals written since the last background flush.
    if let Err(e) = app.store.flush().await {
        tracing::error!(error = %e, "final flush failed");
    }
    // The last checkpoint covers everything this process wrote.
    signed_checkpoint(&app, true).await;
    let _ = std::fs::remove_file(&control_path);
    drop(app);
    tracing::info!("stopped");
    Ok(())
}

/// Binds the control socket, private to this user (0600), or to a group (0660). A socket
/// left by a daemon that died is replaced; one that answers belongs to a running daemon.
fn bind_control_socket(
    path: &std::path::Path,
    group: Option<&str>,
) -> Result<tokio::net::UnixListener, String> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    let at = |e: std::io::Error| format!("server.admin_socket: {}: {e}", path.display());
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!(
                "server.admin_socket: {} exists and is not a socket",
                path.display()
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "server.admin_socket: another ecsd serves {}: stop it first",
                path.display()
            ));
        }
        std::fs::remove_file(path).map_err(at)?;
    }
    // Its folder may not exist yet: beside a store on a database server, nothing else
    // made it. Private to the daemon's user, like the socket.
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(at)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(at)?;
    let mode = match group {
        Some(g) => {
            let gid = group_id(g)?;
            rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))
                .map_err(|e| format!("server.admin_group: {g}: {e}"))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(at)?;
    Ok(listener)
}

/// A group's ID, from a number or a name in /etc/group.
fn group_id(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("server.admin_group: /etc/group: {e}"))?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let gid = f.nth(1)?.parse().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .ok_or_else(|| format!("server.admin_group: no group {group:?} in /etc/group"))
}

/// Signs a checkpoint of the audit chain every `audit.checkpoint_interval` when it grew,
/// and one at stop, after the last record.
async fn checkpoint_loop(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_secs(app.cfg.audit.checkpoint_interval.as_secs().max(1));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        signed_checkpoint(&app, false).await;
    }
}

async fn signed_checkpoint(app: &Arc<App>, always: bool) {
    if let Err(e) = app.checkpoint(always).await {
        tracing::error!(error = %e, "audit checkpoint failed");
    }
}

async fn sweep_loop(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_secs(app.cfg.server.sweep_interval.as_secs().max(1));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        match registration::sweep(&app).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(expired = n, "sweep expired registrations"),
            Err(e) => tracing::warn!(cause = e.cause.code(), detail = %e.detail, "sweep failed"),
        }
    }
}

/// Signs each backend's CRL that is due (past half its validity, or never signed:
/// `App::crl`).
async fn sign_crls(app: &App) {
    for b in app.issuers().backends.values() {
        if !b.issuer.revocation_published() {
            continue;
        }
        if let Err(e) = app.crl(b).await {
            tracing::warn!(backend = %b.name, cause = e.cause.code(), detail = %e.detail,
                "CRL not signed; the next attempt follows");
        }
    }
}

/// Re-signs the CRLs every quarter of `server.crl_validity` (the first ones were signed
/// before the daemon started serving), so that the published CRL never goes stale when
/// nobody fetches it.
async fn crl_loop(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_secs((app.cfg.server.crl_validity.as_secs() / 4).max(1));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        sign_crls(&app).await;
    }
}

/// Keeps probing backends that cannot sign (an HSM token that is away), so that they come
/// back without waiting for a request; each backend paces its own probes.
async fn probe_loop(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
        app.backend_readiness().await;
    }
}

/// The signals the daemon acts on, taken over from their default actions (which end the
/// process) before anything is served: a supervisor may send SIGTERM or SIGHUP as soon as
/// `/readyz` answers.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, StartError> {
        use tokio::signal::unix::{SignalKind, signal};
        let take = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| StartError::Other(format!("{name} handler: {e}")))
        };
        Ok(Signals {
            term: take(SignalKind::terminate(), "SIGTERM")?,
            int: take(SignalKind::interrupt(), "SIGINT")?,
            hup: take(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    /// Until SIGTERM or SIGINT.
    async fn stop(mut term: tokio::signal::unix::Signal, mut int: tokio::signal::unix::Signal) {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

/// SIGHUP: the policy, and the server certificate when it comes from `tls_cert`/`tls_key`
/// (files renewed by the operator's tooling): new handshakes present the new one.
async fn reload_on_sighup(
    app: Arc<App>,
    mut hup: tokio::signal::unix::Signal,
    server_cert: Arc<tls::ServerCertificate>,
) {
    while hup.recv().await.is_some() {
        let _ = app.reload_policy_recorded("SIGHUP").await;
        if app.cfg.server.tls_cert.is_some() {
            match present(&app, &server_cert).await {
                Ok(_) => tracing::info!("server certificate re-read from server.tls_cert"),
                Err(e) => tracing::error!(error = %e,
                    "server certificate not re-read; the current one stays"),
            }
        }
    }
}

/// Loads or issues the server certificate and presents it from the next handshake on;
/// its notAfter.
async fn present(app: &App, server_cert: &tls::ServerCertificate) -> Result<Option<i64>, String> {
    let identity = tls::server_identity(app).await?;
    let not_after = identity.not_after();
    server_cert.replace(identity)?;
    if let Some(t) = not_after {
        app.metrics.server_cert_not_after.set(t);
    }
    Ok(not_after)
}

/// Replaces the self-issued server certificate `server.tls_renew_before` its expiry, so a
/// daemon that runs for years never presents an expired one. A failed renewal (the backend
/// away) is retried every minute while the current certificate lasts.
async fn renew_server_certificate(
    app: Arc<App>,
    server_cert: Arc<tls::ServerCertificate>,
    not_after: i64,
    mut stop: watch::Receiver<bool>,
) {
    let before = app.cfg.server.tls_renew_before.as_secs() as i64;
    let mut due = not_after - before;
    loop {
        let wait = (due - crate::clock::now()).max(0) as u64;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(wait)) => {}
            _ = stop.changed() => return,
        }
        match present(&app, &server_cert).await {
            Ok(Some(t)) => {
                tracing::info!(not_after = %crate::clock::format_time(t),
                    "server certificate renewed");
                // Never sooner than a minute from now, whatever the certificate says.
                due = (t - before).max(crate::clock::now() + 60);
            }
            Ok(None) => {
                tracing::error!(
                    "server certificate renewed, but its notAfter does not parse; next renewal in a minute"
                );
                due = crate::clock::now() + 60;
            }
            Err(e) => {
                tracing::error!(error = %e, "server certificate not renewed; retrying in a minute");
                due = crate::clock::now() + 60;
            }
        }
    }
}
