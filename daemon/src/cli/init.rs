//! `ecsd init --dir DIR`: a complete, working configuration for one machine.

use crate::token::jwks_for_private_key;
use ecs_ca_backends::{
    CaParams, KeySigner, LocalIssuer, SoftwareKey, der_to_pem, generate_p256_pkcs8_pem,
    make_ca_certificate, now_unix,
};
use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

/// Where `ecsd init` listens by default.
pub struct InitOptions {
    pub listen: String,
    pub public_url: String,
    pub admin_listen: String,
    pub ecs_id: String,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            listen: "127.0.0.1:8443".into(),
            public_url: "https://127.0.0.1:8443".into(),
            admin_listen: "127.0.0.1:9443".into(),
            ecs_id: "ecs.mno.example".into(),
        }
    }
}

fn write_file(path: &Path, data: &[u8], secret: bool) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes `DIR/ecs.toml` and the material it names. Refuses to overwrite a configuration
/// (a usage error: the `--dir` given is at fault).
pub fn init(dir: &Path, opts: &InitOptions) -> Result<(), super::Fail> {
    let config = dir.join("ecs.toml");
    if config.exists() {
        return Err(super::usage(format!(
            "--dir {}: a configuration already exists; init never overwrites one",
            dir.display()
        )));
    }
    write_all(dir, opts).map_err(super::other)
}

fn write_all(dir: &Path, opts: &InitOptions) -> Result<(), String> {
    fs::create_dir_all(dir.join("keys")).map_err(|e| format!("{}: {e}", dir.display()))?;
    let now = now_unix();
    let e = |e: ecs_ca_backends::Error| e.to_string();

    // A root that signs the issuing CA and is then forgotten: only its certificate stays.
    let root_key =
        SoftwareKey::from_pkcs8_pem(&generate_p256_pkcs8_pem().map_err(e)?).map_err(e)?;
    let root = make_ca_certificate(
        &root_key,
        &CaParams {
            subject: format!("CN=ECS Development Root CA,O={}", opts.ecs_id),
            spki_der: root_key.public_key_der().to_vec(),
            not_before: now - 3600,
            not_after: now + 10 * 365 * 86_400,
            path_len: Some(1),
            crl_url: None,
            serial: None,
        },
    )
    .map_err(e)?;
    let root_issuer = LocalIssuer::new(Arc::new(root_key), vec![root.der.clone()]).map_err(e)?;
    let ca_key_pem = generate_p256_pkcs8_pem().map_err(e)?;
    let ca_key = SoftwareKey::from_pkcs8_pem(&ca_key_pem).map_err(e)?;
    let ca = root_issuer
        .issue_ca(&CaParams {
            subject: format!("CN=ECS Issuing CA,O={}", opts.ecs_id),
            spki_der: ca_key.public_key_der().to_vec(),
            not_before: now - 3600,
            not_after: now + 5 * 365 * 86_400,
            path_len: Some(0),
            crl_url: None,
            serial: None,
        })
        .map_err(e)?;
    let root_pem = der_to_pem(&root.der, "CERTIFICATE");
    let chain_pem = format!("{}{}", der_to_pem(&ca.der, "CERTIFICATE"), root_pem);
    write_file(&dir.join("root.pem"), root_pem.as_bytes(), false)?;
    write_file(
        &dir.join("keys/issuing-ca.key"),
        ca_key_pem.as_bytes(),
        true,
    )?;
    write_file(
        &dir.join("keys/issuing-ca.pem"),
        chain_pem.as_bytes(),
        false,
    )?;

    let token_key = generate_p256_pkcs8_pem().map_err(e)?;
    let jwks = jwks_for_private_key(token_key.as_bytes(), "dev-1")?;
    write_file(
        &dir.join("keys/dev-token-issuer.key"),
        token_key.as_bytes(),
        true,
    )?;
    write_file(
        &dir.join("keys/dev-token-issuer.jwks.json"),
        jwks.as_bytes(),
        false,
    )?;

    let audit_key = generate_p256_pkcs8_pem().map_err(e)?;
    write_file(
        &dir.join("keys/audit-checkpoint.key"),
        audit_key.as_bytes(),
        true,
    )?;

    let text = format!(
        r#"# ecsd configuration, written by `ecsd init`.
# Reference: docs/operations.md. Every key can be overridden from the environment as
# ECS__SECTION__KEY (e.g. ECS__SERVER__LISTEN=0.0.0.0:8443). Relative paths are relative
# to this file's folder.

# The ECS's identifier: the audience ("aud") every onboarding token must name.
ecs_id = "{ecs_id}"

[server]
# The EES-facing HTTPS listener (TLS 1.2/1.3, HTTP/2 and HTTP/1.1).
listen = "{listen}"
# Base of Location headers and of the CRL URL written into certificates.
public_url = "{public_url}"
# No tls_cert/tls_key: a server certificate is issued at each start by the backend below.
tls_backend = "soft"
# /healthz, /readyz, /metrics and the admin API (plain HTTP: keep it on loopback).
admin_listen = "{admin_listen}"

[storage]
# The embedded engine: one SQLite database file (its WAL beside it). For several replicas
# use kind = "postgres"; stores made with kind = "sled" still open with that kind.
kind = "sqlite"
path = "data/ecs.db"

# The issuing CA, a software key under a development root (root.pem, whose key was
# discarded after signing). For production keys, use a pkcs11 backend.
[backends.soft]
kind = "software"
key = "keys/issuing-ca.key"
cert = "keys/issuing-ca.pem"

# A development token issuer. `ecsd token mint` signs onboarding tokens with its private
# key; a production ECSP names its OAuth authorization server here (jwks or jwks_url) and
# never gives the ECS a private key.
[token_issuers.dev]
issuer = "https://dev-issuer.{ecs_id}"
jwks = "keys/dev-token-issuer.jwks.json"
private_key = "keys/dev-token-issuer.key"
kid = "dev-1"

# Signed checkpoints of the audit log's hash chain, kept outside the store, so that records
# cut from the end of the log are detected by `ecsd audit verify`. The key signs nothing else.
[audit]
checkpoint_interval = "1m"
checkpoint_key = "keys/audit-checkpoint.key"
checkpoint_log = "audit-checkpoints.jsonl"

# The policy for EES profiles without provId: any EES ID, onboarded by the dev issuer.
[domains.default]
token_issuers = ["dev"]
ees_ids = ["*"]
backend = "soft"
cert_validity = "30d"
max_registration = "365d"
key_types = ["p256", "p384", "ed25519", "rsa3072", "rsa4096"]
secret_token = "on_request"
"#,
        ecs_id = opts.ecs_id,
        listen = opts.listen,
        public_url = opts.public_url,
        admin_listen = opts.admin_listen,
    );
    write_file(&dir.join("ecs.toml"), text.as_bytes(), false)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn init_writes_a_configuration_that_loads_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        assert!(init(dir.path(), &InitOptions::default()).is_ok());
        let (cfg, warnings) =
            Config::load_with_env(&dir.path().join("ecs.toml"), Default::default()).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(cfg.domains["default"].ees_ids, ["*"]);
        let Err(crate::cli::Fail(code, err)) = init(dir.path(), &InitOptions::default()) else {
            panic!("init overwrote a configuration");
        };
        assert_eq!(code, 2, "a usage error");
        assert!(err.contains("already exists"), "{err}");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("keys/issuing-ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "private keys are not readable by others");
    }
}
