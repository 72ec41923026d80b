//! Embedded engines do file I/O that blocks. They implement [`BlockingStore`], and
//! [`OffReactor`] runs each call on tokio's blocking pool, so that no request handler waits
//! for a disk on a reactor thread.

use super::*;

/// The [`Store`] calls of an embedded engine, synchronous.
pub trait BlockingStore: Send + Sync + 'static {
    fn commit(&self, c: Commit) -> Result<Option<AuditRecord>, StoreError>;
    fn commit_all(&self, cs: Vec<Commit>) -> Result<(), StoreError>;
    fn record(&self, event: AuditEvent) -> Result<Option<AuditRecord>, StoreError>;
    fn registration(&self, id: &str) -> Result<Option<RegistrationRecord>, StoreError>;
    fn active_registration_for(&self, ees_id: &str) -> Result<Option<String>, StoreError>;
    fn cert(&self, serial: &str) -> Result<Option<CertRecord>, StoreError>;
    fn third_party_cert_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Option<CertRecord>, StoreError>;
    fn token_spent(&self, iss: &str, jti: &str) -> Result<bool, StoreError>;
    fn due_expiries(&self, now: i64, limit: usize) -> Result<Vec<String>, StoreError>;
    fn revoked(&self, backend: &str) -> Result<Vec<(String, Revocation)>, StoreError>;
    fn purge_spent_tokens(&self, before: i64) -> Result<usize, StoreError>;
    fn next_crl_number(&self, backend: &str) -> Result<u64, StoreError>;
    fn audit_records(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError>;
    fn audit_head(&self) -> Result<(u64, String), StoreError>;
    fn counts(&self) -> Result<StoreCounts, StoreError>;
    fn flush(&self) -> Result<(), StoreError>;
    /// Calls `each` with every item of a snapshot; stops when it answers false.
    fn backup(&self, each: &mut dyn FnMut(BackupItem) -> bool) -> Result<(), StoreError>;
    fn active_registrations(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(RegistrationRecord, CertRecord)>, StoreError>;
}

impl<T: BlockingStore> ClaimsCheck for T {
    fn check_claims(&self, iss: &str, jti: &str, ees_id: &str) -> Result<(), StoreError> {
        let held = self.active_registration_for(ees_id)?.is_some();
        judge_claims(held, self.token_spent(iss, jti)?)
    }
}

/// An embedded engine, its calls moved off the reactor.
pub struct OffReactor<T>(Arc<T>);

impl<T: BlockingStore> OffReactor<T> {
    pub fn new(engine: T) -> Self {
        OffReactor(Arc::new(engine))
    }

    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&T) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let engine = self.0.clone();
        tokio::task::spawn_blocking(move || f(&engine))
            .await
            .map_err(|e| StoreError::Io(format!("store task: {e}")))?
    }
}

#[async_trait::async_trait]
impl<T: BlockingStore> Store for OffReactor<T> {
    async fn commit(&self, c: Commit) -> Result<Option<AuditRecord>, StoreError> {
        self.run(move |s| s.commit(c)).await
    }
    async fn commit_all(&self, cs: Vec<Commit>) -> Result<(), StoreError> {
        self.run(move |s| s.commit_all(cs)).await
    }
    async fn record(&self, event: AuditEvent) -> Result<Option<AuditRecord>, StoreError> {
        self.run(move |s| s.record(event)).await
    }
    async fn registration(&self, id: &str) -> Result<Option<RegistrationRecord>, StoreError> {
        let id = id.to_owned();
        self.run(move |s| s.registration(&id)).await
    }
    async fn active_registration_for(&self, ees_id: &str) -> Result<Option<String>, StoreError> {
        let ees_id = ees_id.to_owned();
        self.run(move |s| s.active_registration_for(&ees_id)).await
    }
    async fn cert(&self, serial: &str) -> Result<Option<CertRecord>, StoreError> {
        let serial = serial.to_owned();
        self.run(move |s| s.cert(&serial)).await
    }
    async fn third_party_cert_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Option<CertRecord>, StoreError> {
        let fingerprint = fingerprint.to_owned();
        self.run(move |s| s.third_party_cert_by_fingerprint(&fingerprint))
            .await
    }
    async fn token_spent(&self, iss: &str, jti: &str) -> Result<bool, StoreError> {
        let (iss, jti) = (iss.to_owned(), jti.to_owned());
        self.run(move |s| s.token_spent(&iss, &jti)).await
    }
    async fn check_claims(&self, iss: &str, jti: &str, ees_id: &str) -> Result<(), StoreError> {
        let (iss, jti, ees_id) = (iss.to_owned(), jti.to_owned(), ees_id.to_owned());
        self.run(move |s| s.check_claims(&iss, &jti, &ees_id)).await
    }
    fn blocking_claims(&self) -> Option<Arc<dyn ClaimsCheck>> {
        Some(self.0.clone())
    }
    async fn due_expiries(&self, now: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        self.run(move |s| s.due_expiries(now, limit)).await
    }
    async fn revoked(&self, backend: &str) -> Result<Vec<(String, Revocation)>, StoreError> {
        let backend = backend.to_owned();
        self.run(move |s| s.revoked(&backend)).await
    }
    async fn purge_spent_tokens(&self, before: i64) -> Result<usize, StoreError> {
        self.run(move |s| s.purge_spent_tokens(before)).await
    }
    async fn next_crl_number(&self, backend: &str) -> Result<u64, StoreError> {
        let backend = backend.to_owned();
        self.run(move |s| s.next_crl_number(&backend)).await
    }
    async fn audit_records(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        self.run(move |s| s.audit_records(from, limit)).await
    }
    async fn audit_head(&self) -> Result<(u64, String), StoreError> {
        self.run(|s| s.audit_head()).await
    }
    async fn counts(&self) -> Result<StoreCounts, StoreError> {
        self.run(|s| s.counts()).await
    }
    async fn flush(&self) -> Result<(), StoreError> {
        self.run(|s| s.flush()).await
    }
    async fn backup(&self, sink: BackupSink) -> Result<(), StoreError> {
        self.run(move |s| s.backup(&mut |item| sink.blocking_send(item).is_ok()))
            .await
    }
    async fn active_registrations(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(RegistrationRecord, CertRecord)>, StoreError> {
        let after = after.to_owned();
        self.run(move |s| s.active_registrations(&after, limit))
            .await
    }
}
