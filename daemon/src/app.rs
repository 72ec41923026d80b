//! The running ECS: configuration, store, token verifier, signing backends and the CRL cache,
//! built once at start and shared by every connection.

use crate::config::{BackendConfig, Config};
use crate::metrics::Metrics;
use crate::problem::ApiError;
use crate::store::Store;
use crate::token::TokenVerifier;
use ecs_ca_backends::{
    CertIssuer, LocalIssuer, RevokedEntry, SoftwareKey, der_to_pem, pem_chain_to_der,
};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

/// Configuration sections as JSON, to compare old and new on a reload.
mod erased_json {
    pub trait Json {
        fn json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap_or_default()
        }
    }
}
use crate::clock::now;

/// A CRL as signed, kept until it is half-way to its `nextUpdate` or a revocation happens.
struct CachedCrl {
    der: Arc<Vec<u8>>,
    this_update: i64,
}

/// A configured signing backend with the issuer over it.
pub struct Backend {
    pub name: String,
    pub issuer: Arc<dyn CertIssuer>,
    /// Where this backend's CRL is published (put in every certificate it issues); none for
    /// an external CA, which publishes its own.
    pub crl_url: Option<String>,
    crl: tokio::sync::Mutex<Option<CachedCrl>>,
}

impl Backend {
    /// The chain as a PEM bundle, issuing CA first.
    pub fn chain_pem(&self) -> Vec<String> {
        self.issuer
            .chain_der()
            .iter()
            .map(|d| der_to_pem(d, "CERTIFICATE"))
            .collect()
    }

    /// Forgets the cached CRL, so the next request signs a new one.
    pub async fn invalidate_crl(&self) {
        *self.crl.lock().await = None;
    }

    /// The current CRL: cached, or freshly signed with the next CRL number.
    pub async fn crl(&self, app: &App) -> Result<Arc<Vec<u8>>, crate::problem::ApiError> {
        let validity = app.cfg.server.crl_validity.as_secs() as i64;
        let mut cache = self.crl.lock().await;
        let now = now();
        if let Some(c) = cache.as_ref()
            && now < c.this_update + validity / 2
        {
            return Ok(c.der.clone());
        }
        let store = app.store.clone();
        let issuer = self.issuer.clone();
        let name = self.name.clone();
        let der = tokio::task::spawn_blocking(move || {
            let revoked: Vec<RevokedEntry> = store
                .revoked(&name)?
                .into_iter()
                .map(|(serial_hex, r)| RevokedEntry {
                    serial_hex,
                    revoked_at: r.at,
                    reason: r.reason,
                })
                .collect();
            let number = store.next_crl_number(&name)?;
            issuer
                .sign_crl(number, now, now + validity, &revoked)
                .map_err(crate::problem::ApiError::from)
        })
        .await
        .map_err(crate::problem::ApiError::internal)??;
        let der = Arc::new(der);
        *cache = Some(CachedCrl {
            der: der.clone(),
            this_update: now,
        });
        Ok(der)
    }
}

/// Back-pressure on signing and storing: a bounded number at work, a bounded number waiting,
/// and an immediate 503 past that instead of unbounded latency and memory.
pub struct SigningQueue {
    admitted: Arc<tokio::sync::Semaphore>,
    working: Arc<tokio::sync::Semaphore>,
}

/// Held while a request signs and stores.
pub struct SigningSlot {
    _admitted: tokio::sync::OwnedSemaphorePermit,
    _working: tokio::sync::OwnedSemaphorePermit,
}

impl SigningQueue {
    fn new(l: &crate::config::LimitsConfig) -> Self {
        SigningQueue {
            admitted: Arc::new(tokio::sync::Semaphore::new(
                l.max_signing_inflight + l.signing_queue,
            )),
            working: Arc::new(tokio::sync::Semaphore::new(l.max_signing_inflight)),
        }
    }

