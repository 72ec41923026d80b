//! The configuration file of `contract/operator.md` §1: TOML, `ECS__SECTION__KEY` environment
//! overrides, paths relative to the file's folder, and every unknown key or bad value refused
//! at start in one line that names it.

use ecs_policy::{DomainPolicy, Finding, Known, PolicyDuration, Severity};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

/// The name of the domain that governs a profile without `provId`.
pub const DEFAULT_DOMAIN: &str = "default";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The ECS's identifier: the audience every onboarding token must name.
    pub ecs_id: String,
    pub server: ServerConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub backends: BTreeMap<String, BackendConfig>,
    #[serde(default)]
    pub token_issuers: BTreeMap<String, TokenIssuerConfig>,
    #[serde(default)]
    pub domains: BTreeMap<String, DomainPolicy>,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    /// Where the file was read from; relative paths were resolved against its folder.
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: String,
    /// Base of `Location` headers and of the CRL URL in certificates.
    pub public_url: String,
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// The backend that issues the server certificate when `tls_cert` is absent, and whose
    /// CA `/pki/v1/ca` and `/pki/v1/crl` serve.
    #[serde(default)]
    pub tls_backend: Option<String>,
    /// `/metrics`, `/healthz` and `/readyz` over plain HTTP (they reveal nothing).
    #[serde(default)]
    pub admin_listen: Option<String>,
    /// The control socket (Unix): policy reload, registrations, audit records, backups.
    /// Absent: `admin.sock` in the store's folder.
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
    /// A group whose members may use the control socket (mode 0660); absent: its owner
    /// only (mode 0600).
    #[serde(default)]
    pub admin_group: Option<String>,
    /// How often expired registrations are swept (implicit de-registration).
    #[serde(default = "default_sweep")]
    pub sweep_interval: PolicyDuration,
    /// How long a CRL is valid (`nextUpdate - thisUpdate`); a new one is signed at half-life.
    #[serde(default = "default_crl_validity")]
    pub crl_validity: PolicyDuration,
    /// Longest time to wait for in-flight requests on SIGTERM.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: PolicyDuration,
    /// Validity of the server certificate the daemon issues itself (no `tls_cert`).
    #[serde(default = "default_tls_cert_validity")]
    pub tls_cert_validity: PolicyDuration,
    /// The self-issued server certificate is replaced this long before it expires, while
    /// the daemon runs.
    #[serde(default = "default_tls_renew_before")]
    pub tls_renew_before: PolicyDuration,
}

fn default_tls_cert_validity() -> PolicyDuration {
    PolicyDuration::from_secs(365 * 86_400)
}
fn default_tls_renew_before() -> PolicyDuration {
    PolicyDuration::from_secs(30 * 86_400)
}

/// Signed checkpoints of the audit chain (`crate::audit::checkpoint`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// A checkpoint at most this often (when records were added), and one at stop.
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: PolicyDuration,
    /// The PKCS#8 private key that signs checkpoints, used for nothing else; absent: no
    /// checkpoints (lint warns).
    #[serde(default)]
    pub checkpoint_key: Option<PathBuf>,
    /// Where checkpoints are appended: outside the store.
    #[serde(default = "default_checkpoint_log")]
    pub checkpoint_log: PathBuf,
}

fn default_checkpoint_interval() -> PolicyDuration {
    PolicyDuration::from_secs(60)
}
fn default_checkpoint_log() -> PathBuf {
    PathBuf::from("audit-checkpoints.jsonl")
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            checkpoint_interval: default_checkpoint_interval(),
            checkpoint_key: None,
            checkpoint_log: default_checkpoint_log(),
        }
    }
}

/// Bounds on what a client may hold of the EES-facing listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open connections at most; more are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Open connections from one client address at most; more are closed at once. 0: no
    /// limit but `max_connections`.
    #[serde(default = "default_max_connections_per_address")]
    pub max_connections_per_address: usize,
    /// A kept-alive connection (HTTP/1.1 or HTTP/2) with no request for this long is closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: PolicyDuration,
    /// How often an HTTP/2 connection is pinged; one whose peer does not answer within the
    /// same time is closed.
    #[serde(default = "default_h2_keepalive")]
    pub h2_keepalive_interval: PolicyDuration,
    /// Time to complete the TLS handshake.
    #[serde(default = "default_handshake_timeout")]
    pub tls_handshake_timeout: PolicyDuration,
    /// Time to send a request's headers, and to start the next request on a kept-alive
    /// connection (slowloris and idle keep-alive).
    #[serde(default = "default_header_timeout")]
    pub header_read_timeout: PolicyDuration,
    /// Time to send a request's body.
    #[serde(default = "default_body_timeout")]
    pub request_body_timeout: PolicyDuration,
    /// Concurrent HTTP/2 streams per connection.
    #[serde(default = "default_h2_streams")]
    pub h2_max_concurrent_streams: u32,
    /// Registration requests (POST) per minute from one client address; 0 is no limit.
    #[serde(default)]
    pub registrations_per_minute_per_address: u32,
    /// Registrations per minute onboarded by one token issuer; 0 is no limit.
    #[serde(default)]
    pub registrations_per_minute_per_issuer: u32,
    /// Failed authentications (401) per minute from one client address; past it, every
    /// request from that address answers 429 until the allowance recovers. 0 is no limit.
    #[serde(default)]
    pub failed_auth_per_minute_per_address: u32,
    /// The burst each of the rate limits above allows.
    #[serde(default = "default_burst")]
    pub rate_burst: u32,
    /// Certificates being signed (and stored) at once.
    #[serde(default = "default_signing_inflight")]
    pub max_signing_inflight: usize,
    /// Requests that may wait for a signing slot; past it, 503 with `Retry-After` at once.
    #[serde(default = "default_signing_queue")]
    pub signing_queue: usize,
}

