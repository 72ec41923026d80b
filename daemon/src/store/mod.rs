//! Durable state: registrations, certificates, spent token IDs and the audit log.
//!
//! The pipeline describes each state change as one [`Commit`]; a store applies it atomically
//! (all of it or nothing) and makes it durable before returning, so the HTTP answer is sent
//! only for what survives a crash.
//!
//! This folder is the storage room: the records and the [`Store`] trait here, one file per
//! engine beside it, and [`open`], the one place that turns `[storage]` into a store. No
//! engine type leaves the folder; adding an engine is one file and one arm of [`open`].

pub mod backup;
mod blocking;
mod postgres;
pub mod schema;
mod sled;
mod sqlite;
mod writes;

use self::blocking::OffReactor;
use self::postgres::PostgresStore;
use self::sled::SledStore;
use self::sqlite::SqliteStore;

use crate::audit::{AuditEvent, AuditRecord};
use crate::config::{StorageConfig, StorageKind};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The lifecycle of a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegState {
    Active,
    Deregistered,
    Expired,
}

/// Where a registration's EES certificate comes from (`onboarding.certSource`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CertSource {
    /// Issued by this ECS for the EES's CSR.
    EcsIssued,
    /// A third-party certificate the domain's policy accepted.
    ThirdParty,
}

impl CertSource {
    /// The name on the wire and in records.
    pub fn name(self) -> &'static str {
        match self {
            CertSource::EcsIssued => "ECS_ISSUED",
            CertSource::ThirdParty => "THIRD_PARTY",
        }
    }
}

impl std::fmt::Display for CertSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One EES registration as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistrationRecord {
    pub id: String,
    pub state: RegState,
    pub ees_id: String,
    pub prov_id: Option<String>,
    /// The ECSP domain whose policy governs it.
    pub domain: String,
    /// The backend that issues its certificates.
    pub backend: String,
    /// `eesProf` as the EES sent it (validated).
    pub profile: serde_json::Value,
    /// Expiry, seconds since the epoch.
    pub exp_time: i64,
    pub supp_feat: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    /// `ECS_ISSUED` or `THIRD_PARTY`.
    pub cert_source: CertSource,
    /// Serial (hex) of the certificate that authenticates it now.
    pub current_cert: String,
    /// Every certificate serial ever issued for it, oldest first.
    pub certs: Vec<String>,
    /// SHA-256 of the Secret_token bound to the EES ID, never the token.
    pub secret_token_hash: Option<String>,
    /// Configuration name of the token issuer that onboarded it.
    pub token_issuer: String,
}

/// The backend name under which accepted third-party certificates are recorded.
pub const THIRD_PARTY: &str = "third-party";

/// A certificate the ECS issued (or accepted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertRecord {
    pub serial: String,
    pub registration_id: String,
    pub backend: String,
    /// DER (hex in the records' serialised form: backups and the sled engine).
    #[serde(rename = "der_hex", with = "hex_bytes")]
    pub der: Vec<u8>,
    /// SHA-256 of the DER, hex.
    pub fingerprint: String,
    pub not_before: i64,
    pub not_after: i64,
    pub revoked: Option<Revocation>,
    /// For an accepted third-party certificate: the chain it was accepted with (DER),
    /// intermediates then the trust anchor. Empty for ECS-issued certificates.
    #[serde(
        rename = "chain_hex",
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "hex_bytes::each"
    )]
    pub chain: Vec<Vec<u8>>,
}