    /// A slot to sign in, after waiting in the queue; `None` when the queue is full.
    pub async fn enter(&self) -> Option<SigningSlot> {
        let admitted = self.admitted.clone().try_acquire_owned().ok()?;
        let working = self.working.clone().acquire_owned().await.ok()?;
        Some(SigningSlot {
            _admitted: admitted,
            _working: working,
        })
    }
}

/// The rate limits of `[limits]` (each `None` when off).
pub struct Limiters {
    pub registrations_per_address: Option<crate::ratelimit::Gcra>,
    pub registrations_per_issuer: Option<crate::ratelimit::Gcra>,
    pub failed_auth_per_address: Option<crate::ratelimit::Gcra>,
}

impl Limiters {
    fn new(l: &crate::config::LimitsConfig) -> Self {
        use crate::ratelimit::Gcra;
        Limiters {
            registrations_per_address: Gcra::new(
                l.registrations_per_minute_per_address,
                l.rate_burst,
            ),
            registrations_per_issuer: Gcra::new(
                l.registrations_per_minute_per_issuer,
                l.rate_burst,
            ),
            failed_auth_per_address: Gcra::new(l.failed_auth_per_minute_per_address, l.rate_burst),
        }
    }
}

/// The part of the configuration that can change without a restart: the ECSP domains and
/// what they trust.
pub struct Policy {
    pub domains: BTreeMap<String, ecs_policy::DomainPolicy>,
    /// Third-party trust of each domain that has a `third_party` section.
    pub third_party: BTreeMap<String, crate::trust::ThirdPartyTrust>,
    /// Content hash of the policy, written into every audit record.
    pub hash: String,
    /// Distinct for every policy loaded by this process: verdicts are cached per generation.
    pub generation: u64,
}

static POLICY_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Verdicts on third-party certificates at authentication, per certificate fingerprint,
/// valid for one (policy generation, CRL epoch) and at most a minute (certificates and CRLs
/// expire with time).
#[derive(Default)]
pub struct VerdictCache {
    entries: Mutex<std::collections::HashMap<String, Verdict>>,
}

/// A verdict, the (policy generation, CRL epoch) it was taken under, and when.
struct Verdict {
    generation: (u64, u64),
    at: i64,
    outcome: Result<(), ApiError>,
}

impl VerdictCache {
    const TTL_SECS: i64 = 60;
    const MAX_ENTRIES: usize = 10_000;

    pub fn get(
        &self,
        fingerprint: &str,
        generation: (u64, u64),
        now: i64,
    ) -> Option<Result<(), ApiError>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(fingerprint) {
            Some(v) if v.generation == generation && v.at <= now && now - v.at < Self::TTL_SECS => {
                Some(v.outcome.clone())
            }
            _ => None,
        }
    }

    pub fn put(
        &self,
        fingerprint: &str,
        generation: (u64, u64),
        now: i64,
        v: Result<(), ApiError>,
    ) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= Self::MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(
            fingerprint.to_string(),
            Verdict {
                generation,
                at: now,
                outcome: v,
            },
        );
    }
}

use crate::trust::ThirdPartyTrust;

impl Policy {
    fn load(cfg: &Config, roots: &[u8]) -> Result<Policy, String> {
        let mut third_party = BTreeMap::new();
        for (name, d) in &cfg.domains {
            if let Some(tp) = &d.third_party {
                third_party.insert(name.clone(), ThirdPartyTrust::load(name, tp, roots)?);
            }
        }
        Ok(Policy {
            domains: cfg.domains.clone(),
            third_party,
            hash: cfg.policy_hash(),
            generation: POLICY_GENERATION.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
        })
    }
}

