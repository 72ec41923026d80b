//! The passthrough backend against a real `cfssl serve` (Debian `golang-cfssl`) started on
//! 127.0.0.1, and against a small CA that misbehaves on purpose.

mod common;

use bytes::Bytes;
use common::*;
use ecs_ca_backends::{
    CaParams, CertTemplate, KeySigner, LocalIssuer, SanEntry, SoftwareKey, der_to_pem,
    generate_p256_pkcs8_pem, make_ca_certificate,
};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const AUTH_KEY: &str = "0123456789abcdef0123456789abcdef";

/// A real `cfssl serve` with a CA it generated.
struct Cfssl {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Cfssl {
    fn start() -> Cfssl {
        let dir = tempfile::tempdir().unwrap();
        let sh = |cmd: &str| {
            let out = Command::new("sh")
                .args(["-c", cmd])
                .current_dir(dir.path())
                .output()
                .expect("sh");
            assert!(
                out.status.success(),
                "{cmd}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        sh(
            r#"echo '{"CN":"Partner CA","key":{"algo":"ecdsa","size":256},"names":[{"O":"Partner"}]}' | cfssl gencert -initca - | cfssljson -bare ca"#,
        );
        let usages = r#"["digital signature","client auth","server auth"]"#;
        std::fs::write(
            dir.path().join("config.json"),
            format!(
                r#"{{"signing":{{"default":{{"expiry":"720h","usages":{usages}}},
                "profiles":{{"ees":{{"expiry":"720h","usages":{usages}}},
                             "ees-auth":{{"expiry":"720h","usages":{usages},"auth_key":"k1"}}}}}},
                "auth_keys":{{"k1":{{"type":"standard","key":"{AUTH_KEY}"}}}}}}"#
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut c = Cfssl {
            dir,
            port,
            child: None,
        };
        c.spawn();
        c
    }