/// Bytes as lower-case hex in serialised records, as they always were written.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(not_hex)
    }

    /// A field that is not hex, named so in the damaged line's message.
    fn not_hex<E: Error>(e: hex::FromHexError) -> E {
        E::custom(format!("not hex: {e}"))
    }

    pub mod each {
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(items: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(items.iter().map(hex::encode))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
            Vec::<String>::deserialize(d)?
                .into_iter()
                .map(|h| hex::decode(h).map_err(super::not_hex))
                .collect()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revocation {
    pub at: i64,
    /// Stored by its RFC 5280 name (`superseded`, `cessationOfOperation`, ...).
    pub reason: ecs_ca_backends::RevocationReason,
}

/// A token ID spent by a registration; kept until the token has expired.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpentToken {
    pub iss: String,
    pub jti: String,
    pub exp: i64,
}

/// One atomic change. Applied all or nothing, then flushed.
#[derive(Debug, Default)]
pub struct Commit {
    /// The registration after the change.
    pub registration: Option<RegistrationRecord>,
    /// Creating: refuse if another active registration holds this EES ID.
    pub claim_ees_id: bool,
    /// Changing: the registration must still be active with this current certificate (the
    /// one the request authenticated with), else [`StoreError::Changed`]. Another replica
    /// may have re-keyed or ended it meanwhile; the in-process lock sees only this one.
    pub expect_current: Option<String>,
    pub new_certs: Vec<CertRecord>,
    /// (serial, revocation) of certificates to revoke.
    pub revocations: Vec<(String, Revocation)>,
    pub spend_token: Option<SpentToken>,
    /// (backend, number): a CRL number raised to at least this (a restore), never lowered.
    pub raise_crl_numbers: Vec<(String, u64)>,
    pub audit: Option<AuditEvent>,
}

/// Why a commit was refused or failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the token ID was already used")]
    TokenReplayed,
    #[error("an active registration exists for this EES ID")]
    EesAlreadyRegistered,
    #[error("certificate serial already used")]
    SerialCollision,
    #[error("the registration changed meanwhile (re-keyed or ended through another request)")]
    Changed,
    #[error("storage failure: {0}")]
    Io(String),
    #[error("another ecsd holds the store at {0}: stop it, or use the daemon's control socket")]
    Locked(String),
    #[error("corrupt record {key}: {detail}")]
    Corrupt { key: String, detail: String },
    /// The store cannot be opened as it is (damaged, another engine's, a newer schema).
    #[error("{0}")]
    Unusable(String),
}

/// What the daemon needs from storage. Async, so that no engine blocks the reactor's
/// threads: an engine that talks to a server awaits it, and an embedded engine runs its file
/// I/O on the blocking pool ([`blocking::OffReactor`]).
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    /// Applies `c` atomically and durably; returns the audit record written, if any.
    async fn commit(&self, c: Commit) -> Result<Option<AuditRecord>, StoreError>;
    /// Applies each of `cs` atomically (each all or nothing, in order), then makes them
    /// durable together: bulk loads (`ecsd bench --prefill`, `ecsd store restore`) without
    /// one flush each. Stops at the first refused commit and returns its error.
    async fn commit_all(&self, cs: Vec<Commit>) -> Result<(), StoreError>;
    /// Appends the audit record of a refusal. Not flushed at once: a refusal changes no
    /// state, and its record reaches the disk with the next flush (at most 500 ms later).
    async fn record(&self, event: AuditEvent) -> Result<Option<AuditRecord>, StoreError>;
    async fn registration(&self, id: &str) -> Result<Option<RegistrationRecord>, StoreError>;
    async fn active_registration_for(&self, ees_id: &str) -> Result<Option<String>, StoreError>;
    async fn cert(&self, serial: &str) -> Result<Option<CertRecord>, StoreError>;
    /// The newest third-party certificate record with this fingerprint (one record per
    /// registration it served). Only third-party records are looked up by fingerprint: an
    /// ECS-issued certificate is found by its serial, so that a registration's commit does
    /// not write to an index keyed by a hash.
    async fn third_party_cert_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Option<CertRecord>, StoreError>;
    async fn token_spent(&self, iss: &str, jti: &str) -> Result<bool, StoreError>;
    /// Whether a new registration may claim this token ID and this EES ID, in one call:
    /// see [`judge_claims`].
    async fn check_claims(&self, iss: &str, jti: &str, ees_id: &str) -> Result<(), StoreError>;
    /// The same check as a call that blocks, for an engine that reads local files: onboarding
    /// runs it on the thread that then signs, in one hop off the reactor. `None` for an engine
    /// that reads over the network.
    fn blocking_claims(&self) -> Option<Arc<dyn ClaimsCheck>> {
        None
    }
    /// Active registrations whose `exp_time` is at or before `now`, at most `limit`.
    async fn due_expiries(&self, now: i64, limit: usize) -> Result<Vec<String>, StoreError>;
    /// (serial, revocation) of every revoked certificate of `backend`, for its CRL.
    async fn revoked(&self, backend: &str) -> Result<Vec<(String, Revocation)>, StoreError>;
    /// Forgets spent token IDs whose tokens expired before `before`.
    async fn purge_spent_tokens(&self, before: i64) -> Result<usize, StoreError>;
    /// The next CRL number of `backend` (strictly increasing, durable).
    async fn next_crl_number(&self, backend: &str) -> Result<u64, StoreError>;
    /// Audit records with `seq >= from`, in order, at most `limit`.
    async fn audit_records(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError>;
    /// The hash of the newest audit record.
    async fn audit_head(&self) -> Result<(u64, String), StoreError>;
    async fn counts(&self) -> Result<StoreCounts, StoreError>;
    /// Makes everything written so far durable.
    async fn flush(&self) -> Result<(), StoreError>;
    /// Sends every item of the store to `sink`, as of one moment (a snapshot: commits made
    /// meanwhile are either wholly in it or not at all).
    async fn backup(&self, sink: BackupSink) -> Result<(), StoreError>;
    /// Active registrations with their current certificates, in registration ID order,
    /// starting after `after`, at most `limit`.
    async fn active_registrations(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(RegistrationRecord, CertRecord)>, StoreError>;
    /// Whether other processes write this store too (replicas on one database): then
    /// nothing this process caches about its content (a signed CRL) can be trusted to be
    /// current without asking it.
    fn shared(&self) -> bool {
        false
    }
    /// How many certificates of `backend` are revoked: it only grows, so a CRL signed at
    /// one count is current while the count is the same.
    async fn revoked_count(&self, backend: &str) -> Result<u64, StoreError> {
        Ok(self.revoked(backend).await?.len() as u64)
    }
}

/// One item of a backup: everything a store holds, engine-neutral.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum BackupItem {
    /// A registration (any state) with every certificate issued for it, oldest first.
    Registration {
        registration: RegistrationRecord,
        certificates: Vec<CertRecord>,
    },
    SpentToken(SpentToken),
    CrlNumber {
        backend: String,
        number: u64,
    },
    /// Audit records come last, in sequence order.
    Audit(AuditRecord),
}

