//! A real `ecsd` on 127.0.0.1 for the contract tests: initialised in a temporary folder,
//! started as a child process, spoken to over HTTPS with rustls.
#![allow(dead_code)]

use ecs_ca_backends::{SoftwareKey, build_csr, generate_p256_pkcs8_pem};
use ecs_daemon::client::{HttpVersion, HttpsClient, Response};
#[allow(unused_imports)]
pub use ecs_daemon::testing::{Daemon, Until, admin_get, free_port, output};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

pub const API: &str = "/eecs-eesregistration/v1/registrations";

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The `ecsd` binary built by cargo for these tests.
pub fn ecsd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ecsd"))
}

/// `ecsd init` into a new temporary folder, not started: for the commands that read a
/// configuration (lint, diff, explain) and for starts that must fail.
pub fn initialised() -> Daemon {
    Daemon::init(env!("CARGO_BIN_EXE_ecsd"), None)
}

/// A running ECS: the one harness's [`Daemon`], with what the contract tests add.
pub struct Ecs {
    d: Daemon,
    pub root_pem: Vec<u8>,
}

impl std::ops::Deref for Ecs {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.d
    }
}

impl std::ops::DerefMut for Ecs {
    fn deref_mut(&mut self) -> &mut Daemon {
        &mut self.d
    }
}

impl Ecs {
    /// `ecsd init` + `ecsd serve` with the generated configuration.
    pub fn start() -> Ecs {
        Self::start_with(|_| {})
    }

    /// Like [`Ecs::start`], after `edit` changed the configuration text.
    pub fn start_with(edit: impl Fn(&mut String)) -> Ecs {
        Self::start_inner(edit, &[], None)
    }

    /// Like [`Ecs::start_with`], with `files` (name, content) written into the ECS's folder
    /// (beside `ecs.toml`) first.
    pub fn start_with_files(files: &[(&str, &[u8])], edit: impl Fn(&mut String)) -> Ecs {
        Self::start_inner(edit, files, None)
    }

    /// Like [`Ecs::start`], with `ecsd init` and `ecsd serve` run as user and group `uid`
    /// (the tests must run as root to use it).
    pub fn start_as(uid: u32) -> Ecs {
        Self::start_inner(|_| {}, &[], Some(uid))
    }

    fn start_inner(
        edit: impl Fn(&mut String),
        files: &[(&str, &[u8])],
        run_as: Option<u32>,
    ) -> Ecs {
        for _attempt in 0..5 {
            let mut d = Daemon::init(env!("CARGO_BIN_EXE_ecsd"), run_as);
            d.edit_config(&edit);
            for (name, content) in files {
                std::fs::write(d.dir.path().join(name), content).unwrap();
            }
            let root_pem = std::fs::read(d.dir.path().join("root.pem")).unwrap();
            // A port taken between init and serve: try again on new ones.
            if d.spawn(Until::Ready) {
                return Ecs { d, root_pem };
            }
        }
        panic!("ecsd did not start in 5 attempts (see its log above)");
    }

    /// `n` replicas of one ECS on one new database of `pg`, all started: the first
    /// initialised, the others its copies on their own ports.
    pub fn replicas(pg: &ecs_daemon::testing::postgres::Postgres, n: usize) -> Vec<Ecs> {
        let mut first = Daemon::init(env!("CARGO_BIN_EXE_ecsd"), None);
        first.use_postgres(pg, &pg.create_database());
        let root_pem = std::fs::read(first.dir.path().join("root.pem")).unwrap();
        let mut all = vec![first];
        for _ in 1..n {
            all.push(all[0].replica());
        }
        all.into_iter()
            .map(|mut d| {
                assert!(d.spawn(Until::Ready), "replica did not start");
                Ecs {
                    d,
                    root_pem: root_pem.clone(),
                }
            })
            .collect()
    }

    /// Another replica of this ECS (same configuration, keys and store), started.
    pub fn replica(&self) -> Ecs {
        let mut d = self.d.replica();
        assert!(d.spawn(Until::Ready), "replica did not start");
        Ecs {
            d,
            root_pem: self.root_pem.clone(),
        }
    }