fn default_signing_inflight() -> usize {
    64
}
fn default_signing_queue() -> usize {
    1024
}

fn default_burst() -> u32 {
    10
}

fn default_max_connections() -> usize {
    4096
}
fn default_max_connections_per_address() -> usize {
    64
}
fn default_idle_timeout() -> PolicyDuration {
    PolicyDuration::from_secs(60)
}
fn default_h2_keepalive() -> PolicyDuration {
    PolicyDuration::from_secs(20)
}
fn default_handshake_timeout() -> PolicyDuration {
    PolicyDuration::from_secs(10)
}
fn default_header_timeout() -> PolicyDuration {
    PolicyDuration::from_secs(10)
}
fn default_body_timeout() -> PolicyDuration {
    PolicyDuration::from_secs(30)
}
fn default_h2_streams() -> u32 {
    64
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: default_max_connections(),
            max_connections_per_address: default_max_connections_per_address(),
            idle_timeout: default_idle_timeout(),
            h2_keepalive_interval: default_h2_keepalive(),
            tls_handshake_timeout: default_handshake_timeout(),
            header_read_timeout: default_header_timeout(),
            request_body_timeout: default_body_timeout(),
            h2_max_concurrent_streams: default_h2_streams(),
            registrations_per_minute_per_address: 0,
            registrations_per_minute_per_issuer: 0,
            failed_auth_per_minute_per_address: 0,
            rate_burst: default_burst(),
            max_signing_inflight: default_signing_inflight(),
            signing_queue: default_signing_queue(),
        }
    }
}

fn default_connect_timeout() -> PolicyDuration {
    PolicyDuration::from_secs(2)
}
fn default_total_timeout() -> PolicyDuration {
    PolicyDuration::from_secs(10)
}

fn default_sweep() -> PolicyDuration {
    PolicyDuration::from_secs(5)
}
fn default_crl_validity() -> PolicyDuration {
    PolicyDuration::from_secs(86_400)
}
fn default_shutdown_grace() -> PolicyDuration {
    PolicyDuration::from_secs(30)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default)]
    pub kind: StorageKind,
    #[serde(default = "default_storage_path")]
    pub path: PathBuf,
    /// The store's page cache, MiB (sled's default is 1 GiB, which memory would grow to).
    #[serde(default = "default_cache_mib")]
    pub cache_mib: u64,
    /// PostgreSQL: `postgres://USER@HOST[:PORT]/DATABASE` (no password in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// PostgreSQL: the password, as `env:NAME` or `file:PATH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// PostgreSQL: present, TLS to the database, its certificate verified against this CA
    /// bundle (PEM); absent, a plain connection (loopback or a private network only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// PostgreSQL: the most connections this replica opens for reads (the writer has its own).
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
}

fn default_pool_size() -> usize {
    16
}

impl StorageConfig {
    /// Where the store is, for messages: the file or folder, or the database's URL.
    pub fn location(&self) -> String {
        match self.kind {
            StorageKind::Postgres => self.url.clone().unwrap_or_default(),
            StorageKind::Sqlite | StorageKind::Sled => self.path.display().to_string(),
        }
    }

    /// The configuration key that says where the store is.
    pub fn location_key(&self) -> &'static str {
        if self.kind.embedded() {
            "storage.path"
        } else {
            "storage.url"
        }
    }
}

fn default_cache_mib() -> u64 {
    32
}

/// The storage engines `[storage] kind` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// The embedded default: one SQLite database file.
    #[default]
    Sqlite,
    /// sled 0.34, a folder: kept for stores made before SQLite was the default.
    Sled,
    /// A PostgreSQL database that several replicas share.
    Postgres,
}