/// Where a backup's items go; false from the sink stops the dump (the reader went away).
pub type BackupSink = tokio::sync::mpsc::Sender<BackupItem>;

/// Sizes, for metrics and the admin API.
#[derive(Debug, Default, Clone, Serialize)]
pub struct StoreCounts {
    pub active_registrations: usize,
    pub audit_records: u64,
    /// What the store takes: SQLite's database pages, sled's files, the PostgreSQL
    /// database's size.
    pub bytes: u64,
}

/// [`Store::check_claims`] on a thread that may block.
pub trait ClaimsCheck: Send + Sync {
    fn check_claims(&self, iss: &str, jti: &str, ees_id: &str) -> Result<(), StoreError>;
}

/// The answer of [`Store::check_claims`] from what an engine read, the EES ID first and the
/// token second: a spent token is `TokenReplayed` (even when the registration it made is
/// what holds the EES ID now), else an EES ID held by an active registration is
/// `EesAlreadyRegistered`. Reading in that order names a replay right even when its
/// registration commits between the two reads.
pub fn judge_claims(ees_id_held: bool, token_spent: bool) -> Result<(), StoreError> {
    if token_spent {
        Err(StoreError::TokenReplayed)
    } else if ees_id_held {
        Err(StoreError::EesAlreadyRegistered)
    } else {
        Ok(())
    }
}

/// Every audit record, page by page (for `audit verify` and `export`).
pub async fn all_audit_records(store: &dyn Store) -> Result<Vec<AuditRecord>, StoreError> {
    let mut out: Vec<AuditRecord> = Vec::new();
    loop {
        let from = out.last().map_or(1, |r| r.seq + 1);
        let page = store.audit_records(from, PAGE).await?;
        let last = page.len() < PAGE;
        out.extend(page);
        if last {
            return Ok(out);
        }
    }
}