/// The ECS's own names and addresses: its identifier, the host of its public URL, the
/// addresses it listens on, loopback (which its generated server certificate names), and
/// every name of a configured `server.tls_cert`.
pub fn own_names(cfg: &Config) -> Result<ecs_policy::OwnNames, String> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let mut dns = vec![cfg.ecs_id.clone()];
    let mut ips: Vec<IpAddr> = vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()];
    let mut add = |host: &str, dns: &mut Vec<String>| match host.parse::<IpAddr>() {
        Ok(ip) => ips.push(ip),
        Err(_) => dns.push(host.to_string()),
    };
    if let Some(h) = crate::config::url_host(&cfg.server.public_url) {
        add(&h, &mut dns);
    }
    for listen in std::iter::once(&cfg.server.listen).chain(cfg.server.admin_listen.iter()) {
        if let Ok(a) = listen.parse::<SocketAddr>()
            && !a.ip().is_unspecified()
        {
            add(&a.ip().to_string(), &mut dns);
        }
    }
    if let Some(path) = &cfg.server.tls_cert {
        let pem = crate::files::read_to_string(path)
            .map_err(|e| format!("server.tls_cert: {}: {e}", path.display()))?;
        let chain = pem_chain_to_der(&pem)
            .map_err(|e| format!("server.tls_cert: {}: {e}", path.display()))?;
        if let Some(leaf) = chain.first() {
            let facts = ecs_ca_backends::chain::leaf_facts(leaf)
                .map_err(|e| format!("server.tls_cert: {}: {e}", path.display()))?;
            for name in facts.names() {
                add(&name, &mut dns);
            }
        }
    }
    Ok(ecs_policy::OwnNames::new(dns, ips))
}

/// Everything a request needs.
pub struct App {
    pub cfg: Config,
    pub store: Arc<dyn Store>,
    pub tokens: TokenVerifier,
    pub backends: BTreeMap<String, Arc<Backend>>,
    /// The policy in force: swapped whole by a reload.
    policy: std::sync::RwLock<Arc<Policy>>,
    pub metrics: Metrics,
    /// The backends' CA chains (PEM), trusted for fetching CRLs.
    roots: Vec<u8>,
    pub limiters: Limiters,
    pub signing: SigningQueue,
    /// The ECS's own names and addresses, which no EES certificate may carry.
    pub own_names: ecs_policy::OwnNames,
    /// Third-party certificates re-checked at authentication.
    pub third_party_verdicts: VerdictCache,
    /// Bounds the audit records of identical refusals.
    pub refusals: crate::audit::refusals::RefusalThrottle,
    /// Signs checkpoints of the audit chain (`[audit]`), with the last sequence signed.
    checkpoints: Option<(crate::audit::checkpoint::CheckpointSigner, Mutex<u64>)>,
    /// Token IDs and EES IDs of registrations being created right now, so that two
    /// concurrent requests never both sign a certificate for one token or one EES.
    inflight: Mutex<HashSet<String>>,
    /// One lock per registration being read or changed, so that two changes of one
    /// registration (re-key, patch, delete, expiry) never work from the same stale record.
    registration_locks: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds a registration's lock; forgets the lock when nobody else wants it.
pub struct RegistrationGuard<'a> {
    app: &'a App,
    id: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for RegistrationGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self
            .app
            .registration_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if locks
            .get(&self.id)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            locks.remove(&self.id);
        }
    }
}

/// Releases an in-flight reservation when the request ends, however it ends.
pub struct Reservation<'a> {
    app: &'a App,
    keys: Vec<String>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut set = self.app.inflight.lock().unwrap_or_else(|e| e.into_inner());
        for k in &self.keys {
            set.remove(k);
        }
    }
}