    fn spawn(&mut self) {
        let child = Command::new("cfssl")
            .args([
                "serve",
                "-address",
                "127.0.0.1",
                "-port",
                &self.port.to_string(),
            ])
            .args([
                "-ca",
                "ca.pem",
                "-ca-key",
                "ca-key.pem",
                "-config",
                "config.json",
                "-loglevel",
                "3",
            ])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cfssl is installed (./scripts/test installs golang-cfssl)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "cfssl serve did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
}

impl Drop for Cfssl {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Adds a passthrough backend and an ECSP domain that uses it.
fn with_partner(config: &mut String, domain: &str, backend: &str, body: &str) {
    config.push_str(&format!(
        "\n[backends.{backend}]\nkind = \"cfssl\"\n{body}\n[domains.{domain}]\ntoken_issuers = [\"dev\"]\nees_ids = [\"*\"]\nbackend = \"{backend}\"\n"
    ));
}

fn partner_body(id: &str, prov: &str) -> Value {
    json!({
        "eesProf": { "eesId": id, "endPt": { "fqdn": id }, "provId": prov, "eecRegConf": false },
        "onboarding": { "csr": Key::new().csr(id) }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ees_certificates_come_from_a_real_cfssl_checked_before_delivery() {
    let mut cfssl = Cfssl::start();
    let ca = cfssl.ca_pem().display().to_string();
    let port = cfssl.port;
    let key_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key_file.path(), AUTH_KEY).unwrap();
    let key_path = key_file.path().display().to_string();
    let ecs = Ecs::start_with(move |c| {
        let url = format!("http://127.0.0.1:{port}");
        with_partner(
            c,
            "ecsp-b",
            "partner",
            &format!("url = \"{url}\"\nprofile = \"ees\"\ncert = \"{ca}\"\n"),
        );
        with_partner(
            c,
            "ecsp-c",
            "partner-auth",
            &format!(
                "url = \"{url}\"\nprofile = \"ees-auth\"\nauth_key = \"file:{key_path}\"\ncert = \"{ca}\"\n"
            ),
        );
    });
    let _ = &key_file;

    for (id, prov) in [
        ("ees1.ecsp-b.example", "ecsp-b"),
        ("ees1.ecsp-c.example", "ecsp-c"),
    ] {
        let key = Key::new();
        let mut body = partner_body(id, prov);
        body["onboarding"]["csr"] = json!(key.csr(id));
        let r = ecs.post(Some(&ecs.token_with(id, Some(prov))), &body).await;
        assert_eq!(
            r.status,
            201,
            "{prov}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let ees = Ees::from_response(&r, key);
        let ob = &ees.body["onboarding"];
        assert_eq!(
            ob["certChain"].as_array().unwrap().len(),
            1,
            "the partner's chain"
        );
        let d = ecs.dir.path();
        std::fs::write(d.join("leaf.pem"), &ees.cert_pem).unwrap();
        let (ok, out) = openssl(
            &[
                "verify",
                "-x509_strict",
                "-purpose",
                "sslclient",
                "-CAfile",
                &cfssl.ca_pem().display().to_string(),
                "leaf.pem",
            ],
            d,
        );
        assert!(ok, "{out}");
        let (_, text) = openssl(&["x509", "-in", "leaf.pem", "-noout", "-subject"], d);
        assert!(text.contains(&format!("O = {prov}, CN = {id}")), "{text}");
        // The partner's certificate authenticates the EES like an ECS-issued one ...
        let r = ecs
            .client_as(&ees)
            .request("GET", &ees.location, &[], None)
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        // ... and de-registration is recorded, and said to be unpublished.
        let r = ecs
            .client_as(&ees)
            .request("DELETE", &ees.location, &[], None)
            .await
            .unwrap();
        assert_eq!(r.status, 204);
        let r = ecs
            .client_as(&ees)
            .request("GET", &ees.location, &[], None)
            .await
            .unwrap();
        assert_problem(&r, 404, "REGISTRATION_NOT_FOUND");
    }
    let (intact, records) = ecs.audit();
    assert!(intact);
    assert!(records.iter().any(|r| {
        r["action"] == json!("deregister")
            && r["detail"]
                .as_str()
                .unwrap_or("")
                .contains("offers no revocation API")
    }));

    // The CA stops: 503 at once while the breaker is open, recovery without restart.
    cfssl.stop();
    let id = "ees2.ecsp-b.example";
    let token = ecs.token_with(id, Some("ecsp-b"));
    let body = partner_body(id, "ecsp-b");
    for _ in 0..2 {
        let r = ecs.post(Some(&token), &body).await;
        assert_problem(&r, 503, "BACKEND_UNAVAILABLE");
    }
    let started = Instant::now();
    let r = ecs.post(Some(&token), &body).await;
    assert_problem(&r, 503, "BACKEND_UNAVAILABLE");
    assert!(r.header("retry-after").is_some());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the open breaker answers at once"
    );
    let (status, why) = admin_get(ecs.admin_port, "/readyz").unwrap();
    assert_eq!(status, 503);
    assert!(why.contains("partner"), "{why}");
    cfssl.spawn();
    let deadline = Instant::now() + Duration::from_secs(20);
    while admin_get(ecs.admin_port, "/readyz").unwrap().0 != 200 {
        assert!(Instant::now() < deadline, "the breaker never closed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = ecs.post(Some(&token), &body).await;
    assert_eq!(
        r.status,
        201,
        "the token was never spent: {}",
        String::from_utf8_lossy(&r.body)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_authsign_key_is_refused_and_nothing_is_stored() {
    let cfssl = Cfssl::start();
    let ca = cfssl.ca_pem().display().to_string();
    let port = cfssl.port;
    let key_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key_file.path(), "ffffffffffffffffffffffffffffffff").unwrap();
    let key_path = key_file.path().display().to_string();
    let ecs = Ecs::start_with(move |c| {
        with_partner(
            c,
            "ecsp-d",
            "partner",
            &format!(
                "url = \"http://127.0.0.1:{port}\"\nprofile = \"ees-auth\"\nauth_key = \"file:{key_path}\"\ncert = \"{ca}\"\n"
            ),
        );
    });
    let id = "ees1.ecsp-d.example";
    let token = ecs.token_with(id, Some("ecsp-d"));
    let r = ecs.post(Some(&token), &partner_body(id, "ecsp-d")).await;
    assert_problem(&r, 503, "BACKEND_UNAVAILABLE");
    assert!(
        r.json()["detail"].as_str().unwrap().contains("refused"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let (_, records) = ecs.audit();
    assert_eq!(
        records
            .iter()
            .filter(|r| r["outcome"] == json!("accepted"))
            .count(),
        0
    );
}

/// What the misbehaving CA does with the next request.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Good,
    OtherKey,
    Expired,
    OtherNames,
    Garbage,
    ServerError,
    Hang,
    /// Signs, after a second and a half.
    Slow,
}

/// A CA speaking the CFSSL API that signs with a real key but lies when told to.
struct FaultyCa {
    port: u16,
    ca_pem: String,
    mode: Arc<Mutex<Mode>>,
}

impl FaultyCa {
    async fn start() -> FaultyCa {
        let now = now();
        let key =
            Arc::new(SoftwareKey::from_pkcs8_pem(&generate_p256_pkcs8_pem().unwrap()).unwrap());
        let ca = make_ca_certificate(
            key.as_ref(),
            &CaParams {
                subject: "CN=Faulty CA".into(),
                spki_der: key.public_key_der().to_vec(),
                not_before: now - 60,
                not_after: now + 86_400 * 365,
                path_len: Some(0),
                crl_url: None,
                serial: None,
            },
        )
        .unwrap();
        let issuer = Arc::new(LocalIssuer::new(key, vec![ca.der.clone()]).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(Mutex::new(Mode::Good));
        let m = mode.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (issuer, m) = (issuer.clone(), m.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (issuer, m) = (issuer.clone(), m.clone());
                            async move {
                                let path = req.uri().path().to_string();
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let mode = *m.lock().unwrap();
                                let (status, text) = answer(&issuer, mode, &path, &body).await;
                                let mut r = hyper::Response::new(Full::new(Bytes::from(text)));
                                *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                                Ok::<_, std::convert::Infallible>(r)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        FaultyCa {
            port,
            ca_pem: der_to_pem(&ca.der, "CERTIFICATE"),
            mode,
        }
    }
}

async fn answer(issuer: &LocalIssuer, mode: Mode, path: &str, body: &[u8]) -> (u16, String) {
    if path == "/api/v1/cfssl/info" {
        return (200, json!({"success": true, "result": {}}).to_string());
    }
    match mode {
        Mode::ServerError => return (500, "oops".into()),
        Mode::Garbage => return (200, "{\"success\":true,\"result\":{\"certificate\":\"-----BEGIN CERTIFICATE-----\\nAAAA\\n-----END CERTIFICATE-----\\n\"}}".into()),
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            return (500, String::new());
        }
        Mode::Slow => tokio::time::sleep(Duration::from_millis(1500)).await,
        _ => {}
    }
    let req: Value = serde_json::from_slice(body).unwrap();
    let csr = ecs_ca_backends::parse_csr(req["certificate_request"].as_str().unwrap()).unwrap();
    let now = now();
    let mut t = CertTemplate {
        common_name: req["subject"]["CN"].as_str().unwrap().into(),
        organization: req["subject"]["names"][0]["O"].as_str().map(String::from),
        sans: req["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| SanEntry::Dns(h.as_str().unwrap().into()))
            .collect(),
        spki_der: csr.spki_der,
        now,
        validity_secs: 86_400,
        client_auth: true,
        server_auth: true,
        crl_url: None,
        csr_pem: None,
    };
    match mode {
        Mode::OtherKey => {
            t.spki_der = SoftwareKey::from_pkcs8_pem(&generate_p256_pkcs8_pem().unwrap())
                .unwrap()
                .public_key_der()
                .to_vec()
        }
        Mode::Expired => {
            t.now = now - 10 * 86_400;
            t.validity_secs = 86_400;
        }
        Mode::OtherNames => t.sans.push(SanEntry::Dns("bank.example".into())),
        _ => {}
    }
    let cert = issuer.issue(&t).unwrap();
    (
        200,
        json!({"success": true, "result": {"certificate": der_to_pem(&cert.der, "CERTIFICATE")}})
            .to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_ca_is_never_believed() {
    let ca = FaultyCa::start().await;
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), &ca.ca_pem).unwrap();
    let (port, ca_path) = (ca.port, ca_file.path().display().to_string());
    let ecs = Ecs::start_with(move |c| {
        with_partner(
            c,
            "ecsp-b",
            "partner",
            &format!("url = \"http://127.0.0.1:{port}\"\ncert = \"{ca_path}\"\ntimeout = \"2s\"\n"),
        );
    });
    let id = "ees1.ecsp-b.example";
    let token = ecs.token_with(id, Some("ecsp-b"));
    let body = partner_body(id, "ecsp-b");
    // (mode, what the audit record must say)
    let cases = [
        (Mode::OtherKey, "another public key"),
        (Mode::Expired, "expired"),
        (Mode::OtherNames, "bank.example"),
        (Mode::Garbage, "does not parse"),
        (Mode::ServerError, "500"),
        (Mode::Hang, "timeout"),
    ];
    for (mode, why) in cases {
        *ca.mode.lock().unwrap() = mode;
        let r = ecs.post(Some(&token), &body).await;
        assert_problem(&r, 503, "BACKEND_UNAVAILABLE");
        let detail = r.json()["detail"].as_str().unwrap().to_lowercase();
        assert!(detail.contains(&why.to_lowercase()), "{mode:?}: {detail}");
    }
    let (intact, records) = ecs.audit();
    assert!(intact);
    assert_eq!(
        records
            .iter()
            .filter(|r| r["cause"] == json!("BACKEND_UNAVAILABLE"))
            .count(),
        cases.len()
    );
    // Behaving again (after the breaker that the 500 and the hang opened has closed): the
    // same token registers, so none of the refusals above stored anything.
    *ca.mode.lock().unwrap() = Mode::Good;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = ecs.post(Some(&token), &body).await;
        if r.status == 201 {
            break;
        }
        assert_problem(&r, 503, "BACKEND_UNAVAILABLE");
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_signer_turns_excess_requests_away_at_once() {
    let ca = FaultyCa::start().await;
    *ca.mode.lock().unwrap() = Mode::Slow;
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), &ca.ca_pem).unwrap();
    let (port, ca_path) = (ca.port, ca_file.path().display().to_string());
    let ecs = Arc::new(Ecs::start_with(move |c| {
        with_partner(
            c,
            "ecsp-b",
            "partner",
            &format!("url = \"http://127.0.0.1:{port}\"\ncert = \"{ca_path}\"\n"),
        );
        c.push_str("\n[limits]\nmax_signing_inflight = 1\nsigning_queue = 1\n");
    }));
    let mut tasks = Vec::new();
    for i in 0..6 {
        let ecs = ecs.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("ees{i}.ecsp-b.example");
            let started = Instant::now();
            let r = ecs
                .post(
                    Some(&ecs.token_with(&id, Some("ecsp-b"))),
                    &partner_body(&id, "ecsp-b"),
                )
                .await;
            (r, started.elapsed())
        }));
    }
    // While one signs and one waits, a request with a broken CSR is still judged in the
    // documented order: its CSR is refused before the full queue is.
    while tasks.iter().filter(|t| t.is_finished()).count() < 4 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let id = "broken.ecsp-b.example";
    let mut broken = partner_body(id, "ecsp-b");
    broken["onboarding"]["csr"] =
        json!("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n");
    let r = ecs
        .post(Some(&ecs.token_with(id, Some("ecsp-b"))), &broken)
        .await;
    assert_problem(&r, 400, "INVALID_CSR");
    assert_eq!(
        tasks.iter().filter(|t| !t.is_finished()).count(),
        2,
        "the queue was full while the broken CSR was judged"
    );
    let (mut created, mut turned_away) = (0, 0);
    for t in tasks {
        let (r, took) = t.await.unwrap();
        match r.status {
            201 => created += 1,
            _ => {
                assert_problem(&r, 503, "BACKEND_UNAVAILABLE");
                assert!(r.header("retry-after").is_some());
                assert!(
                    took < Duration::from_millis(1400),
                    "turned away without waiting: {took:?}"
                );
                turned_away += 1;
            }
        }
    }
    // One signing, one waiting; the rest are told to come back.
    assert_eq!((created, turned_away), (2, 4));
}
