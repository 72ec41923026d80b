//! A private PostgreSQL cluster for tests, from the machine's `postgresql` package: `initdb`
//! into a temporary folder, listening on 127.0.0.1 on a free port, password authentication
//! over TCP, stopped when dropped. Never a system cluster. The server refuses to run as
//! root, so as root (CI) it runs as the `postgres` user.

use super::free_port;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The superuser's password in every test cluster (it never leaves the machine's loopback).
pub const PASSWORD: &str = "ecs-test-password";

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    databases: AtomicUsize,
}

/// The server binaries of the newest installed major version.
fn server_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.retain(|p| p.join("initdb").exists());
    versions.sort();
    versions.pop().unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server under /usr/lib/postgresql: install Debian's postgresql \
             package (./scripts/test does)"
        )
    })
}

fn as_root() -> bool {
    rustix::process::geteuid().is_root()
}

impl Postgres {
    /// A new cluster, started.
    pub fn start() -> Postgres {
        Self::start_with(false)
    }

    /// A new cluster that also speaks TLS, with a server certificate for 127.0.0.1 from a
    /// test CA (`db-ca.pem` in [`Postgres::folder`]), and a second CA that did not issue it
    /// (`other-ca.pem`).
    pub fn start_with_tls() -> Postgres {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Postgres {
        let dir = tempfile::Builder::new()
            .prefix("ecs-pg-")
            .tempdir()
            .expect("a temporary folder");
        let pg = Postgres {
            bin: server_bin(),
            port: free_port(),
            databases: AtomicUsize::new(0),
            dir,
        };
        let pwfile = pg.dir.path().join("pw");
        std::fs::write(&pwfile, PASSWORD).unwrap();
        if tls {
            make_certificates(pg.dir.path());
        }
        if as_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(pg.dir.path())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown of the cluster's folder to postgres");
        }
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data().display().to_string(),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                &format!("--pwfile={}", pwfile.display()),
                "--no-sync",
            ],
        );
        std::fs::remove_file(&pwfile).unwrap();
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(pg.data().join("postgresql.conf"))
            .unwrap();
        use std::io::Write;
        writeln!(
            conf,
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             max_connections = 100\nshared_buffers = 32MB",
            pg.port,
            pg.dir.path().display()
        )
        .unwrap();
        if tls {
            writeln!(
                conf,
                "ssl = on\nssl_cert_file = '{0}/server.pem'\nssl_key_file = '{0}/server.key'",
                pg.dir.path().display()
            )
            .unwrap();
        }
        pg.start_again();
        pg
    }

    /// One cluster for every test of this process, stopped when the process ends (a
    /// watcher process stops it, so that even a test binary that aborts leaves none
    /// running).
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(|| {
            let pg = Postgres::start();
            let watch = format!(
                "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop}; rm -rf '{dir}'",
                pid = std::process::id(),
                stop = pg.shell(
                    "pg_ctl",
                    &[
                        "-D",
                        &pg.data().display().to_string(),
                        "-m",
                        "immediate",
                        "stop"
                    ]
                ),
                dir = pg.dir.path().display(),
            );
            // Detached (the shell that starts it returns at once), so that it outlives
            // this process.
            let started = Command::new("sh")
                .args(["-c", &format!("({watch}) </dev/null >/dev/null 2>&1 &")])
                .status()
                .is_ok_and(|s| s.success());
            assert!(started, "the cluster's watcher");
            pg
        })
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The command line that runs a server binary as the cluster's owner.
    fn command(&self, tool: &str, args: &[&str]) -> Command {
        let exe = self.bin.join(tool);
        let mut c = if as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        c.args(args)
            .current_dir(self.dir.path())
            .env("PGPASSWORD", PASSWORD);
        c
    }

    fn shell(&self, tool: &str, args: &[&str]) -> String {
        let exe = self.bin.join(tool).display().to_string();
        let prefix = if as_root() {
            "runuser -u postgres -- "
        } else {
            ""
        };
        format!("{prefix}{exe} {}", args.join(" "))
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let (ok, out) = super::output(&mut self.command(tool, args));
        assert!(ok, "{tool} {args:?}: {out}");
    }

    /// Starts the server (again), waiting until it accepts connections.
    pub fn start_again(&self) {
        let log = self.dir.path().join("pg.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-l",
                &log,
                "-w",
                "start",
            ],
        );
    }

    /// Stops the server: `fast` ends sessions cleanly, `immediate` is a crash.
    pub fn stop(&self, mode: &str) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-m",
                mode,
                "-w",
                "stop",
            ],
        );
    }

    /// A new, empty database; its name.
    pub fn create_database(&self) -> String {
        let name = format!("ecs{}", self.databases.fetch_add(1, Ordering::SeqCst));
        self.run(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                &name,
            ],
        );
        name
    }

    /// The URL of a database (without the password, as `storage.url` wants it).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The server's log, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pg.log")).unwrap_or_default()
    }

    pub fn folder(&self) -> &Path {
        self.dir.path()
    }
}

/// A CA, a server certificate for 127.0.0.1 from it, and an unrelated CA, with openssl.
fn make_certificates(dir: &Path) {
    super::openssl_self_signed(dir, "db-ca", "/CN=Test DB CA", &[]);
    super::openssl_self_signed(dir, "other-ca", "/CN=Other CA", &[]);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\n",
    )
    .unwrap();
    let p256 = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let csr = [
        &["req"][..],
        &p256,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    ]
    .concat();
    let sign = [
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "db-ca.pem",
        "-CAkey",
        "db-ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ];
    for args in [&csr[..], &sign[..]] {
        let (ok, out) = super::output(Command::new("openssl").args(args).current_dir(dir));
        assert!(ok, "openssl {args:?}: {out}");
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command(
                "pg_ctl",
                &[
                    "-D",
                    &self.data().display().to_string(),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