impl App {
    /// Builds the ECS from a loaded configuration: opens the store, loads and checks every
    /// backend's key against its certificate, loads the token issuers' keys.
    pub async fn build(cfg: Config) -> Result<Arc<App>, String> {
        let store = crate::store::open(&cfg.storage).map_err(|e| format!("storage.path: {e}"))?;
        let mut backends = BTreeMap::new();
        let mut roots = Vec::new();
        for (name, b) in &cfg.backends {
            let base = cfg.source.parent().unwrap_or(std::path::Path::new("."));
            let issuer = load_backend(name, b, base)?;
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
                    issuer,
                    crl_url,
                    crl: tokio::sync::Mutex::new(None),
                }),
            );
        }
        let tokens = TokenVerifier::from_config(&cfg).await?;
        let policy = Policy::load(&cfg, &roots)?;
        let limiters = Limiters::new(&cfg.limits);
        let signing = SigningQueue::new(&cfg.limits);
        let own_names = own_names(&cfg)?;
        let checkpoints = match &cfg.audit.checkpoint_key {
            Some(key) => Some((
                crate::audit::checkpoint::CheckpointSigner::load(key, &cfg.audit.checkpoint_log)?,
                Mutex::new(0),
            )),
            None => None,
        };
        Ok(Arc::new(App {
            own_names,
            third_party_verdicts: VerdictCache::default(),
            refusals: crate::audit::refusals::RefusalThrottle::new(),
            checkpoints,
            cfg,
            store,
            tokens,
            backends,
            policy: std::sync::RwLock::new(Arc::new(policy)),
            roots,
            limiters,
            signing,
            metrics: Metrics::new(),
            inflight: Mutex::new(HashSet::new()),
            registration_locks: Mutex::new(std::collections::HashMap::new()),
        }))
    }

    /// Signs a checkpoint of the audit chain when records were added since the last one
    /// (or `always`, at stop). Blocking: call it off the reactor.
    pub fn checkpoint(
        &self,
        always: bool,
    ) -> Result<Option<crate::audit::checkpoint::Checkpoint>, String> {
        let Some((signer, last)) = &self.checkpoints else {
            return Ok(None);
        };
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        // A checkpoint vouches only for records on disk (refusals are flushed in the
        // background): a crash must not leave a checkpoint past the durable log.
        self.store.flush().map_err(|e| e.to_string())?;
        let (seq, head) = self.store.audit_head().map_err(|e| e.to_string())?;
        if seq == *last && !always {
            return Ok(None);
        }
        let time = crate::clock::format_time(now());
        let c = signer.write(seq, &head, &time, &self.policy().hash)?;
        *last = seq;
        tracing::info!(seq, head = %head, "audit checkpoint signed");
        Ok(Some(c))
    }

    pub fn backend(&self, name: &str) -> Option<&Arc<Backend>> {
        self.backends.get(name)
    }

    pub fn default_backend(&self) -> &Arc<Backend> {
        self.backends
            .get(self.cfg.default_backend())
            .expect("validated: the default backend exists")
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the configuration file and swaps in its `[domains]` when it is valid and
    /// nothing else changed. Returns (old hash, new hash); on error the running policy stays.
    pub fn reload_policy(&self) -> Result<(String, String), String> {
        let (new, _) = Config::load(&self.cfg.source).map_err(|e| e.0)?;
        let j = |v: &dyn erased_json::Json| v.json();
        for (section, changed) in [
            ("ecs_id", j(&self.cfg.ecs_id) != j(&new.ecs_id)),
            ("server", j(&self.cfg.server) != j(&new.server)),
            ("storage", j(&self.cfg.storage) != j(&new.storage)),
            ("backends", j(&self.cfg.backends) != j(&new.backends)),
            (
                "token_issuers",
                j(&self.cfg.token_issuers) != j(&new.token_issuers),
            ),
            // Listeners, rate limits and signing slots are built at start.
            ("limits", j(&self.cfg.limits) != j(&new.limits)),
            ("audit", j(&self.cfg.audit) != j(&new.audit)),
        ] {
            if changed {
                return Err(format!(
                    "{}: [{section}] changed; only [domains] change without a restart",
                    self.cfg.source.display()
                ));
            }
        }
        let policy = Policy::load(&new, &self.roots)?;
        let mut slot = self.policy.write().unwrap_or_else(|e| e.into_inner());
        let old = slot.hash.clone();
        let hash = policy.hash.clone();
        *slot = Arc::new(policy);
        Ok((old, hash))
    }

    /// [`App::reload_policy`], with its audit record (accepted with both hashes, or refused
    /// with why).
    pub fn reload_policy_recorded(&self, via: &str) -> Result<(String, String), String> {
        let result = self.reload_policy();
        let event = crate::audit::AuditEvent {
            time: crate::clock::format_time(now()),
            client: via.to_string(),
            action: "policy_reload".into(),
            outcome: if result.is_ok() {
                "accepted"
            } else {
                "refused"
            }
            .into(),
            status: 0,
            detail: Some(match &result {
                Ok((old, new)) => format!("policy {old} replaced by {new}"),
                Err(e) => format!("kept the running policy: {e}"),
            }),
            policy_hash: self.policy().hash.clone(),
            ..Default::default()
        };
        if let Err(e) = self.store.commit(crate::store::Commit {
            audit: Some(event),
            ..Default::default()
        }) {
            tracing::error!(error = %e, "could not record the policy reload");
        }
        match &result {
            Ok((old, new)) => tracing::info!(%old, %new, %via, "policy reloaded"),
            Err(e) => {
                tracing::warn!(error = %e, %via, "policy reload refused; the running policy stays")
            }
        }
        result
    }

    /// Each backend's readiness (probing an HSM that is due for it), off the reactor; also
    /// updates the `ecs_backend_ready` gauge.
    pub async fn backend_readiness(&self) -> Vec<(String, Result<(), String>)> {
        let mut out = Vec::new();
        for (name, b) in &self.backends {
            let issuer = b.issuer.clone();
            let ready = tokio::task::spawn_blocking(move || issuer.ready())
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            self.metrics
                .backend_ready
                .with_label_values(&[name])
                .set(ready.is_ok() as i64);
            out.push((name.clone(), ready));
        }
        out
    }

    /// Waits for, and holds until dropped, the lock of registration `id`.
    pub async fn lock_registration(&self, id: &str) -> RegistrationGuard<'_> {
        let lock = self
            .registration_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone();
        RegistrationGuard {
            app: self,
            id: id.to_string(),
            guard: Some(lock.lock_owned().await),
        }
    }

    /// Reserves `keys` for this request; `Err(key)` names the first one already taken.
    pub fn reserve(&self, keys: Vec<String>) -> Result<Reservation<'_>, String> {
        let mut set = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = keys.iter().find(|k| set.contains(*k)) {
            return Err(k.clone());
        }
        for k in &keys {
            set.insert(k.clone());
        }
        Ok(Reservation { app: self, keys })
    }
}