impl StorageKind {
    /// The name `[storage] kind` gives it.
    pub fn name(self) -> &'static str {
        match self {
            StorageKind::Sqlite => "sqlite",
            StorageKind::Sled => "sled",
            StorageKind::Postgres => "postgres",
        }
    }

    /// Whether one process holds the store (a file or folder on this machine), rather than
    /// a database server that several replicas share.
    pub fn embedded(self) -> bool {
        match self {
            StorageKind::Sqlite | StorageKind::Sled => true,
            StorageKind::Postgres => false,
        }
    }
}
fn default_storage_path() -> PathBuf {
    PathBuf::from("data/ecs.db")
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            kind: StorageKind::default(),
            path: default_storage_path(),
            cache_mib: default_cache_mib(),
            url: None,
            password: None,
            tls_ca: None,
            pool_size: default_pool_size(),
        }
    }
}

/// A signing backend, selected by `kind`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum BackendConfig {
    Software {
        /// PKCS#8 PEM private key of the issuing CA.
        key: PathBuf,
        /// The issuing CA certificate, followed by its chain up to the root.
        cert: PathBuf,
        /// For an RSA key: `pkcs1` (PKCS#1 v1.5, the default) or `pss` (RSASSA-PSS).
        #[serde(default)]
        rsa_signature: RsaSignature,
    },
    Pkcs11 {
        /// The PKCS#11 module; may instead come from the URI's `module-path`.
        #[serde(default)]
        module: Option<PathBuf>,
        /// RFC 7512 URI of the key: `pkcs11:token=…;object=…` (or `id=`, `serial=`, `slot-id=`).
        key: String,
        /// `env:NAME` or `file:PATH`.
        pin: String,
        cert: PathBuf,
        /// Signing sessions at most (default: 2 × cores).
        #[serde(default)]
        max_sessions: Option<usize>,
        /// For an RSA key: `pkcs1` (the default) or `pss`.
        #[serde(default)]
        rsa_signature: RsaSignature,
    },
    Cfssl {
        /// `http://host:port` or `https://host:port` of `cfssl serve` (or any CA speaking
        /// the CFSSL remote-signing API).
        url: String,
        #[serde(default)]
        profile: Option<String>,
        /// `env:NAME` or `file:PATH` holding the hex HMAC key of `/authsign`.
        #[serde(default)]
        auth_key: Option<String>,
        /// The external CA's chain: what it returns must chain to its first certificate.
        cert: PathBuf,
        /// Trust roots (PEM) for an `https://` URL; default: `cert`.
        #[serde(default)]
        tls_ca: Option<PathBuf>,
        #[serde(default = "default_connect_timeout")]
        connect_timeout: PolicyDuration,
        #[serde(default = "default_total_timeout")]
        timeout: PolicyDuration,
        /// Parts of the approved certificate the external profile cannot put in, tolerated
        /// when missing: `uri_san`, `organization`, `server_auth`.
        #[serde(default)]
        not_honoured: Vec<String>,
    },
}

/// The RSA signature scheme of an issuing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RsaSignature {
    #[default]
    Pkcs1,
    Pss,
}

impl BackendConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::Software { .. } => "software",
            BackendConfig::Pkcs11 { .. } => "pkcs11",
            BackendConfig::Cfssl { .. } => "cfssl",
        }
    }
}

/// An OAuth 2.0 authorization server trusted for onboarding tokens.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenIssuerConfig {
    /// Must equal the token's `iss`.
    pub issuer: String,
    /// A JWKS file.
    #[serde(default)]
    pub jwks: Option<PathBuf>,
    /// A JWKS URL, fetched over HTTPS and cached.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// PEM file of the CA that signs the `jwks_url` server's certificate; absent: the
    /// issuing CA chains of this ECS's backends.
    #[serde(default)]
    pub jwks_ca: Option<PathBuf>,
    /// PEM public keys (SPKI), each used with its file stem as `kid`.
    #[serde(default)]
    pub keys: Vec<PathBuf>,
    /// The issuer's private key (PKCS#8 PEM) when this ECS may mint tokens for it: the
    /// development issuer of `ecsd init`. Never set this for a production authorization server.
    #[serde(default)]
    pub private_key: Option<PathBuf>,
    /// The `kid` used when minting.
    #[serde(default)]
    pub kid: Option<String>,
    /// Shortest time between two fetches of `jwks_url` prompted by an unknown `kid`.
    #[serde(default = "default_jwks_refresh")]
    pub jwks_min_refresh: PolicyDuration,
    /// The longest lifetime (`exp - iat`) of a token from this issuer; a token's ID is kept
    /// until it expires, so a long-lived token would be remembered for as long.
    #[serde(default = "default_max_token_lifetime")]
    pub max_token_lifetime: PolicyDuration,
}

