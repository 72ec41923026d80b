//! `[backends.*]`: the signing backends (software key, PKCS#11, external CA), each loaded
//! once at start into an issuer, and the CRL each publishes.

use crate::clock::now;
use crate::config::{BackendConfig, Config};
use crate::lane::Lane;
use crate::store::Store;
use ecs_ca_backends::{
    CertIssuer, LocalIssuer, RevokedEntry, SoftwareKey, der_to_pem, pem_chain_to_der,
};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A CRL as signed, kept until it is half-way to its `nextUpdate` or a revocation happens.
struct CachedCrl {
    der: Arc<Vec<u8>>,
    this_update: i64,
    /// How many revoked certificates it lists.
    revoked: u64,
}

/// A configured signing backend with the issuer over it.
pub struct Backend {
    pub name: String,
    pub issuer: Arc<dyn CertIssuer>,
    /// Where this backend's CRL is published (put in every certificate it issues); none for
    /// an external CA, which publishes its own.
    pub crl_url: Option<String>,
    /// The chain as PEM, issuing CA first: encoded once, sent with every certificate.
    chain_pem: Vec<String>,
    crl: tokio::sync::Mutex<Option<CachedCrl>>,
    /// The threads that wait for this backend's signatures, when they are made here.
    lane: Option<Lane>,
}

/// Where a backend's signatures are made, which decides the threads that wait for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigningPlace {
    /// In this process or an HSM session, at most this many at once: a [`Lane`] of as many
    /// threads.
    Here(usize),
    /// At an external CA over the network: a thread of tokio's blocking pool per request in
    /// flight, since most of its time is waiting.
    Remote,
}

impl Backend {
    /// The chain as PEM, issuing CA first.
    pub fn chain_pem(&self) -> &[String] {
        &self.chain_pem
    }

    /// Runs `f`, which signs with this backend and may block, off the reactor: on the
    /// backend's lane, or on the blocking pool for a remote CA.
    pub async fn off_reactor<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, crate::problem::ApiError> {
        match &self.lane {
            Some(lane) => lane
                .run(f)
                .await
                .map_err(crate::problem::ApiError::internal),
            None => tokio::task::spawn_blocking(f)
                .await
                .map_err(crate::problem::ApiError::internal),
        }
    }

    /// Forgets the cached CRL, so the next request signs a new one.
    pub async fn invalidate_crl(&self) {
        *self.crl.lock().await = None;
    }

    /// The current CRL and its nextUpdate: cached, or freshly signed with the next CRL
    /// number once half its validity has passed.
    pub async fn crl(
        &self,
        store: &Arc<dyn Store>,
        validity: i64,
    ) -> Result<(Arc<Vec<u8>>, i64), crate::problem::ApiError> {
        let mut cache = self.crl.lock().await;
        let now = now();
        // A store that other replicas write too: a revocation made through any of them
        // shows in the count, and the cached CRL no longer stands. (This process's own
        // revocations invalidate the cache directly.)
        let revoked_now = if store.shared() {
            Some(store.revoked_count(&self.name).await?)
        } else {
            None
        };
        if let Some(c) = cache.as_ref()
            && now < c.this_update + validity / 2
            && revoked_now.is_none_or(|n| n == c.revoked)
        {
            return Ok((c.der.clone(), c.this_update + validity));
        }
        let revoked: Vec<RevokedEntry> = store
            .revoked(&self.name)
            .await?
            .into_iter()
            .map(|(serial_hex, r)| RevokedEntry {
                serial_hex,
                revoked_at: r.at,
                reason: r.reason,
            })
            .collect();
        let listed = revoked.len() as u64;
        let number = store.next_crl_number(&self.name).await?;
        let issuer = self.issuer.clone();
        let der = self
            .off_reactor(move || {
                issuer
                    .sign_crl(number, now, now + validity, &revoked)
                    .map_err(crate::problem::ApiError::from)
            })
            .await??;
        let der = Arc::new(der);
        *cache = Some(CachedCrl {
            der: der.clone(),
            this_update: now,
            revoked: listed,
        });
        Ok((der, now + validity))
    }
}