pub(crate) fn load_backend(
    name: &str,
    b: &BackendConfig,
    base: &std::path::Path,
) -> Result<Arc<dyn CertIssuer>, String> {
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
            Ok(Arc::new(issuer))
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
            let cores = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2);
            let signer = Pkcs11Key::open(Pkcs11Config {
                name: name.to_string(),
                module,
                uri,
                pin: pin.as_str().into(),
                max_sessions: max_sessions.unwrap_or(2 * cores),
                rsa_pss: *rsa_signature == crate::config::RsaSignature::Pss,
                expected_spki,
            })
            .map_err(|e| format!("backends.{name}: {e}"))?;
            let issuer = LocalIssuer::new(Arc::new(signer), chain)
                .map_err(|e| format!("backends.{name}: {e}"))?;
            Ok(Arc::new(issuer))
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
            Ok(Arc::new(issuer))
        }
    }
}

fn read_chain(name: &str, cert: &std::path::Path) -> Result<Vec<Vec<u8>>, String> {
    let cert_pem = crate::files::read_to_string(cert)
        .map_err(|e| format!("backends.{name}.cert: {}: {e}", cert.display()))?;
    pem_chain_to_der(&cert_pem)
        .map_err(|e| format!("backends.{name}.cert: {}: {e}", cert.display()))
}
