//! Helpers for testing the PKCS#11 backend and the key ceremony against a real SoftHSM2.
//!
//! Every [`SoftHsm`] is a private token folder with its own `softhsm2.conf`; processes get
//! `SOFTHSM2_CONF` pointing at it, so nothing here ever touches the system token store.
//! Tokens are made with the real `softhsm2-util`, keys with `ecsd ceremony`, and the daemon
//! is the real `ecsd` binary.

use ecs_daemon::testing::{Daemon, Until, admin_get, output};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Debian's SoftHSM2 module (`apt-get install softhsm2`; `./scripts/test` installs it).
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The `ecsd` binary, built once per test process (cargo does not hand another package's
/// binaries to these tests).
pub fn ecsd_path() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            // target/<profile>/deps/<test> → target/<profile>/ecsd, built in that profile.
            let exe = std::env::current_exe().expect("test binary path");
            let profile_dir = exe.parent().and_then(Path::parent).expect("target folder");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
            let mut build = Command::new(cargo);
            build
                .args([
                    "build",
                    "-q",
                    "-p",
                    "ecs-daemon",
                    "--bin",
                    "ecsd",
                    "--manifest-path",
                ])
                .arg(&manifest);
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                build.arg("--release");
            }
            assert!(
                build.status().expect("cargo runs").success(),
                "building ecsd failed"
            );
            let bin = profile_dir.join("ecsd");
            assert!(bin.exists(), "{} not found", bin.display());
            bin
        })
        .clone()
}

/// A private SoftHSM2 token store.
pub struct SoftHsm {
    pub dir: tempfile::TempDir,
}

impl Default for SoftHsm {
    fn default() -> Self {
        Self::new()
    }
}

impl SoftHsm {
    pub fn new() -> SoftHsm {
        assert!(
            Path::new(MODULE).exists(),
            "{MODULE} is missing: install softhsm2 (./scripts/test does)"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )
        .unwrap();
        SoftHsm { dir }
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A command with `SOFTHSM2_CONF` set to this store.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("SOFTHSM2_CONF", self.conf()).current_dir(self.path());
        c
    }

