//! The running ECS: configuration, store, token verifier, signing backends, the policy in
//! force and the in-process reservations, built once at start and shared by every
//! connection. Shared state only: each piece is built by the room that owns it.

use crate::backends::Backend;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::problem::ApiError;
use crate::store::Store;
use crate::token::TokenVerifier;
use ecs_ca_backends::pem_chain_to_der;
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

/// The loaded signing backends and their CA chains.
pub struct Issuers {
    pub backends: crate::backends::Backends,
    /// The backends' CA chains (PEM), trusted for fetching CRLs.
    pub roots: Vec<u8>,
}

/// Everything a request needs.
pub struct App {
    pub cfg: Config,
    pub store: Arc<dyn Store>,
    pub tokens: TokenVerifier,
    /// The signing backends: swapped whole by a reload that adds, changes or removes one
    /// (an issuing-CA rotation), while requests in flight finish with the set they began
    /// with.
    issuers: std::sync::RwLock<Arc<Issuers>>,
    /// The policy in force: swapped whole by a reload.
    policy: std::sync::RwLock<Arc<Policy>>,
    pub metrics: Metrics,
    pub limiters: Limiters,
    pub signing: SigningQueue,
    /// The ECS's own names and addresses, which no EES certificate may carry.
    pub own_names: ecs_policy::OwnNames,
    /// Third-party certificates re-checked at authentication.
    pub third_party_verdicts: VerdictCache,
    /// Bounds the audit records of identical refusals.
    pub refusals: crate::audit::refusals::RefusalThrottle,
    /// Signs checkpoints of the audit chain (`[audit]`), with the last sequence signed.
    checkpoints: Option<(
        Arc<crate::audit::checkpoint::CheckpointSigner>,
        tokio::sync::Mutex<u64>,
    )>,
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

/// Why `ecsd serve` stopped before it served.
#[derive(Debug)]
pub enum StartError {
    /// The configuration, or a file it names, is at fault (exit status 2).
    Config(String),
    /// Anything else: the store, a port in use, the system (exit status 1).
    Other(String),
}

/// Gives each backend's series their zeros and its issuing CA's expiry.
fn observe(metrics: &Metrics, backends: &crate::backends::Backends) {
    let names: Vec<&str> = backends.keys().map(String::as_str).collect();
    metrics.prime(&names);
    for (name, b) in backends {
        if let Some(ca) = b.issuer.chain_der().first()
            && let Ok(facts) = ecs_ca_backends::chain::leaf_facts(ca)
        {
            metrics
                .ca_not_after
                .with_label_values(&[name])
                .set(facts.not_after);
        }
    }
}

impl App {
    /// Builds the ECS from a loaded configuration: loads and checks every backend's key
    /// against its certificate, loads the token issuers' keys and the policy, and only then
    /// opens the store, so that a configuration at fault leaves nothing behind.
    pub async fn build(cfg: Config) -> Result<Arc<App>, StartError> {
        use StartError::Config as Fault;
        let (backends, roots) = crate::backends::load_all(&cfg).map_err(Fault)?;
        let tokens = TokenVerifier::from_config(&cfg).await.map_err(Fault)?;
        let policy = Policy::load(&cfg, &roots).map_err(Fault)?;
        let limiters = Limiters::new(&cfg.limits);
        let signing = SigningQueue::new(&cfg.limits);
        let own_names = own_names(&cfg).map_err(Fault)?;
        let checkpoints = match &cfg.audit.checkpoint_key {
            Some(key) => Some((
                Arc::new(
                    crate::audit::checkpoint::CheckpointSigner::load(
                        key,
                        &cfg.audit.checkpoint_log,
                    )
                    .map_err(Fault)?,
                ),
                tokio::sync::Mutex::new(0),
            )),
            None => None,
        };
        let metrics = Metrics::new();
        observe(&metrics, &backends);
        let store = crate::store::open(&cfg.storage)
            .await
            .map_err(|e| StartError::Other(format!("{}: {e}", cfg.storage.location_key())))?;
        Ok(Arc::new(App {
            own_names,
            third_party_verdicts: VerdictCache::default(),
            refusals: crate::audit::refusals::RefusalThrottle::new(),
            checkpoints,
            cfg,
            store,
            tokens,
            issuers: std::sync::RwLock::new(Arc::new(Issuers { backends, roots })),
            policy: std::sync::RwLock::new(Arc::new(policy)),
            limiters,
            signing,
            metrics,
            inflight: Mutex::new(HashSet::new()),
            registration_locks: Mutex::new(std::collections::HashMap::new()),
        }))
    }

