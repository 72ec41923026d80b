//! Onboarding-token keys fetched from an authorization server's `jwks_url` over HTTPS:
//! fetched at start, re-fetched on an unknown `kid`, at most once per `jwks_min_refresh`.

mod common;

use bytes::Bytes;
use common::*;
use ecs_ca_backends::{
    CaParams, CertTemplate, KeySigner, LocalIssuer, SanEntry, SoftwareKey, der_to_pem,
    generate_p256_pkcs8_pem, make_ca_certificate,
};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls::pki_types::pem::PemObject;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A tiny HTTPS authorization server that serves a JWKS and counts the fetches.
struct AuthServer {
    port: u16,
    ca_pem: String,
    jwks: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
}

impl AuthServer {
    async fn start(jwks: String) -> AuthServer {
        let now = now();
        let ca_key =
            Arc::new(SoftwareKey::from_pkcs8_pem(&generate_p256_pkcs8_pem().unwrap()).unwrap());
        let ca = make_ca_certificate(
            ca_key.as_ref(),
            &CaParams {
                subject: "CN=Test AS CA".into(),
                spki_der: ca_key.public_key_der().to_vec(),
                not_before: now - 60,
                not_after: now + 86_400,
                path_len: Some(0),
                crl_url: None,
                serial: None,
            },
        )
        .unwrap();
        let issuer = LocalIssuer::new(ca_key, vec![ca.der.clone()]).unwrap();
        Self::serve(jwks, &issuer).await
    }