/// `max_token_lifetime` when the configuration does not say.
pub const DEFAULT_MAX_TOKEN_LIFETIME_SECS: i64 = 3600;

fn default_max_token_lifetime() -> PolicyDuration {
    PolicyDuration::from_secs(DEFAULT_MAX_TOKEN_LIFETIME_SECS as u64)
}

fn default_jwks_refresh() -> PolicyDuration {
    PolicyDuration::from_secs(60)
}

/// A configuration problem, naming the file and key at fault.
#[derive(Debug, Clone)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads `path`, applies `ECS__…` overrides from the process environment, resolves paths
    /// and validates. Warnings are returned for the caller to log.
    pub fn load(path: &Path) -> Result<(Config, Vec<Finding>), ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Self::load_with_env(path, env)
    }

    /// [`Config::load`] with an explicit environment (tests must not mutate the process's).
    pub fn load_with_env(
        path: &Path,
        env: HashMap<String, String>,
    ) -> Result<(Config, Vec<Finding>), ConfigError> {
        let cfg = Self::parse_with_env(path, env)?;
        let findings = cfg.validate(crate::clock::now());
        if let Some(err) = findings.iter().find(|f| f.severity == Severity::Error) {
            return Err(ConfigError(format!(
                "{}: {}: {}",
                path.display(),
                err.key,
                err.message
            )));
        }
        Ok((cfg, findings))
    }

    /// Reads and parses the file with the process environment's overrides, without the
    /// cross-checks of [`Config::validate`] (what `policy lint` reports in full).
    pub fn parse(path: &Path) -> Result<Config, ConfigError> {
        Self::parse_with_env(path, std::env::vars().collect())
    }

    fn parse_with_env(path: &Path, env: HashMap<String, String>) -> Result<Config, ConfigError> {
        let text = crate::files::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        Self::parse_text(&text, path, env)
    }

    /// Parses configuration `text` as if read from `path` (which names it in errors and
    /// anchors relative paths), with `ECS__…` overrides from `env`.
    pub fn parse_text(
        text: &str,
        path: &Path,
        env: HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let shown = path.display();
        // The file alone first: toml's errors carry the line and column, which the merged
        // view below no longer knows.
        if let Err(e) = toml::from_str::<Config>(text) {
            let env_overrides = env.keys().any(|k| k.starts_with("ECS__"));
            // A required key may legitimately come from the environment only.
            if !(env_overrides && e.message().starts_with("missing field")) {
                return Err(ConfigError(toml_error(&shown.to_string(), text, &e)));
            }
        }
        let mut envsrc = config::Environment::with_prefix("ECS")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .source(Some(
                env.into_iter()
                    .filter(|(k, _)| k.starts_with("ECS__"))
                    .collect(),
            ));
        for key in list_keys(text) {
            envsrc = envsrc.with_list_parse_key(&key);
        }
        let merged = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(envsrc)
            .build()
            .map_err(|e| ConfigError(format!("{shown}: {}", one_line(&e.to_string()))))?;
        let mut cfg: Config = merged
            .try_deserialize()
            .map_err(|e| ConfigError(format!("{shown}: {}", one_line(&e.to_string()))))?;
        cfg.source = path.to_path_buf();
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        cfg.resolve_paths(&base);
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(p) = self.server.tls_cert.as_mut() {
            fix(p);
        }
        if let Some(p) = self.server.tls_key.as_mut() {
            fix(p);
        }
        if let Some(p) = self.server.admin_socket.as_mut() {
            fix(p);
        }
        fix(&mut self.storage.path);
        if let Some(p) = self.storage.tls_ca.as_mut() {
            fix(p);
        }
        if let Some(spec) = self.storage.password.as_mut()
            && let Some(file) = spec.strip_prefix("file:")
        {
            let mut p = PathBuf::from(file);
            fix(&mut p);
            *spec = format!("file:{}", p.display());
        }
        fix(&mut self.audit.checkpoint_log);
        if let Some(p) = self.audit.checkpoint_key.as_mut() {
            fix(p);
        }
        for b in self.backends.values_mut() {
            match b {
                BackendConfig::Software { key, cert, .. } => {
                    fix(key);
                    fix(cert);
                }
                BackendConfig::Pkcs11 { module, cert, .. } => {
                    if let Some(m) = module.as_mut() {
                        fix(m);
                    }
                    fix(cert);
                }
                BackendConfig::Cfssl { cert, tls_ca, .. } => {
                    fix(cert);
                    if let Some(t) = tls_ca.as_mut() {
                        fix(t);
                    }
                }
            }
        }
        for i in self.token_issuers.values_mut() {
            for p in i
                .jwks
                .iter_mut()
                .chain(i.jwks_ca.iter_mut())
                .chain(i.private_key.iter_mut())
            {
                fix(p);
            }
            for p in &mut i.keys {
                fix(p);
            }
        }
        for d in self.domains.values_mut() {
            if let Some(tp) = d.third_party.as_mut() {
                // CRLs are files or https URLs; a URL is left as written.
                let files = tp.crls.iter_mut().filter(|c| !c.contains("://"));
                for a in tp.trust_anchors.iter_mut().chain(files) {
                    let mut p = PathBuf::from(&*a);
                    fix(&mut p);
                    *a = p.display().to_string();
                }
            }
        }
    }

    /// Every finding about this configuration: what `serve` refuses (errors) and what an
    /// auditor should look at (warnings).
    pub fn validate(&self, now: i64) -> Vec<Finding> {
        let mut out = Vec::new();
        let mut err = |key: String, message: String| {
            out.push(Finding {
                severity: Severity::Error,
                key,
                message,
            })
        };
        if self.ecs_id.trim().is_empty() {
            err("ecs_id".into(), "must not be empty".into());
        }
        if self.server.listen.parse::<std::net::SocketAddr>().is_err() {
            err(
                "server.listen".into(),
                format!("{:?} is not an address:port", self.server.listen),
            );
        }
        match self.storage.kind {
            StorageKind::Postgres => match self.storage.url.as_deref() {
                None => err(
                    "storage.url".into(),
                    "kind = \"postgres\" needs url = \"postgres://USER@HOST:PORT/DATABASE\"".into(),
                ),
                Some(u) => {
                    if let Err(e) = u.parse::<tokio_postgres::Config>() {
                        err("storage.url".into(), format!("{u:?}: {e}"));
                    } else if u
                        .parse::<tokio_postgres::Config>()
                        .is_ok_and(|c| c.get_password().is_some())
                    {
                        err(
                            "storage.url".into(),
                            "holds a password: give it as storage.password = \"env:NAME\" or \"file:PATH\"".into(),
                        );
                    }
                }
            },
            StorageKind::Sqlite | StorageKind::Sled => {
                for (key, set) in [
                    ("url", self.storage.url.is_some()),
                    ("password", self.storage.password.is_some()),
                    ("tls_ca", self.storage.tls_ca.is_some()),
                ] {
                    if set {
                        err(
                            format!("storage.{key}"),
                            format!(
                                "only for kind = \"postgres\" (this store is {})",
                                self.storage.kind.name()
                            ),
                        );
                    }
                }
            }
        }
        // A certificate's validity starts 5 minutes back (clock skew), so that much of
        // tls_cert_validity is already spent when it is issued.
        let lifetime = self
            .server
            .tls_cert_validity
            .as_secs()
            .saturating_sub(ecs_ca_backends::BACKDATE_SECS as u64);
        if self.server.tls_renew_before.as_secs() >= lifetime {
            err(
                "server.tls_renew_before".into(),
                "must be shorter than server.tls_cert_validity less the 5 minutes a \
                 certificate is backdated"
                    .into(),
            );
        }
        if self.storage.pool_size == 0 {
            err("storage.pool_size".into(), "must be at least 1".into());
        }
        if let Some(a) = &self.server.admin_listen
            && a.parse::<std::net::SocketAddr>().is_err()
        {
            err(
                "server.admin_listen".into(),
                format!("{a:?} is not an address:port"),
            );
        }
        match url_host(&self.server.public_url) {
            Some(_) => {}
            None => err(
                "server.public_url".into(),
                format!(
                    "{:?} is not an https:// URL with a host",
                    self.server.public_url
                ),
            ),
        }
        if self.server.tls_cert.is_some() != self.server.tls_key.is_some() {
            err(
                "server.tls_key".into(),
                "tls_cert and tls_key go together".into(),
            );
        }
        for (key, secs) in [
            (
                "limits.tls_handshake_timeout",
                self.limits.tls_handshake_timeout.as_secs(),
            ),
            (
                "limits.header_read_timeout",
                self.limits.header_read_timeout.as_secs(),
            ),
            (
                "limits.request_body_timeout",
                self.limits.request_body_timeout.as_secs(),
            ),
        ] {
            if secs == 0 {
                err(key.into(), "must be longer than zero".into());
            }
        }
        if self.limits.max_signing_inflight == 0 {
            err(
                "limits.max_signing_inflight".into(),
                "must be at least 1".into(),
            );
        }
        if self.limits.max_connections == 0 || self.limits.h2_max_concurrent_streams == 0 {
            err(
                "limits".into(),
                "max_connections and h2_max_concurrent_streams must be at least 1".into(),
            );
        }
        if self.backends.is_empty() {
            err("backends".into(), "no signing backend is configured".into());
        }
        match &self.server.tls_backend {
            Some(b) if !self.backends.contains_key(b) => err(
                "server.tls_backend".into(),
                format!("unknown backend {b:?}"),
            ),
            None if self.backends.len() > 1 => err(
                "server.tls_backend".into(),
                "missing: several backends are configured, name the default one".into(),
            ),
            _ => {}
        }
        for (name, b) in &self.backends {
            match b {
                BackendConfig::Software { .. } => {}
                BackendConfig::Pkcs11 {
                    module,
                    key,
                    pin,
                    max_sessions,
                    ..
                } => {
                    match ecs_ca_backends::pkcs11::Pkcs11Uri::parse(key) {
                        Ok(uri) if module.is_none() && uri.module_path.is_none() => err(
                            format!("backends.{name}.module"),
                            "missing: give module or module-path in the key URI".into(),
                        ),
                        Ok(_) => {}
                        Err(e) => err(format!("backends.{name}.key"), e),
                    }
                    if !(pin.starts_with("env:") || pin.starts_with("file:")) {
                        err(
                            format!("backends.{name}.pin"),
                            "give env:NAME or file:PATH, never the PIN itself".into(),
                        );
                    }
                    if *max_sessions == Some(0) {
                        err(
                            format!("backends.{name}.max_sessions"),
                            "must be at least 1".into(),
                        );
                    }
                }
                BackendConfig::Cfssl {
                    url,
                    auth_key,
                    not_honoured,
                    timeout,
                    ..
                } => {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        err(
                            format!("backends.{name}.url"),
                            format!("{url:?} is not http(s)://"),
                        );
                    }
                    if let Some(k) = auth_key
                        && !(k.starts_with("env:") || k.starts_with("file:"))
                    {
                        err(
                            format!("backends.{name}.auth_key"),
                            "give env:NAME or file:PATH, never the key itself".into(),
                        );
                    }
                    for n in not_honoured {
                        if ecs_ca_backends::cfssl::NotHonoured::parse(n).is_none() {
                            err(
                                format!("backends.{name}.not_honoured"),
                                format!("{n:?} is not one of uri_san, organization, server_auth"),
                            );
                        }
                    }
                    if timeout.as_secs() == 0 {
                        err(
                            format!("backends.{name}.timeout"),
                            "must be longer than zero".into(),
                        );
                    }
                    if self.default_backend() == name && self.server.tls_cert.is_none() {
                        err(
                            "server.tls_backend".into(),
                            format!(
                                "backend {name:?} is an external CA: it cannot issue the server certificate; name another backend or give tls_cert/tls_key"
                            ),
                        );
                    }
                }
            }
        }
        for (name, i) in &self.token_issuers {
            let sources = i.jwks.is_some() as usize
                + i.jwks_url.is_some() as usize
                + (!i.keys.is_empty()) as usize;
            if sources != 1 {
                err(
                    format!("token_issuers.{name}"),
                    "give exactly one of jwks, jwks_url and keys".into(),
                );
            }
            if let Some(u) = &i.jwks_url
                && !u.starts_with("https://")
            {
                err(
                    format!("token_issuers.{name}.jwks_url"),
                    "must be an https:// URL".into(),
                );
            }
        }
        for (key, secs) in [
            ("limits.idle_timeout", self.limits.idle_timeout.as_secs()),
            (
                "limits.h2_keepalive_interval",
                self.limits.h2_keepalive_interval.as_secs(),
            ),
            (
                "audit.checkpoint_interval",
                self.audit.checkpoint_interval.as_secs(),
            ),
        ] {
            if secs == 0 {
                err(key.into(), "must be longer than zero".into());
            }
        }
        if let Some(k) = &self.audit.checkpoint_key {
            let shared = self
                .backends
                .iter()
                .filter_map(|(n, b)| match b {
                    BackendConfig::Software { key, .. } => Some((format!("backends.{n}.key"), key)),
                    _ => None,
                })
                .chain(self.token_issuers.iter().filter_map(|(n, i)| {
                    i.private_key
                        .as_ref()
                        .map(|p| (format!("token_issuers.{n}.private_key"), p))
                }))
                .find(|(_, p)| *p == k);
            if let Some((other, _)) = shared {
                err(
                    "audit.checkpoint_key".into(),
                    format!("is also {other}: the checkpoint key is a key used for nothing else"),
                );
            }
        }
        let backends: Vec<&str> = self.backends.keys().map(String::as_str).collect();
        let issuers: Vec<&str> = self.token_issuers.keys().map(String::as_str).collect();
        let known = Known {
            backends: &backends,
            token_issuers: &issuers,
        };
        out.extend(ecs_policy::lint_policy(
            &self.domains,
            &known,
            self.default_backend(),
            &self.anchor_facts(),
            now,
        ));
        if self.audit.checkpoint_key.is_none() {
            out.push(Finding {
                severity: Severity::Warning,
                key: "audit.checkpoint_key".into(),
                message: "absent: no signed checkpoints, so records cut from the end of the audit log go unnoticed".into(),
            });
        }
        if let Some(a) = &self.server.admin_listen
            && a.parse::<std::net::SocketAddr>()
                .is_ok_and(|a| !a.ip().is_loopback())
        {
            out.push(Finding {
                severity: Severity::Warning,
                key: "server.admin_listen".into(),
                message: format!("{a} is not a loopback address: /metrics, /healthz and /readyz are reachable from the network"),
            });
        }
        out
    }

    /// Reads every domain's third-party trust anchors for the lint: each file's certificates
    /// with their facts, or why the file is unusable.
    fn anchor_facts(&self) -> BTreeMap<String, Vec<ecs_policy::AnchorFacts>> {
        use der::Decode;
        let mut out = BTreeMap::new();
        for (name, d) in &self.domains {
            let Some(tp) = &d.third_party else { continue };
            let mut facts = Vec::new();
            for path in &tp.trust_anchors {
                match crate::trust::read_anchor_file(path) {
                    Ok(ders) => {
                        for der in ders {
                            let not_after = x509_cert::Certificate::from_der(&der)
                                .map(|c| {
                                    c.tbs_certificate()
                                        .validity()
                                        .not_after
                                        .to_unix_duration()
                                        .as_secs() as i64
                                })
                                .unwrap_or(0);
                            facts.push(ecs_policy::AnchorFacts {
                                path: path.clone(),
                                parsed: Ok(()),
                                is_ca: true,
                                not_after,
                            });
                        }
                    }
                    Err(e) => facts.push(ecs_policy::AnchorFacts {
                        path: path.clone(),
                        // The lint names the file itself.
                        parsed: Err(e
                            .strip_prefix(&format!("{path}: "))
                            .unwrap_or(&e)
                            .to_string()),
                        is_ca: false,
                        not_after: 0,
                    }),
                }
            }
            out.insert(name.clone(), facts);
        }
        out
    }

    /// The backend that signs this domain's certificates.
    pub fn domain_backend<'a>(&'a self, domain: &'a DomainPolicy) -> &'a str {
        domain
            .backend
            .as_deref()
            .unwrap_or_else(|| self.default_backend())
    }

    /// The default backend: `server.tls_backend`, or the only one.
    pub fn default_backend(&self) -> &str {
        self.server
            .tls_backend
            .as_deref()
            .or_else(|| self.backends.keys().next().map(String::as_str))
            .unwrap_or("")
    }

    /// The control socket's path: `server.admin_socket`, else `admin.sock` beside the store.
    pub fn admin_socket_path(&self) -> PathBuf {
        match &self.server.admin_socket {
            Some(p) => p.clone(),
            None => self
                .storage
                .path
                .parent()
                .unwrap_or(Path::new("."))
                .join("admin.sock"),
        }
    }

    /// The public URL without a trailing slash.
    pub fn public_base(&self) -> &str {
        self.server.public_url.trim_end_matches('/')
    }

    /// A content hash of the policy part of the configuration (domains, issuers, backends)
    /// and of every file it reads (trust anchors, CRL files, token issuers' keys, backend
    /// certificates), recorded in every audit record so each decision ties to the exact
    /// policy that made it: swapping a file's content changes the hash as an edit would.
    pub fn policy_hash(&self) -> String {
        let v = serde_json::json!({
            "ecs_id": self.ecs_id,
            "domains": self.domains,
            "token_issuers": self.token_issuers,
            "backends": self.backends,
            "files": self.policy_file_digests(),
        });
        ecs_ca_backends::sha256_hex(v.to_string().as_bytes())
    }

    /// Every file the policy reads, with the SHA-256 of its content (or why it could not be
    /// read, which is then part of the hash too).
    fn policy_file_digests(&self) -> BTreeMap<String, String> {
        let mut paths: Vec<PathBuf> = Vec::new();
        for d in self.domains.values() {
            if let Some(tp) = &d.third_party {
                paths.extend(tp.trust_anchors.iter().map(PathBuf::from));
                paths.extend(
                    tp.crls
                        .iter()
                        .filter(|c| !c.contains("://"))
                        .map(PathBuf::from),
                );
            }
        }
        for i in self.token_issuers.values() {
            paths.extend(
                i.jwks
                    .iter()
                    .chain(i.jwks_ca.iter())
                    .chain(&i.keys)
                    .cloned(),
            );
        }
        for b in self.backends.values() {
            match b {
                BackendConfig::Software { cert, .. } | BackendConfig::Pkcs11 { cert, .. } => {
                    paths.push(cert.clone())
                }
                BackendConfig::Cfssl { cert, tls_ca, .. } => {
                    paths.extend(std::iter::once(cert).chain(tls_ca.iter()).cloned())
                }
            }
        }
        paths
            .into_iter()
            .map(|p| {
                let digest = match crate::files::read(&p) {
                    Ok(bytes) => ecs_ca_backends::sha256_hex(&bytes),
                    Err(e) => format!("unreadable: {e}"),
                };
                (p.display().to_string(), digest)
            })
            .collect()
    }
}

