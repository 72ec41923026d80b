//! The EES-facing TLS profile (`contract/api.md` §1, TS 33.210 §6.2): TLS 1.2 with ECDHE and
//! AEAD suites only, TLS 1.3, groups x25519/secp256r1/secp384r1, ALPN `h2` and `http/1.1`,
//! and an optional client certificate whose *trust* is decided per route, not here.

use crate::app::App;
use crate::clock::now;
use crate::config::url_host;
use ecs_ca_backends::{CertTemplate, KeySigner, SanEntry, SoftwareKey, generate_p256_pkcs8_pem};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, aws_lc_rs as provider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use std::sync::Arc;

/// The crypto provider restricted to the profile's suites and groups, in the server's order
/// of preference. AES-128-GCM with SHA-256 comes first, as in Go's and BoringSSL's servers:
/// the key exchange (X25519, P-256) and the P-256 signatures give 128-bit security, which
/// AES-256 does not raise, and SHA-256 runs on the CPU's SHA instructions where SHA-384 has
/// none (SHA-384 was 4 % of the CPU of a registration on a new connection). A client that
/// offers only AES-256 or ChaCha20 still gets it.
pub fn profile_provider() -> CryptoProvider {
    use provider::cipher_suite as cs;
    CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        kx_groups: vec![
            provider::kx_group::X25519,
            provider::kx_group::SECP256R1,
            provider::kx_group::SECP384R1,
        ],
        ..provider::default_provider()
    }
}

/// Accepts any client certificate chain whose handshake signature verifies and whose
/// links (each certificate signed by the next one presented) hold. Whether the chain is
/// *trusted* is the route's decision: the ECS-issued path binds the certificate by
/// fingerprint, the third-party path asks the domain policy.
#[derive(Debug)]
struct ClientChainVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for ClientChainVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        use der::Decode;
        x509_cert::Certificate::from_der(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        let chain: Vec<&[u8]> = std::iter::once(end_entity.as_ref())
            .chain(intermediates.iter().map(|c| c.as_ref()))
            .collect();
        for pair in chain.windows(2) {
            ecs_ca_backends::verify_cert_signed_by(pair[0], pair[1]).map_err(|_| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature)
            })?;
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The server's certificate chain and key.
pub struct ServerIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// Loads `server.tls_cert`/`tls_key`, or issues a server certificate with the default
/// backend for a key made now (kept in memory only).
pub async fn server_identity(app: &App) -> Result<ServerIdentity, String> {
    let cfg = &app.cfg;
    if let (Some(cert), Some(key)) = (&cfg.server.tls_cert, &cfg.server.tls_key) {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("server.tls_cert: {}: {e}", cert.display()))?;
        if chain.is_empty() {
            return Err(format!(
                "server.tls_cert: {}: no certificate",
                cert.display()
            ));
        }
        crate::secrets::check_private(key, "server.tls_key")?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| format!("server.tls_key: {}: {e}", key.display()))?;
        return Ok(ServerIdentity { chain, key });
    }
    let key_pem = generate_p256_pkcs8_pem().map_err(|e| e.to_string())?;
    let key = SoftwareKey::from_pkcs8_pem(&key_pem).map_err(|e| e.to_string())?;
    let host = url_host(&cfg.server.public_url).unwrap_or_else(|| "localhost".into());
    let mut sans = Vec::new();
    let mut add = |s: SanEntry| {
        if !sans.contains(&s) {
            sans.push(s)
        }
    };
    // Only names that are valid in a dNSName (pkilint refuses e.g. "localhost").
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => add(SanEntry::Ip(ip)),
        Err(_) => add(SanEntry::Dns(host.to_ascii_lowercase())),
    }
    if ecs_policy::is_fqdn(&cfg.ecs_id) {
        add(SanEntry::Dns(cfg.ecs_id.to_ascii_lowercase()));
    }
    add(SanEntry::Ip(std::net::Ipv4Addr::LOCALHOST.into()));
    let backend = app.default_backend();
    let template = CertTemplate {
        common_name: cfg.ecs_id.clone(),
        organization: None,
        sans,
        spki_der: key.public_key_der().to_vec(),
        now: now(),
        validity_secs: cfg.server.tls_cert_validity.as_secs(),
        client_auth: false,
        server_auth: true,
        crl_url: backend.crl_url.clone(),
        csr_pem: None,
    };
    let issuer = backend.issuer.clone();
    let issued = backend
        .off_reactor(move || issuer.issue(&template))
        .await
        .map_err(|e| e.detail)?
        .map_err(|e| format!("issuing the server certificate: {e}"))?;
    let mut chain = vec![CertificateDer::from(issued.der)];
    // Everything but the root, which clients must already trust.
    let ca_chain = backend.issuer.chain_der();
    for c in &ca_chain[..ca_chain.len().saturating_sub(1)] {
        chain.push(CertificateDer::from(c.clone()));
    }
    tracing::info!(
        host = %host,
        not_after = %crate::clock::format_time(issued.not_after),
        "issued the server certificate with backend {}",
        backend.name
    );
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| e.to_string())?;
    Ok(ServerIdentity { chain, key })
}

impl ServerIdentity {
    /// When the leaf certificate expires (Unix seconds).
    pub fn not_after(&self) -> Option<i64> {
        let leaf = self.chain.first()?;
        ecs_ca_backends::chain::leaf_facts(leaf)
            .ok()
            .map(|f| f.not_after)
    }
}

/// The server certificate every new handshake presents, replaceable while the daemon runs
/// (renewed before it expires, or re-read from `tls_cert`/`tls_key` on reload); handshakes
/// already made keep theirs.
#[derive(Debug)]
pub struct ServerCertificate {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl ServerCertificate {
    pub fn new(id: ServerIdentity) -> Result<Self, String> {
        Ok(ServerCertificate {
            current: std::sync::RwLock::new(Arc::new(certified(id)?)),
        })
    }

    /// Presents `id` from the next handshake on; refused (and the current one kept) when
    /// its key does not match its certificate.
    pub fn replace(&self, id: ServerIdentity) -> Result<(), String> {
        let new = Arc::new(certified(id)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = new;
        Ok(())
    }
}

fn certified(id: ServerIdentity) -> Result<rustls::sign::CertifiedKey, String> {
    rustls::sign::CertifiedKey::from_der(id.chain, id.key, &profile_provider())
        .map_err(|e| format!("server certificate: {e}"))
}

impl rustls::server::ResolvesServerCert for ServerCertificate {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// The rustls server configuration of the EES-facing listener.
pub fn server_config(cert: Arc<ServerCertificate>) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(profile_provider());
    let verifier = Arc::new(ClientChainVerifier {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // The suite is chosen by the order above, not by the client's (most clients list
    // AES-256 first).
    config.ignore_client_order = true;
    // An EES that reconnects resumes with a ticket instead of a full handshake (two
    // public-key operations saved on each side). Tickets are sealed with a key held only in
    // memory and rotated every 6 hours, so any number of EESs can resume without the
    // server keeping a session each; a ticket from before a restart, or from another
    // replica, falls back to a full handshake. Resumption keeps the client certificate of
    // the first handshake, which every request checks again anyway. No 0-RTT data.
    config.ticketer = provider::Ticketer::new().map_err(|e| format!("TLS tickets: {e}"))?;
    Ok(Arc::new(config))
}