    /// Signs a checkpoint of the audit chain when records were added since the last one
    /// (or `always`, at stop); the signature and the file write run off the reactor.
    pub async fn checkpoint(
        &self,
        always: bool,
    ) -> Result<Option<crate::audit::checkpoint::Checkpoint>, String> {
        let Some((signer, last)) = &self.checkpoints else {
            return Ok(None);
        };
        let mut last = last.lock().await;
        // A checkpoint vouches only for records on disk (refusals are flushed in the
        // background): a crash must not leave a checkpoint past the durable log.
        self.store.flush().await.map_err(|e| e.to_string())?;
        let (seq, head) = self.store.audit_head().await.map_err(|e| e.to_string())?;
        if seq == *last && !always {
            return Ok(None);
        }
        let time = crate::clock::format_time(now());
        let policy_hash = self.policy().hash.clone();
        let (signer, signed_head) = (signer.clone(), head.clone());
        let c = tokio::task::spawn_blocking(move || {
            signer.write(seq, &signed_head, &time, &policy_hash)
        })
        .await
        .map_err(|e| e.to_string())??;
        *last = seq;
        tracing::info!(seq, head = %head, "audit checkpoint signed");
        Ok(Some(c))
    }

    /// A backend's current CRL (signed again once half its validity has passed), its
    /// nextUpdate kept in `ecs_crl_next_update_seconds`.
    pub async fn crl(&self, b: &Backend) -> Result<Arc<Vec<u8>>, crate::problem::ApiError> {
        let validity = self.cfg.server.crl_validity.as_secs() as i64;
        let (der, next_update) = b.crl(&self.store, validity).await?;
        self.metrics
            .crl_next_update
            .with_label_values(&[&b.name])
            .set(next_update);
        Ok(der)
    }

    /// The signing backends as they are now.
    pub fn issuers(&self) -> Arc<Issuers> {
        self.issuers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn backend(&self, name: &str) -> Option<Arc<Backend>> {
        self.issuers().backends.get(name).cloned()
    }

    /// The default backend (`server.tls_backend`), which a reload never changes.
    pub fn default_backend(&self) -> Arc<Backend> {
        self.backend(self.cfg.default_backend())
            .expect("validated: the default backend exists")
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the configuration file and swaps in its `[domains]` and `[backends]` when
    /// it is valid and nothing else changed. Returns (old hash, new hash); on error the
    /// running policy and backends stay.
    pub fn reload_policy(&self) -> Result<(String, String), String> {
        let (new, _) = Config::load(&self.cfg.source).map_err(|e| e.0)?;
        let j = |v: &dyn erased_json::Json| v.json();
        for (section, changed) in [
            ("ecs_id", j(&self.cfg.ecs_id) != j(&new.ecs_id)),
            ("server", j(&self.cfg.server) != j(&new.server)),
            ("storage", j(&self.cfg.storage) != j(&new.storage)),
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
                    "{}: [{section}] changed; only [domains] and [backends] change without a \
                     restart",
                    self.cfg.source.display()
                ));
            }
        }
        // The server certificate and /pki/v1/crl stay with the backend they started with.
        if new.default_backend() != self.cfg.default_backend() {
            return Err(format!(
                "{}: the default backend would become {:?}: name server.tls_backend = {:?} \
                 to keep it, or restart",
                self.cfg.source.display(),
                new.default_backend(),
                self.cfg.default_backend()
            ));
        }
        let running = self.issuers();
        let issuers = if j(&self.cfg.backends) == j(&new.backends) {
            running.clone()
        } else {
            // Loaded (and each key checked) before anything is swapped; an unchanged
            // backend is the running one.
            let (backends, roots) =
                crate::backends::load_all_keeping(&new, Some((&self.cfg, &running.backends)))?;
            Arc::new(Issuers { backends, roots })
        };
        let policy = Policy::load(&new, &issuers.roots)?;
        if !Arc::ptr_eq(&issuers, &running) {
            observe(&self.metrics, &issuers.backends);
            let added: Vec<&String> = issuers
                .backends
                .keys()
                .filter(|n| !running.backends.contains_key(*n))
                .collect();
            tracing::info!(?added, "signing backends reloaded");
            *self.issuers.write().unwrap_or_else(|e| e.into_inner()) = issuers;
        }
        let mut slot = self.policy.write().unwrap_or_else(|e| e.into_inner());
        let old = slot.hash.clone();
        let hash = policy.hash.clone();
        *slot = Arc::new(policy);
        Ok((old, hash))
    }

    /// [`App::reload_policy`], with its audit record (accepted with both hashes, or refused
    /// with why).
    pub async fn reload_policy_recorded(
        self: &Arc<Self>,
        via: &str,
    ) -> Result<(String, String), String> {
        let app = self.clone();
        let result = tokio::task::spawn_blocking(move || app.reload_policy())
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        let event = crate::audit::AuditEvent {
            time: crate::clock::format_time(now()),
            client: via.to_string(),
            action: crate::audit::Action::PolicyReload,
            outcome: if result.is_ok() {
                crate::audit::Outcome::Accepted
            } else {
                crate::audit::Outcome::Refused
            },
            status: 0,
            detail: Some(match &result {
                Ok((old, new)) => format!("policy {old} replaced by {new}"),
                Err(e) => format!("kept the running policy: {e}"),
            }),
            policy_hash: self.policy().hash.clone(),
            ..Default::default()
        };
        if let Err(e) = self
            .store
            .commit(crate::store::Commit {
                audit: Some(event),
                ..Default::default()
            })
            .await
        {
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
        for (name, b) in &self.issuers().backends {
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