/// Every active registration with its current certificate, page by page.
pub async fn all_active_registrations(
    store: &dyn Store,
) -> Result<Vec<(RegistrationRecord, CertRecord)>, StoreError> {
    let mut out: Vec<(RegistrationRecord, CertRecord)> = Vec::new();
    loop {
        let after = out.last().map(|(r, _)| r.id.clone()).unwrap_or_default();
        let page = store.active_registrations(&after, PAGE).await?;
        let last = page.len() < PAGE;
        out.extend(page);
        if last {
            return Ok(out);
        }
    }
}

/// How many records one read of a dump takes.
const PAGE: usize = 1000;

/// Opens the store that `[storage]` names. Fails when another process holds an embedded
/// store.
pub async fn open(cfg: &StorageConfig) -> Result<Arc<dyn Store>, StoreError> {
    match cfg.kind {
        StorageKind::Postgres => Ok(Arc::new(PostgresStore::open(cfg).await?)),
        StorageKind::Sqlite => Ok(Arc::new(SqliteStore::open(&cfg.path, cfg.cache_mib)?)),
        StorageKind::Sled => Ok(Arc::new(OffReactor::new(SledStore::open_with_cache(
            &cfg.path,
            cfg.cache_mib,
        )?))),
    }
}

/// `ecsd store restore`: loads the backup at `from` into the (empty or absent) store that
/// `cfg` names. An embedded store is built beside its path and moved into place only when
/// complete, so a restore that fails half way leaves no half store behind.
pub async fn restore_into(
    cfg: &StorageConfig,
    from: &std::path::Path,
) -> Result<backup::Counts, String> {
    if !cfg.kind.embedded() {
        // A database server: loaded in place, into a database that holds nothing yet (the
        // whole file was checked before the first write).
        let store = open(cfg).await.map_err(|e| e.to_string())?;
        return backup::restore(store.as_ref(), from).await;
    }
    if cfg.path.exists() {
        // Refuses a store that holds anything (and one that a daemon holds).
        let existing = open(cfg).await.map_err(|e| e.to_string())?;
        must_be_empty(existing.as_ref())
            .await
            .map_err(|e| format!("{}: {e}", cfg.path.display()))?;
    }
    let mut staging = cfg.clone();
    let mut name = cfg.path.file_name().unwrap_or_default().to_os_string();
    name.push(".restoring");
    staging.path = cfg.path.with_file_name(name);
    remove_embedded(&staging.path);
    let counts = {
        let store = open(&staging).await.map_err(|e| e.to_string())?;
        let loaded = backup::restore(store.as_ref(), from).await;
        drop(store);
        match loaded {
            Ok(c) => c,
            Err(e) => {
                remove_embedded(&staging.path);
                return Err(e);
            }
        }
    };
    remove_embedded(&cfg.path);
    // A database and its WAL move together (the WAL is normally folded in at close).
    for suffix in ["-wal", ""] {
        let (mut from, mut to) = (
            staging.path.clone().into_os_string(),
            cfg.path.clone().into_os_string(),
        );
        from.push(suffix);
        to.push(suffix);
        if suffix.is_empty() || std::path::Path::new(&from).exists() {
            std::fs::rename(&from, &to).map_err(|e| format!("{}: {e}", cfg.path.display()))?;
        }
    }
    Ok(counts)
}

/// Refuses a store that holds an audit record or an active registration: a restore goes
/// only into an empty store.
pub async fn must_be_empty(store: &dyn Store) -> Result<(), String> {
    let (records, _) = store.audit_head().await.map_err(|e| e.to_string())?;
    let active = store
        .active_registrations("", 1)
        .await
        .map_err(|e| e.to_string())?;
    if records > 0 || !active.is_empty() {
        return Err(format!(
            "the store is not empty ({records} audit records{}): restore only into an empty \
             store",
            if active.is_empty() {
                ""
            } else {
                ", active registrations"
            }
        ));
    }
    Ok(())
}

/// Removes an embedded store's files: a folder (sled) or a database with its WAL (SQLite).
fn remove_embedded(path: &std::path::Path) {
    if path.is_dir() {
        let _ = std::fs::remove_dir_all(path);
        return;
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests;
