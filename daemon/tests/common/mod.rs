//! A real `ecsd` on 127.0.0.1 for the contract tests: initialised in a temporary folder,
//! started as a child process, spoken to over HTTPS with rustls.
#![allow(dead_code)]

use ecs_ca_backends::{SoftwareKey, build_csr, generate_p256_pkcs8_pem};
use ecs_daemon::client::{HttpVersion, HttpsClient, Response};
use ecs_daemon::config::Config;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const API: &str = "/eecs-eesregistration/v1/registrations";

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `ecsd` binary built by cargo for these tests.
pub fn ecsd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ecsd"))
}

/// `ecsd`, run as user and group `uid` when given.
fn ecsd_as(uid: Option<u32>) -> Command {
    match uid {
        None => ecsd(),
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups")
                .arg(env!("CARGO_BIN_EXE_ecsd"));
            c
        }
    }
}

/// A running ECS.
pub struct Ecs {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub admin_port: u16,
    child: Option<Child>,
    pub root_pem: Vec<u8>,
    /// The user `ecsd init` and `ecsd serve` run as (through `setpriv`), when not ours.
    run_as: Option<u32>,
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
            let dir = tempfile::tempdir().unwrap();
            if let Some(uid) = run_as {
                let owner = format!("{uid}:{uid}");
                let chown = Command::new("chown").arg(&owner).arg(dir.path()).status();
                assert!(chown.unwrap().success(), "chown {owner}");
            }
            let (port, admin_port) = (free_port(), free_port());
            let status = ecsd_as(run_as)
                .args(["init", "--dir"])
                .arg(dir.path())
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
                .status()
                .unwrap();
            assert!(status.success(), "ecsd init failed");
            let cfg_path = dir.path().join("ecs.toml");
            let mut text = std::fs::read_to_string(&cfg_path).unwrap();
            edit(&mut text);
            std::fs::write(&cfg_path, text).unwrap();
            for (name, content) in files {
                std::fs::write(dir.path().join(name), content).unwrap();
            }
            let root_pem = std::fs::read(dir.path().join("root.pem")).unwrap();
            let mut ecs = Ecs {
                dir,
                port,
                admin_port,
                child: None,
                root_pem,
                run_as,
            };
            if ecs.spawn() {
                return ecs;
            }
        }
        panic!("ecsd did not start in 5 attempts (see its log above)");
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("ecs.toml")
    }

    pub fn config(&self) -> Config {
        Config::load_with_env(&self.config_path(), Default::default())
            .unwrap()
            .0
    }

    /// Starts the process and waits until `/readyz` answers; false if it exited.
    fn spawn(&mut self) -> bool {
        let log = std::fs::File::create(self.dir.path().join("ecsd.log")).unwrap();
        let child = ecsd_as(self.run_as)
            .args(["serve", "--config"])
            .arg(self.config_path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                eprintln!("ecsd exited with {status}:\n{}", self.log());
                self.child = None;
                return false;
            }
            if admin_get(self.admin_port, "/readyz").is_some_and(|(s, _)| s == 200) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("ecsd not ready within 30 s:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ecsd.log")).unwrap_or_default()
    }

    /// SIGKILL: no chance to flush or finish anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM, and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        c.wait().unwrap()
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        assert!(self.spawn(), "ecsd did not restart");
    }

    pub fn base(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
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

    pub fn token_with(&self, ees_id: &str, prov_id: Option<&str>) -> String {
        ecs_daemon::token::mint(
            &self.config(),
            "dev",
            &ecs_daemon::token::MintRequest {
                ees_id,
                prov_id,
                ttl_secs: 600,
                now: now(),
            },
        )
        .unwrap()
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
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", content_type)];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        client
            .request("POST", &self.url(API), &headers, Some(body))
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
        let verify = ecsd()
            .args(["audit", "verify", "--config"])
            .arg(self.config_path())
            .output()
            .unwrap();
        let export = ecsd()
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

impl Drop for Ecs {
    fn drop(&mut self) {
        self.kill();
    }
}

/// GET on the admin listener (plain HTTP/1.1, by hand: it must not depend on the code
/// under test).
pub fn admin_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Some((status, body))
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
    let out = Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("openssl is installed (./scripts/test installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
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
