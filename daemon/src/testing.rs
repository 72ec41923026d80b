//! A real `ecsd` process for tests, the one harness that every test suite starts it with:
//! `ecsd init` into a temporary folder with free loopback ports, the configuration edited,
//! `ecsd serve` as a child process logging into the folder, stopped when dropped. The
//! contract tests (`daemon/tests`) and the SoftHSM tests wrap it with what they add.
//! Built only with the `testing` feature: never part of a production binary.

pub mod postgres;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A P-256 key (`DIR/NAME.key`, mode 0600) and a self-signed certificate for it
/// (`DIR/NAME.pem`, two days) with `subject`, made by openssl; `extra` are more arguments of
/// `openssl req` (e.g. `-addext subjectAltName=IP:127.0.0.1`).
pub fn openssl_self_signed(dir: &Path, name: &str, subject: &str, extra: &[&str]) {
    let (key, cert) = (format!("{name}.key"), format!("{name}.pem"));
    let mut args = vec![
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &key,
        "-out",
        &cert,
        "-subj",
        subject,
        "-days",
        "2",
    ];
    args.extend_from_slice(extra);
    let (ok, out) = output(Command::new("openssl").args(&args).current_dir(dir));
    assert!(ok, "openssl {args:?}: {out}");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join(&key), std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// GET on an admin listener (plain HTTP/1.1, by hand: it must not depend on the code under
/// test). None when nothing answers.
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

/// Runs a command to its end: (success, stdout then stderr).
pub fn output(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// What [`Daemon::spawn`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// `/readyz` answers 200.
    Ready,
    /// The admin listener accepts connections (a backend may still be away).
    Listening,
}

/// One `ecsd` in its own folder.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub admin_port: u16,
    bin: PathBuf,
    /// The user and group `ecsd` runs as (through `setpriv`), when not ours.
    run_as: Option<u32>,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Daemon {
    /// `ecsd init` (the binary `bin`) into a new temporary folder, listening on free ports.
    pub fn init(bin: impl Into<PathBuf>, run_as: Option<u32>) -> Daemon {
        let dir = tempfile::tempdir().expect("a temporary folder");
        if let Some(uid) = run_as {
            let owner = format!("{uid}:{uid}");
            let chown = Command::new("chown").arg(&owner).arg(dir.path()).status();
            assert!(chown.is_ok_and(|s| s.success()), "chown {owner}");
        }
        let d = Daemon {
            dir,
            port: free_port(),
            admin_port: free_port(),
            bin: bin.into(),
            run_as,
            env: vec![("RUST_LOG".into(), "info".into())],
            child: None,
        };
        let status = d
            .command()
            .args(["init", "--dir"])
            .arg(d.dir.path())
            .args(["--listen", &format!("127.0.0.1:{}", d.port)])
            .args(["--admin-listen", &format!("127.0.0.1:{}", d.admin_port)])
            .stdout(Stdio::null())
            .status()
            .expect("ecsd runs");
        assert!(status.success(), "ecsd init failed");
        let mut d = d;
        // The contract suite once more on PostgreSQL (./scripts/test runs it so): each ECS
        // gets a database of its own in this test process's private cluster.
        if std::env::var("ECS_TEST_STORE").as_deref() == Ok("postgres") {
            let pg = postgres::Postgres::shared();
            let db = pg.create_database();
            d.use_postgres(pg, &db);
        }
        d
    }

    /// The `ecsd` binary, as the daemon's user, with the daemon's environment.
    pub fn command(&self) -> Command {
        let mut c = match self.run_as {
            None => Command::new(&self.bin),
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .arg("--clear-groups")
                    .arg(&self.bin);
                c
            }
        };
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Puts this ECS's store in `database` of a private PostgreSQL cluster, through the
    /// environment overrides (`ECS__STORAGE__*`), for `serve` and every command alike.
    pub fn use_postgres(&mut self, pg: &postgres::Postgres, database: &str) {
        self.set_env("ECS__STORAGE__KIND", "postgres");
        self.set_env("ECS__STORAGE__URL", pg.url(database));
        self.set_env("ECS__STORAGE__PASSWORD", "env:ECS_TEST_DB_PASSWORD");
        self.set_env("ECS_TEST_DB_PASSWORD", postgres::PASSWORD);
    }

    /// Another replica of this ECS: the same configuration, keys and store (a shared one:
    /// PostgreSQL), in a folder of its own, listening on its own free ports. Not started.
    pub fn replica(&self) -> Daemon {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let copied = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", self.dir.path().display()))
            .arg(dir.path())
            .status();
        assert!(copied.is_ok_and(|s| s.success()), "cp -a of the ECS folder");
        let _ = std::fs::remove_dir_all(dir.path().join("data"));
        let _ = std::fs::remove_file(dir.path().join("ecsd.log"));
        let r = Daemon {
            dir,
            port: free_port(),
            admin_port: free_port(),
            bin: self.bin.clone(),
            run_as: self.run_as,
            env: self.env.clone(),
            child: None,
        };
        r.edit_config(|t| {
            *t = t
                .replace(
                    &format!("listen = \"127.0.0.1:{}\"", self.port),
                    &format!("listen = \"127.0.0.1:{}\"", r.port),
                )
                .replace(
                    &format!("admin_listen = \"127.0.0.1:{}\"", self.admin_port),
                    &format!("admin_listen = \"127.0.0.1:{}\"", r.admin_port),
                );
        });
        r
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("ecs.toml")
    }

    /// Rewrites the configuration file through `edit`.
    pub fn edit_config(&self, edit: impl FnOnce(&mut String)) {
        let path = self.config_path();
        let mut text = std::fs::read_to_string(&path).expect("ecs.toml");
        edit(&mut text);
        std::fs::write(&path, text).expect("ecs.toml written");
    }

    /// An environment variable for `ecsd serve`.
    pub fn set_env(&mut self, name: &str, value: impl AsRef<Path>) {
        self.env.retain(|(n, _)| n != name);
        self.env
            .push((name.into(), value.as_ref().to_string_lossy().into_owned()));
    }

    /// Starts `ecsd serve` and waits (30 s at most) for `until`; false if it exited first
    /// (its stderr is in [`Daemon::log`]).
    pub fn spawn(&mut self, until: Until) -> bool {
        assert!(self.child.is_none(), "stop it first");
        let log = std::fs::File::create(self.dir.path().join("ecsd.log")).expect("ecsd.log");
        let mut c = self.command();
        c.args(["serve", "--config"])
            .arg(self.config_path())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(c.spawn().expect("ecsd serve runs"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let child = self.child.as_mut().expect("spawned");
            if let Ok(Some(status)) = child.try_wait() {
                eprintln!("ecsd exited with {status}:\n{}", self.log());
                self.child = None;
                return false;
            }
            let up = match until {
                Until::Ready => {
                    admin_get(self.admin_port, "/readyz").is_some_and(|(s, _)| s == 200)
                }
                Until::Listening => {
                    std::net::TcpStream::connect(("127.0.0.1", self.admin_port)).is_ok()
                }
            };
            if up {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("ecsd not {until:?} within 30 s:\n{}", self.log());
    }

    /// What `ecsd serve` wrote to stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ecsd.log")).unwrap_or_default()
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: no chance to flush or finish anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        c.wait().expect("ecsd exits")
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn base(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The configuration as the daemon reads it.
    pub fn config(&self) -> crate::config::Config {
        crate::config::Config::load_with_env(&self.config_path(), Default::default())
            .expect("the configuration loads")
            .0
    }

    /// A valid onboarding token (10 minutes) from the development issuer.
    pub fn token_with(&self, ees_id: &str, prov_id: Option<&str>) -> String {
        crate::token::mint(
            &self.config(),
            "dev",
            &crate::token::MintRequest {
                ees_id,
                prov_id,
                ttl_secs: 600,
                now: crate::clock::now(),
            },
        )
        .expect("the development issuer mints")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}