    /// The server with a TLS certificate for 127.0.0.1 issued by `issuer`.
    async fn serve(jwks: String, issuer: &LocalIssuer) -> AuthServer {
        let now = now();
        let tls_key_pem = generate_p256_pkcs8_pem().unwrap();
        let tls_key = SoftwareKey::from_pkcs8_pem(&tls_key_pem).unwrap();
        let cert = issuer
            .issue(&CertTemplate {
                common_name: "as.test".into(),
                organization: None,
                sans: vec![SanEntry::Ip("127.0.0.1".parse().unwrap())],
                spki_der: tls_key.public_key_der().to_vec(),
                now,
                validity_secs: 86_400,
                client_auth: false,
                server_auth: true,
                crl_url: None,
                csr_pem: None,
            })
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(ecs_daemon::client::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der.clone().into()],
                rustls::pki_types::PrivateKeyDer::from_pem_slice(tls_key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let jwks = Arc::new(Mutex::new(jwks));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (j, f) = (jwks.clone(), fetches.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, j, f) = (acceptor.clone(), j.clone(), f.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |_req| {
                        f.fetch_add(1, Ordering::SeqCst);
                        let body = j.lock().unwrap().clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::from(body),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        AuthServer {
            port,
            ca_pem: der_to_pem(issuer.chain_der().last().unwrap(), "CERTIFICATE"),
            jwks,
            fetches,
        }
    }
}

fn as_token(ecs: &Ecs, key_pem: &str, kid: &str, ees_id: &str) -> String {
    let mut claims = ecs.claims(ees_id);
    claims["iss"] = serde_json::json!("https://as.test");
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(
        &h,
        &claims,
        &EncodingKey::from_ec_pem(key_pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

// Multi-threaded: the authorization server must answer while the test thread waits for
// ecsd to start (which fetches the JWKS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_come_from_the_jwks_url_and_rotate_without_restart() {
    let key_a = generate_p256_pkcs8_pem().unwrap();
    let key_b = generate_p256_pkcs8_pem().unwrap();
    let jwks_a = ecs_daemon::token::jwks_for_private_key(key_a.as_bytes(), "a").unwrap();
    let jwks_b = ecs_daemon::token::jwks_for_private_key(key_b.as_bytes(), "b").unwrap();
    let auth = AuthServer::start(jwks_a).await;
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), &auth.ca_pem).unwrap();
    let (port, ca_path) = (auth.port, ca_file.path().display().to_string());
    let ecs = Ecs::start_with(move |c| {
        *c = c.replace(
            "token_issuers = [\"dev\"]",
            "token_issuers = [\"dev\", \"as\"]",
        );
        c.push_str(&format!(
            "\n[token_issuers.as]\nissuer = \"https://as.test\"\njwks_url = \"https://127.0.0.1:{port}/jwks\"\njwks_ca = \"{ca_path}\"\njwks_min_refresh = \"1s\"\n"
        ));
    });
    assert_eq!(
        auth.fetches.load(Ordering::SeqCst),
        1,
        "fetched once at start"
    );

    let id = "ees-jwks-1.example";
    let r = ecs
        .post(
            Some(&as_token(&ecs, &key_a, "a", id)),
            &registration_body(id, &Key::new().csr(id)),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));

    // The authorization server rotates to key b: the first token with kid b triggers a fetch.
    *auth.jwks.lock().unwrap() = jwks_b;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let id = "ees-jwks-2.example";
    let r = ecs
        .post(
            Some(&as_token(&ecs, &key_b, "b", id)),
            &registration_body(id, &Key::new().csr(id)),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let after_rotation = auth.fetches.load(Ordering::SeqCst);
    assert_eq!(after_rotation, 2);
    // Key a is gone with the rotation.
    let id = "ees-jwks-3.example";
    let body = registration_body(id, &Key::new().csr(id));
    let r = ecs
        .post(Some(&as_token(&ecs, &key_a, "a", id)), &body)
        .await;
    assert_problem(&r, 401, "INVALID_TOKEN");

    // A flood of unknown kids costs at most one fetch per interval.
    for _ in 0..5 {
        let r = ecs
            .post(Some(&as_token(&ecs, &key_b, "unknown", id)), &body)
            .await;
        assert_problem(&r, 401, "INVALID_TOKEN");
    }
    assert!(auth.fetches.load(Ordering::SeqCst) <= after_rotation + 1);
}

/// Attack review, item 1: with `jwks_url` and no `jwks_ca`, the JWKS server was trusted
/// through the ECS's own CA, so a JWKS served with an EES certificate (serverAuth, issued by
/// this ECS) was loaded and its key then onboarded anyone. Now such a server is trusted
/// through the system's web roots only: the ECS refuses to start on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_server_is_never_trusted_through_the_ecss_own_ca() {
    let mut ecs = Ecs::start();
    let dir = ecs.dir.path().to_path_buf();
    let key = std::fs::read_to_string(dir.join("keys/issuing-ca.key")).unwrap();
    let chain = std::fs::read_to_string(dir.join("keys/issuing-ca.pem")).unwrap();
    let own_ca = LocalIssuer::new(
        Arc::new(SoftwareKey::from_pkcs8_pem(&key).unwrap()),
        ecs_ca_backends::pem_chain_to_der(&chain).unwrap(),
    )
    .unwrap();
    let attacker = generate_p256_pkcs8_pem().unwrap();
    let jwks = ecs_daemon::token::jwks_for_private_key(attacker.as_bytes(), "a").unwrap();
    let auth = AuthServer::serve(jwks, &own_ca).await;
    assert!(ecs.terminate().success());
    let text = std::fs::read_to_string(ecs.config_path()).unwrap();
    std::fs::write(
        ecs.config_path(),
        format!(
            "{}\n[token_issuers.as]\nissuer = \"https://as.test\"\njwks_url = \"https://127.0.0.1:{}/jwks\"\n",
            text.replace("token_issuers = [\"dev\"]", "token_issuers = [\"dev\", \"as\"]"),
            auth.port
        ),
    )
    .unwrap();
    let mut serve = ecsd()
        .args(["serve", "--config"])
        .arg(ecs.config_path())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(s) = serve.try_wait().unwrap() {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            let _ = serve.kill();
            let _ = serve.wait();
            break None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(serve.stderr.as_mut().unwrap(), &mut err).unwrap();
    let status = status.expect("ecsd started on a JWKS served under its own CA");
    assert!(!status.success());
    assert!(err.contains("token_issuers.as.jwks_url"), "{err}");
    assert_eq!(auth.fetches.load(Ordering::SeqCst), 0, "no JWKS was loaded");
}