/// The loaded backends by name.
pub type Backends = BTreeMap<String, Arc<Backend>>;

/// Every `[backends.*]`, loaded and checked (each key against its certificate), with the
/// CRL URL each puts into the certificates it issues; and their CA chains as one PEM bundle
/// (what the daemon trusts when it fetches CRLs). The one factory of signing backends: a new
/// kind is one file in `ecs-ca-backends` and one arm of [`load_backend`].
pub fn load_all(cfg: &Config) -> Result<(Backends, Vec<u8>), String> {
    load_all_keeping(cfg, None)
}

/// [`load_all`] on a reload: a backend whose section is unchanged in `cfg` is kept as it
/// runs in `running` (its key, HSM session and cached CRL), the others are loaded.
pub fn load_all_keeping(
    cfg: &Config,
    running: Option<(&Config, &Backends)>,
) -> Result<(Backends, Vec<u8>), String> {
    let mut backends = BTreeMap::new();
    let mut roots = Vec::new();
    let base = cfg.source.parent().unwrap_or(std::path::Path::new("."));
    for (name, b) in &cfg.backends {
        let kept = running.and_then(|(old_cfg, old)| {
            let same = old_cfg
                .backends
                .get(name)
                .is_some_and(|ob| serde_json::to_value(ob).ok() == serde_json::to_value(b).ok());
            same.then(|| old.get(name).cloned()).flatten()
        });
        if let Some(backend) = kept {
            for d in backend.issuer.chain_der() {
                roots.extend_from_slice(der_to_pem(d, "CERTIFICATE").as_bytes());
            }
            backends.insert(name.clone(), backend);
            continue;
        }
        let (issuer, place) = load_backend(name, b, base)?;
        let lane = match place {
            SigningPlace::Here(threads) => Some(
                Lane::new(&format!("sign-{name}"), threads)
                    .map_err(|e| format!("backends.{name}: signing threads: {e}"))?,
            ),
            SigningPlace::Remote => None,
        };
        for d in issuer.chain_der() {
            roots.extend_from_slice(der_to_pem(d, "CERTIFICATE").as_bytes());
        }
        let crl_url = if !issuer.revocation_published() {
            None
        } else if name == cfg.default_backend() {
            Some(format!("{}/pki/v1/crl", cfg.public_base()))
        } else {
            Some(format!("{}/pki/v1/crl/{name}", cfg.public_base()))
        };
        backends.insert(
            name.clone(),
            Arc::new(Backend {
                name: name.clone(),
                chain_pem: issuer
                    .chain_der()
                    .iter()
                    .map(|d| der_to_pem(d, "CERTIFICATE"))
                    .collect(),
                issuer,
                crl_url,
                crl: tokio::sync::Mutex::new(None),
                lane,
            }),
        );
    }
    Ok((backends, roots))
}