    /// The CRL (DER) published at `path` (`/pki/v1/crl` or `/pki/v1/crl/BACKEND`).
    pub async fn crl_at(&self, path: &str) -> Vec<u8> {
        let r = self
            .client()
            .request("GET", &self.url(path), &[], None)
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type"), Some("application/pkix-crl"));
        r.body
    }

    /// An ECS from a daemon this test started itself.
    pub fn from_daemon(d: Daemon) -> Ecs {
        let root_pem = std::fs::read(d.dir.path().join("root.pem")).unwrap();
        Ecs { d, root_pem }
    }

    pub fn restart(&mut self) {
        assert!(self.d.spawn(Until::Ready), "ecsd did not restart");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    /// A client trusting the ECS root, without a client certificate.
    pub fn client(&self) -> HttpsClient {
        HttpsClient::new(&self.root_pem, None, HttpVersion::Http1).unwrap()
    }

    /// A client presenting `ees`'s certificate.
    pub fn client_as(&self, ees: &Ees) -> HttpsClient {
        HttpsClient::new(
            &self.root_pem,
            Some((ees.cert_pem.as_bytes(), ees.key_pem.as_bytes())),
            HttpVersion::Http1,
        )
        .unwrap()
    }

    /// A valid onboarding token from the development issuer.
    pub fn token(&self, ees_id: &str) -> String {
        self.token_with(ees_id, None)
    }

    /// A token with arbitrary header and claims, signed with the development issuer's key.
    pub fn token_claims(&self, header: jsonwebtoken::Header, claims: &Value) -> String {
        let pem = std::fs::read(self.dir.path().join("keys/dev-token-issuer.key")).unwrap();
        let key = jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap();
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    /// The claims `ecsd token mint` would put in, for tests to alter.
    pub fn claims(&self, ees_id: &str) -> Value {
        let cfg = self.config();
        json!({
            "iss": cfg.token_issuers["dev"].issuer,
            "sub": ees_id,
            "aud": cfg.ecs_id,
            "scope": "eecs-eesregistration",
            "iat": now(),
            "nbf": now(),
            "exp": now() + 600,
            "jti": format!("jti-{}", ecs_daemon::token::random_b64(8)),
        })
    }

    pub async fn post(&self, token: Option<&str>, body: &Value) -> Response {
        self.post_raw(token, "application/json", body.to_string().into_bytes())
            .await
    }

    pub async fn post_raw(
        &self,
        token: Option<&str>,
        content_type: &str,
        body: Vec<u8>,
    ) -> Response {
        self.post_as(&self.client(), token, content_type, body)
            .await
    }

    /// POSTs a registration over `client` (e.g. one presenting a third-party certificate).
    pub async fn post_as(
        &self,
        client: &HttpsClient,
        token: Option<&str>,
        content_type: &str,
        body: Vec<u8>,
    ) -> Response {
        post_to(client, &self.url(API), token, content_type, body)
            .await
            .unwrap()
    }

    /// Registers `ees_id` with a fresh key; panics unless 201.
    pub async fn register(&self, ees_id: &str) -> Ees {
        self.register_body(ees_id, |_| {}).await
    }

    pub async fn register_body(&self, ees_id: &str, edit: impl Fn(&mut Value)) -> Ees {
        let key = Key::new();
        let mut body = registration_body(ees_id, &key.csr(ees_id));
        edit(&mut body);
        let r = self.post(Some(&self.token(ees_id)), &body).await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        Ees::from_response(&r, key)
    }

    /// `audit verify` and `audit export --format json` through the CLI.
    pub fn audit(&self) -> (bool, Vec<Value>) {
        let verify = self
            .command()
            .args(["audit", "verify", "--config"])
            .arg(self.config_path())
            .output()
            .unwrap();
        let export = self
            .command()
            .args(["audit", "export", "--format", "json", "--config"])
            .arg(self.config_path())
            .output()
            .unwrap();
        let records = String::from_utf8_lossy(&export.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (verify.status.success(), records)
    }
}

/// POSTs `body` to `url` over `client`, with the bearer `token` when given (for tasks that
/// cannot borrow an [`Ecs`]).
pub async fn post_to(
    client: &HttpsClient,
    url: &str,
    token: Option<&str>,
    content_type: &str,
    body: Vec<u8>,
) -> Result<Response, ecs_daemon::client::ClientError> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", content_type)];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    client.request("POST", url, &headers, Some(body)).await
}

/// An EES key pair.
pub struct Key {
    pub pem: String,
    key: SoftwareKey,
}

impl Key {
    pub fn new() -> Key {
        let pem = generate_p256_pkcs8_pem().unwrap();
        let key = SoftwareKey::from_pkcs8_pem(&pem).unwrap();
        Key {
            pem: pem.to_string(),
            key,
        }
    }

    pub fn csr(&self, cn: &str) -> String {
        build_csr(&self.key, cn).unwrap()
    }
}

impl Default for Key {
    fn default() -> Self {
        Self::new()
    }
}

/// The contract's example body.
pub fn registration_body(ees_id: &str, csr: &str) -> Value {
    json!({
        "eesProf": { "eesId": ees_id, "endPt": { "fqdn": ees_id }, "eecRegConf": false },
        "onboarding": { "csr": csr, "thirdPartyCert": false, "secretToken": true }
    })
}

/// A registered EES, as the 201 described it.
pub struct Ees {
    pub id: String,
    pub location: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub body: Value,
}

impl Ees {
    pub fn from_response(r: &Response, key: Key) -> Ees {
        let body = r.json();
        Ees {
            id: body["onboarding"]["registrationId"]
                .as_str()
                .unwrap()
                .to_string(),
            location: r.header("location").unwrap().to_string(),
            cert_pem: body["onboarding"]["eesCert"].as_str().unwrap().to_string(),
            key_pem: key.pem,
            body,
        }
    }

    pub fn secret_token(&self) -> Option<&str> {
        self.body["onboarding"]["secretToken"].as_str()
    }
}

/// Runs `openssl` with `args`; returns (success, stdout+stderr).
pub fn openssl(args: &[&str], cwd: &Path) -> (bool, String) {
    output(Command::new("openssl").args(args).current_dir(cwd))
}

/// Asserts a problem answer: status, cause, content type.
#[track_caller]
pub fn assert_problem(r: &Response, status: u16, cause: &str) {
    let body = r.json();
    assert_eq!(
        (r.status, body["cause"].as_str().unwrap_or("")),
        (status, cause),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(body["status"], json!(status));
}

/// Asserts a problem answer, as [`assert_problem`], whose detail says `why`.
#[track_caller]
pub fn assert_refusal(r: &Response, status: u16, cause: &str, why: &str) {
    assert_problem(r, status, cause);
    let detail = r.json()["detail"].as_str().unwrap_or("").to_string();
    assert!(detail.contains(why), "{why:?} not in {detail:?}");
}

/// An HTTP/1.1 request without a body on a stream: (status, body).
fn raw_request(mut s: impl Read + Write, method: &str, path: &str) -> (u16, String) {
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    (
        status,
        out.split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default(),
    )
}

impl Ecs {
    /// The daemon's control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("data/admin.sock")
    }

    /// A request without a body on the control socket (e.g. POST `/admin/v1/policy/reload`).
    pub fn control(&self, method: &str, path: &str) -> (u16, String) {
        let s = std::os::unix::net::UnixStream::connect(self.control_socket()).unwrap();
        raw_request(s, method, path)
    }
}

/// A request without a body on the TCP admin listener.
pub fn admin_request(port: u16, method: &str, path: &str) -> (u16, String) {
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    raw_request(s, method, path)
}

/// Whether the suite runs as root (CI does): tests that act as another user need it, and
/// say "skipped" when it does not.
pub fn running_as_root() -> bool {
    let uid = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&uid.stdout).trim() == "0"
}
