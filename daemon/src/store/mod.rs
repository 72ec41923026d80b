//! Durable state: registrations, certificates, spent token IDs and the audit log.
//!
//! The pipeline describes each state change as one [`Commit`]; a store applies it atomically
//! (all of it or nothing) and makes it durable before returning, so the HTTP answer is sent
//! only for what survives a crash.
//!
//! This folder is the storage room: the records and the [`Store`] trait here, one file per
//! engine beside it, and [`open`], the one place that turns `[storage]` into a store. No
//! engine type leaves the folder; adding an engine is one file and one arm of [`open`].

mod sled;

use self::sled::SledStore;

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

/// A certificate the ECS issued (or accepted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertRecord {
    pub serial: String,
    pub registration_id: String,
    pub backend: String,
    /// DER, hex-encoded.
    pub der_hex: String,
    /// SHA-256 of the DER, hex.
    pub fingerprint: String,
    pub not_before: i64,
    pub not_after: i64,
    pub revoked: Option<Revocation>,
    /// For an accepted third-party certificate: the chain it was accepted with (DER, hex),
    /// intermediates then the trust anchor. Empty for ECS-issued certificates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain_hex: Vec<String>,
}

impl CertRecord {
    /// The certificate's DER; a record whose hex does not decode is corrupt, and says so.
    pub fn der(&self) -> Result<Vec<u8>, StoreError> {
        hex::decode(&self.der_hex).map_err(|e| StoreError::Corrupt {
            key: format!("cert/{}", self.serial),
            detail: format!("der_hex: {e}"),
        })
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
    pub new_certs: Vec<CertRecord>,
    /// (serial, revocation) of certificates to revoke.
    pub revocations: Vec<(String, Revocation)>,
    pub spend_token: Option<SpentToken>,
    pub audit: Option<AuditEvent>,
}

/// Why a commit was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the token ID was already used")]
    TokenReplayed,
    #[error("an active registration exists for this EES ID")]
    EesAlreadyRegistered,
    #[error("certificate serial already used")]
    SerialCollision,
    #[error("storage failure: {0}")]
    Io(String),
    #[error("another ecsd holds the store at {0}: stop it, or use the daemon's control socket")]
    Locked(String),
    #[error("corrupt record {key}: {detail}")]
    Corrupt { key: String, detail: String },
}

/// What the registration pipeline needs from storage.
pub trait Store: Send + Sync {
    /// Applies `c` atomically and durably; returns the audit record written, if any.
    fn commit(&self, c: Commit) -> Result<Option<AuditRecord>, StoreError>;
    /// Applies each of `cs` atomically (each all or nothing, in order), then makes them
    /// durable together: bulk loads (`ecsd bench --prefill`) without one flush each.
    /// Stops at the first refused commit and returns its error.
    fn commit_all(&self, cs: Vec<Commit>) -> Result<(), StoreError> {
        for c in cs {
            self.commit(c)?;
        }
        Ok(())
    }
    /// Appends the audit record of a refusal. Not flushed at once: a refusal changes no
    /// state, and its record reaches the disk with the next flush (at most 500 ms later).
    fn record(&self, event: AuditEvent) -> Result<Option<AuditRecord>, StoreError>;
    fn registration(&self, id: &str) -> Result<Option<RegistrationRecord>, StoreError>;
    fn active_registration_for(&self, ees_id: &str) -> Result<Option<String>, StoreError>;
    fn cert(&self, serial: &str) -> Result<Option<CertRecord>, StoreError>;
    fn cert_by_fingerprint(&self, fingerprint: &str) -> Result<Option<CertRecord>, StoreError>;
    fn token_spent(&self, iss: &str, jti: &str) -> Result<bool, StoreError>;
    /// Active registrations whose `exp_time` is at or before `now`, at most `limit`.
    fn due_expiries(&self, now: i64, limit: usize) -> Result<Vec<String>, StoreError>;
    /// (serial, revocation) of every revoked certificate of `backend`, for its CRL.
    fn revoked(&self, backend: &str) -> Result<Vec<(String, Revocation)>, StoreError>;
    /// Forgets spent token IDs whose tokens expired before `before`.
    fn purge_spent_tokens(&self, before: i64) -> Result<usize, StoreError>;
    /// The next CRL number of `backend` (strictly increasing, durable).
    fn next_crl_number(&self, backend: &str) -> Result<u64, StoreError>;
    /// Audit records with `seq >= from`, in order.
    fn audit_records(&self, from: u64) -> Result<Vec<AuditRecord>, StoreError>;
    /// The hash of the newest audit record.
    fn audit_head(&self) -> Result<(u64, String), StoreError>;
    fn counts(&self) -> Result<StoreCounts, StoreError>;
    /// Makes everything written so far durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Every active registration with its current certificate.
    fn active_registrations(&self) -> Result<Vec<(RegistrationRecord, CertRecord)>, StoreError>;
}

/// Sizes, for metrics and the admin API.
#[derive(Debug, Default, Clone, Serialize)]
pub struct StoreCounts {
    pub active_registrations: usize,
    pub audit_records: u64,
}

/// Opens the store that `[storage]` names. Fails when another process holds an embedded
/// store.
pub fn open(cfg: &StorageConfig) -> Result<Arc<dyn Store>, StoreError> {
    match cfg.kind {
        StorageKind::Sled => Ok(Arc::new(SledStore::open_with_cache(
            &cfg.path,
            cfg.cache_mib,
        )?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupt_certificate_record_says_so_instead_of_an_empty_certificate() {
        let cert = CertRecord {
            serial: "01".into(),
            registration_id: "r".into(),
            backend: "soft".into(),
            der_hex: "not hex".into(),
            fingerprint: String::new(),
            not_before: 0,
            not_after: 0,
            revoked: None,
            chain_hex: Vec::new(),
        };
        match cert.der() {
            Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "cert/01"),
            other => panic!("{other:?}"),
        }
    }
}