pub fn load_backend(
    name: &str,
    b: &BackendConfig,
    base: &std::path::Path,
) -> Result<(Arc<dyn CertIssuer>, SigningPlace), String> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    match b {
        BackendConfig::Software {
            key,
            cert,
            rsa_signature,
        } => {
            crate::secrets::check_private(key, &format!("backends.{name}.key"))?;
            let key_pem = zeroize::Zeroizing::new(
                crate::files::read_to_string(key)
                    .map_err(|e| format!("backends.{name}.key: {}: {e}", key.display()))?,
            );
            let mut signer = SoftwareKey::from_pkcs8_pem(&key_pem)
                .map_err(|e| format!("backends.{name}.key: {}: {e}", key.display()))?;
            if *rsa_signature == crate::config::RsaSignature::Pss {
                signer = signer
                    .with_rsa_pss()
                    .map_err(|e| format!("backends.{name}.rsa_signature: {e}"))?;
            }
            let chain = read_chain(name, cert)?;
            let issuer = LocalIssuer::new(Arc::new(signer), chain)
                .map_err(|e| format!("backends.{name}: {e}"))?;
            // Pure CPU: more threads than cores would only take turns.
            Ok((Arc::new(issuer), SigningPlace::Here(cores)))
        }
        BackendConfig::Pkcs11 {
            module,
            key,
            pin,
            cert,
            max_sessions,
            rsa_signature,
        } => {
            use ecs_ca_backends::pkcs11::{Pkcs11Config, Pkcs11Key, Pkcs11Uri};
            let uri = Pkcs11Uri::parse(key).map_err(|e| format!("backends.{name}.key: {e}"))?;
            let module = module
                .clone()
                .or_else(|| uri.module_path.clone())
                .ok_or_else(|| format!("backends.{name}.module: missing"))?;
            let pin = crate::secrets::resolve(pin, &format!("backends.{name}.pin"), base)?;
            let chain = read_chain(name, cert)?;
            let expected_spki = {
                use der::{Decode, Encode};
                x509_cert::Certificate::from_der(&chain[0])
                    .and_then(|c| c.tbs_certificate().subject_public_key_info().to_der())
                    .map_err(|e| format!("backends.{name}.cert: {}: {e}", cert.display()))?
            };
            let sessions = max_sessions.unwrap_or(2 * cores);
            let signer = Pkcs11Key::open(Pkcs11Config {
                name: name.to_string(),
                module,
                uri,
                pin: pin.as_str().into(),
                max_sessions: sessions,
                rsa_pss: *rsa_signature == crate::config::RsaSignature::Pss,
                expected_spki,
            })
            .map_err(|e| format!("backends.{name}: {e}"))?;
            let issuer = LocalIssuer::new(Arc::new(signer), chain)
                .map_err(|e| format!("backends.{name}: {e}"))?;
            // One thread per session: as many signatures at once as the token serves.
            Ok((Arc::new(issuer), SigningPlace::Here(sessions)))
        }
        BackendConfig::Cfssl {
            url,
            profile,
            auth_key,
            cert,
            tls_ca,
            connect_timeout,
            timeout,
            not_honoured,
        } => {
            use ecs_ca_backends::cfssl::{CfsslConfig, CfsslIssuer, NotHonoured};
            let auth_key = match auth_key {
                Some(spec) => {
                    let key = format!("backends.{name}.auth_key");
                    let text = crate::secrets::resolve(spec, &key, base)?;
                    let bytes = hex::decode(text.trim()).map_err(|_| format!("{key}: not hex"))?;
                    Some(zeroize::Zeroizing::new(bytes))
                }
                None => None,
            };
            let tls_roots_der = match tls_ca {
                Some(p) => read_chain(name, p)?,
                None => Vec::new(),
            };
            let issuer = CfsslIssuer::new(CfsslConfig {
                name: name.to_string(),
                url: url.clone(),
                profile: profile.clone(),
                auth_key,
                chain_der: read_chain(name, cert)?,
                tls_roots_der,
                connect_timeout: std::time::Duration::from_secs(connect_timeout.as_secs()),
                total_timeout: std::time::Duration::from_secs(timeout.as_secs()),
                not_honoured: not_honoured
                    .iter()
                    .filter_map(|n| NotHonoured::parse(n))
                    .collect(),
            })
            .map_err(|e| format!("backends.{name}.{e}"))?;
            Ok((Arc::new(issuer), SigningPlace::Remote))
        }
    }
}

fn read_chain(name: &str, cert: &std::path::Path) -> Result<Vec<Vec<u8>>, String> {
    let cert_pem = crate::files::read_to_string(cert)
        .map_err(|e| format!("backends.{name}.cert: {}: {e}", cert.display()))?;
    pem_chain_to_der(&cert_pem)
        .map_err(|e| format!("backends.{name}.cert: {}: {e}", cert.display()))
}