/// The host of an `https://host[:port][/...]` URL.
pub fn url_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?.to_string()
    } else {
        authority.split(':').next()?.to_string()
    };
    (!host.is_empty()).then_some(host)
}

/// `file:line:col: message (in `the line`)`, the way compilers name a place.
fn toml_error(file: &str, text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            let line_text = text.lines().nth(line - 1).unwrap_or("").trim();
            format!(
                "{file}:{line}:{col}: {} (in `{line_text}`)",
                one_line(e.message())
            )
        }
        None => format!("{file}: {}", one_line(e.message())),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The list-valued keys present in the file, so that `ECS__DOMAINS__X__EES_IDS=a,b` parses
/// as a list.
fn list_keys(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(v) = text.parse::<toml::Table>()
        && let Some(toml::Value::Table(domains)) = v.get("domains")
    {
        for name in domains.keys() {
            for k in ["token_issuers", "ees_ids", "key_types"] {
                out.push(format!("domains.{name}.{k}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
ecs_id = "ecs.mno.example"
[server]
listen = "127.0.0.1:8443"
public_url = "https://127.0.0.1:8443"
admin_listen = "127.0.0.1:9443"
[storage]
kind = "sqlite"
path = "data/ecs.db"
[backends.soft]
kind = "software"
key = "keys/issuing-ca.key"
cert = "keys/issuing-ca.pem"
[token_issuers.ecsp-a-as]
issuer = "https://as.ecsp-a.example"
jwks = "keys/ecsp-a.jwks.json"
[domains.ecsp-a]
token_issuers = ["ecsp-a-as"]
ees_ids = ["*.ecsp-a.example"]
cert_validity = "30d"
max_registration = "365d"
key_types = ["p256", "p384", "ed25519", "rsa3072", "rsa4096"]
secret_token = "on_request"
"#;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ecs.toml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn the_contract_example_loads_with_paths_resolved() {
        let (dir, p) = write(SAMPLE);
        let (cfg, _) = Config::load_with_env(&p, HashMap::new()).unwrap();
        assert_eq!(cfg.storage.path, dir.path().join("data/ecs.db"));
        assert_eq!(cfg.storage.kind, StorageKind::Sqlite);
        assert_eq!(cfg.domain_backend(&cfg.domains["ecsp-a"]), "soft");
    }

    #[test]
    fn environment_overrides_the_file() {
        let (_dir, p) = write(SAMPLE);
        let env = HashMap::from([
            (
                "ECS__SERVER__LISTEN".to_string(),
                "127.0.0.1:9999".to_string(),
            ),
            (
                "ECS__DOMAINS__ECSP-A__EES_IDS".to_string(),
                "a.example,b.example".to_string(),
            ),
        ]);
        let (cfg, _) = Config::load_with_env(&p, env).unwrap();
        assert_eq!(cfg.server.listen, "127.0.0.1:9999");
        assert_eq!(cfg.domains["ecsp-a"].ees_ids, ["a.example", "b.example"]);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_line() {
        let cases = [
            (
                "[server]\nlisten",
                "[server]\nlistn = \"x\"\nlisten",
                "listn",
            ),
            (
                "cert_validity = \"30d\"",
                "cert_validity = \"30 days\"",
                "ecs.toml:20:17",
            ),
            (
                "secret_token = \"on_request\"",
                "secret_token = \"sometimes\"",
                "sometimes",
            ),
            ("kind = \"software\"", "kind = \"softwar\"", "softwar"),
        ];
        for (from, to, expect) in cases {
            let (_dir, p) = write(&SAMPLE.replacen(from, to, 1));
            let err = Config::load_with_env(&p, HashMap::new()).unwrap_err().0;
            assert!(err.contains(expect), "{err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        let (_dir, p) = write(SAMPLE);
        let env = HashMap::from([("ECS__SERVER__NOPE".to_string(), "1".to_string())]);
        let err = Config::load_with_env(&p, env).unwrap_err().0;
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn references_are_checked() {
        let (_dir, p) = write(&SAMPLE.replace(
            "token_issuers = [\"ecsp-a-as\"]",
            "token_issuers = [\"nobody\"]",
        ));
        let err = Config::load_with_env(&p, HashMap::new()).unwrap_err().0;
        assert!(err.contains("domains.ecsp-a.token_issuers"), "{err}");
    }
}