    /// Initialises a token with the real `softhsm2-util`.
    pub fn init_token(&self, label: &str, pin: &str) {
        let out = self
            .command("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                pin,
                "--so-pin",
                "5678",
            ])
            .output()
            .expect("softhsm2-util is installed (./scripts/test installs softhsm2)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The folder of the token labelled `label` (to take it away and bring it back).
    pub fn token_dir(&self, label: &str) -> PathBuf {
        for entry in std::fs::read_dir(self.path().join("tokens")).unwrap() {
            let dir = entry.unwrap().path();
            let object = std::fs::read(dir.join("token.object")).unwrap_or_default();
            if object.windows(label.len()).any(|w| w == label.as_bytes()) {
                return dir;
            }
        }
        panic!("no token labelled {label}");
    }

    /// `ecsd ceremony` with `file` written into this store's folder; the PINs come from
    /// the environment as the file says.
    pub fn ceremony(&self, name: &str, file: &str, env: &[(&str, &str)]) -> Output {
        let path = self.path().join(name);
        std::fs::write(&path, file).unwrap();
        let mut c = self.command(ecsd_path());
        c.args(["ceremony", "--config"]).arg(&path);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    /// `pkcs11-tool --list-objects --type privkey` on a token.
    pub fn list_private_keys(&self, token: &str, pin: &str) -> String {
        let out = self
            .command("pkcs11-tool")
            .args([
                "--module",
                MODULE,
                "--token-label",
                token,
                "--login",
                "--pin",
                pin,
            ])
            .args(["--list-objects", "--type", "privkey"])
            .output()
            .expect("pkcs11-tool is installed (./scripts/test installs opensc)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The ceremony files of a root (P-384, token `ecs-root`) and an intermediate (P-256, token
/// `ecs-ca`), as an ECSP would write them.
pub fn root_ceremony() -> String {
    format!(
        r#"type = "root"
[hsm]
module = "{MODULE}"
token = "ecs-root"
pin = "env:ECS_ROOT_PIN"
[key]
label = "root-2026"
id = "0a1b"
type = "p384"
[certificate]
subject = "C=FI, O=Example MNO, CN=Example ECS Root CA 2026"
not_before = "2026-01-01T00:00:00Z"
not_after = "2046-01-01T00:00:00Z"
path_len = 1
[outputs]
public_key = "out/root.pub.pem"
certificate = "out/root.pem"
transcript = "out/root.transcript.json"
"#
    )
}

pub fn intermediate_ceremony() -> String {
    format!(
        r#"type = "intermediate"
[hsm]
module = "{MODULE}"
token = "ecs-ca"
pin = "env:ECS_HSM_PIN"
[key]
label = "issuing-key"
type = "p256"
[certificate]
subject = "C=FI, O=Example MNO, CN=Example ECS Issuing CA 2026"
not_before = "2026-01-01T00:00:00Z"
not_after = "2036-01-01T00:00:00Z"
path_len = 0
crl_url = "http://crl.mno.example/root.crl"
[issuer]
token = "ecs-root"
pin = "env:ECS_ROOT_PIN"
key_label = "root-2026"
cert = "out/root.pem"
[outputs]
public_key = "out/ca.pub.pem"
certificate = "out/ca.pem"
transcript = "out/ca.transcript.json"
"#
    )
}

pub const ROOT_PIN: &str = "1111";
pub const HSM_PIN: &str = "2222";

pub fn pins() -> [(&'static str, &'static str); 2] {
    [("ECS_ROOT_PIN", ROOT_PIN), ("ECS_HSM_PIN", HSM_PIN)]
}

/// A SoftHSM with the root and intermediate made by ceremonies.
pub fn hsm_with_ca() -> SoftHsm {
    let hsm = SoftHsm::new();
    hsm.init_token("ecs-root", ROOT_PIN);
    hsm.init_token("ecs-ca", HSM_PIN);
    for (name, file) in [
        ("root.toml", root_ceremony()),
        ("ca.toml", intermediate_ceremony()),
    ] {
        let out = hsm.ceremony(name, &file, &pins());
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    hsm
}

/// An `ecsd` whose domain `default` signs with the intermediate in the SoftHSM token: the
/// one harness's [`Daemon`], with the token's configuration and PIN.
pub struct Ecsd {
    d: Daemon,
    pub hsm_dir: PathBuf,
    conf: PathBuf,
    /// The PIN `ecsd serve` is given (`ECS_HSM_PIN`); a test may change it before `start`.
    pub pin: String,
}

impl std::ops::Deref for Ecsd {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.d
    }
}

impl std::ops::DerefMut for Ecsd {
    fn deref_mut(&mut self) -> &mut Daemon {
        &mut self.d
    }
}

impl Ecsd {
    /// Writes the configuration; `tls_from_hsm` makes the HSM backend the default one (it
    /// then also signs the server certificate and the CRL).
    pub fn configure(hsm: &SoftHsm, tls_from_hsm: bool, extra: &str) -> Ecsd {
        let d = Daemon::init(ecsd_path(), None);
        let chain = format!(
            "{}{}",
            std::fs::read_to_string(hsm.path().join("out/ca.pem")).unwrap(),
            std::fs::read_to_string(hsm.path().join("out/root.pem")).unwrap()
        );
        std::fs::write(d.dir.path().join("keys/hsm-chain.pem"), chain).unwrap();
        d.edit_config(|text| {
            *text = text.replace("backend = \"soft\"", "backend = \"hsm\"");
            if !tls_from_hsm {
                *text = text.replace("tls_backend = \"hsm\"", "tls_backend = \"soft\"");
            }
            text.push_str(&format!(
                "\n[backends.hsm]\nkind = \"pkcs11\"\nmodule = \"{MODULE}\"\nkey = \"pkcs11:token=ecs-ca;object=issuing-key\"\npin = \"env:ECS_HSM_PIN\"\ncert = \"keys/hsm-chain.pem\"\n{extra}"
            ));
        });
        Ecsd {
            d,
            hsm_dir: hsm.path().to_path_buf(),
            conf: hsm.conf(),
            pin: HSM_PIN.into(),
        }
    }

    /// Starts `ecsd serve` against the token; returns false if it exited (its stderr is in
    /// [`Daemon::log`]). Waits for the listener only: a test may start it with the token away.
    pub fn start(&mut self) -> bool {
        let (conf, pin) = (self.conf.clone(), self.pin.clone());
        self.d.set_env("SOFTHSM2_CONF", &conf);
        self.d.set_env("ECS_HSM_PIN", &pin);
        self.d.spawn(Until::Listening)
    }

    /// The root the EES trusts for the server certificate.
    pub fn server_root(&self, tls_from_hsm: bool) -> Vec<u8> {
        if tls_from_hsm {
            std::fs::read(self.hsm_dir.join("out/root.pem")).unwrap()
        } else {
            std::fs::read(self.dir.path().join("root.pem")).unwrap()
        }
    }

    /// GET on the admin listener: (status, body).
    pub fn admin(&self, path: &str) -> (u16, String) {
        admin_get(self.admin_port, path).expect("the admin listener answers")
    }

    /// A valid onboarding token from the development issuer.
    pub fn token(&self, ees_id: &str) -> String {
        self.token_with(ees_id, None)
    }
}

/// A registration body with a fresh P-256 key's CSR; returns (body, key PEM).
pub fn registration(ees_id: &str) -> (serde_json::Value, String) {
    let pem = ecs_ca_backends::generate_p256_pkcs8_pem().unwrap();
    let key = ecs_ca_backends::SoftwareKey::from_pkcs8_pem(&pem).unwrap();
    let csr = ecs_ca_backends::build_csr(&key, ees_id).unwrap();
    (
        serde_json::json!({
            "eesProf": { "eesId": ees_id, "endPt": { "fqdn": ees_id }, "eecRegConf": false },
            "onboarding": { "csr": csr }
        }),
        pem.to_string(),
    )
}

/// Runs `openssl` in `dir`; (success, output).
pub fn openssl(args: &[&str], dir: &Path) -> (bool, String) {
    output(Command::new("openssl").args(args).current_dir(dir))
}
