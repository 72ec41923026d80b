//! sled 0.34: one tree with prefixed keys, so that a commit is one single-tree transaction.

use super::blocking::BlockingStore;
use super::*;
use crate::audit::GENESIS_HASH;
use std::path::Path;
use std::sync::{Condvar, Mutex};

/// sled, the embedded default: one tree with prefixed keys, so that a commit is one
/// single-tree transaction.
pub struct SledStore {
    db: ::sled::Db,
    tree: ::sled::Tree,
    flusher: GroupFlush,
    /// Every commit appends to the audit chain (one head key), so concurrent sled
    /// transactions would conflict and retry; taking turns is cheaper. The wait for
    /// durability happens outside it.
    apply_lock: Mutex<()>,
}

/// Group commit without a flush thread: a commit that finds no flush running becomes the
/// leader and flushes itself; commits that arrive meanwhile wait, and the next of them leads
/// the following flush, which covers them all. Under load many registrations share one
/// flush; alone, a commit flushes on its own thread with no hand-off to another.
struct GroupFlush {
    state: Mutex<FlushState>,
    flushed: Condvar,
}

#[derive(Default)]
struct FlushState {
    /// Commits applied so far (each takes the next number).
    requested: u64,
    /// All commits up to this number are durable.
    done: u64,
    /// A leader is flushing now.
    flushing: bool,
    /// The error of the last failed flush and the commit number it was to cover.
    failed: Option<(u64, String)>,
}

impl GroupFlush {
    fn new() -> Self {
        GroupFlush {
            state: Mutex::new(FlushState::default()),
            flushed: Condvar::new(),
        }
    }

    /// Waits until everything applied before this call is on disk.
    fn wait_durable(&self, db: &::sled::Db) -> Result<(), StoreError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.requested += 1;
        let mine = st.requested;
        while st.done < mine {
            if st.flushing {
                st = self.flushed.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            st.flushing = true;
            let target = st.requested;
            drop(st);
            let result = db.flush();
            st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.flushing = false;
            if let Err(e) = result {
                st.failed = Some((target, e.to_string()));
            }
            st.done = target;
            self.flushed.notify_all();
        }
        match &st.failed {
            Some((upto, e)) if *upto >= mine => Err(StoreError::Io(format!("flush: {e}"))),
            _ => Ok(()),
        }
    }
}

const AUDIT_HEAD: &[u8] = b"meta/audit_head";

fn k(prefix: &str, rest: &str) -> Vec<u8> {
    format!("{prefix}{rest}").into_bytes()
}

fn exp_key(exp: i64, id: &str) -> Vec<u8> {
    // Offset so that the big-endian order of the key is the numeric order.
    let v = (exp as i128 + (1i128 << 62)).max(0) as u64;
    let mut key = b"exp/".to_vec();
    key.extend_from_slice(&v.to_be_bytes());
    key.extend_from_slice(id.as_bytes());
    key
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        detail: e.to_string(),
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialise")
}

#[derive(Serialize, Deserialize)]
struct Head {
    seq: u64,
    hash: String,
}

/// How long a lock on the folder is waited for before the store counts as held by another
/// process.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// sled reports a held folder lock as an `Other` I/O error whose text names the lock (the
/// `WouldBlock` of `flock` is only in that text).
fn is_lock_held(e: &::sled::Error) -> bool {
    match e {
        ::sled::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::WouldBlock
                || io.to_string().starts_with("could not acquire lock")
        }
        _ => false,
    }
}

impl SledStore {
    /// Opens (or creates) the store with a page cache of `cache_mib` MiB.
    pub fn open_with_cache(path: &Path, cache_mib: u64) -> Result<Self, StoreError> {
        // sled takes an exclusive lock on its folder, and its background threads release
        // it a moment after the last handle is dropped (a restart, a reopen): a lock still
        // held is tried again for a while before it means another process.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            match ::sled::Config::new()
                .path(path)
                .cache_capacity(cache_mib.max(1) << 20)
                .open()
            {
                Ok(db) => break db,
                Err(e) if is_lock_held(&e) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(StoreError::Locked(path.display().to_string()));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(StoreError::Io(format!("{}: {e}", path.display()))),
            }
        };
        let tree = db.open_tree("ecs").map_err(io)?;
        if !tree.contains_key(ACTIVE_COUNT).map_err(io)? {
            // A store from before the count was kept (or a new one): count once.
            let n = tree.scan_prefix(b"ees/").count() as u64;
            tree.insert(ACTIVE_COUNT, encode(&n)).map_err(io)?;
        }
        Ok(SledStore {
            db,
            tree,
            flusher: GroupFlush::new(),
            apply_lock: Mutex::new(()),
        })
    }

    fn get<T: for<'de> Deserialize<'de>>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.tree.get(key).map_err(io)? {
            Some(v) => decode(key, &v).map(Some),
            None => Ok(None),
        }
    }
}

impl SledStore {
    fn apply(&self, c: &Commit) -> Result<Option<AuditRecord>, StoreError> {
        use ::sled::transaction::ConflictableTransactionError::Abort;
        let _turn = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        let result = self.tree.transaction(|tx| {
            if let Some(t) = &c.spend_token {
                let key = k("jti/", &format!("{}\0{}", t.iss, t.jti));
                if tx.get(&key)?.is_some() {
                    return Err(Abort(StoreError::TokenReplayed));
                }
                tx.insert(key, encode(t))?;
            }
            if let Some(reg) = &c.registration {
                let reg_key = k("reg/", &reg.id);
                let old: Option<RegistrationRecord> = tx_get(tx, &reg_key)?;
                if let Some(expected) = &c.expect_current
                    && !old
                        .as_ref()
                        .is_some_and(|o| o.state == RegState::Active && &o.current_cert == expected)
                {
                    return Err(Abort(StoreError::Changed));
                }
                let ees_key = k("ees/", &reg.ees_id.to_ascii_lowercase());
                if c.claim_ees_id && tx.get(&ees_key)?.is_some() {
                    return Err(Abort(StoreError::EesAlreadyRegistered));
                }
                if let Some(old) = &old
                    && old.state == RegState::Active
                {
                    tx.remove(exp_key(old.exp_time, &old.id))?;
                }
                if reg.state == RegState::Active {
                    if tx.insert(ees_key, reg.id.as_bytes())?.is_none() {
                        add_active(tx, 1)?;
                    }
                    tx.insert(exp_key(reg.exp_time, &reg.id), b"".as_slice())?;
                } else if tx.get(&ees_key)?.as_deref() == Some(reg.id.as_bytes()) {
                    tx.remove(ees_key)?;
                    add_active(tx, -1)?;
                }
                tx.insert(reg_key, encode(reg))?;
            }
            for cert in &c.new_certs {
                let key = k("cert/", &cert.serial);
                if tx.get(&key)?.is_some() {
                    return Err(Abort(StoreError::SerialCollision));
                }
                tx.insert(key, encode(cert))?;
                if cert.backend == super::THIRD_PARTY {
                    tx.insert(k("fp/", &cert.fingerprint), cert.serial.as_bytes())?;
                }
            }
            for (serial, rev) in &c.revocations {
                let key = k("cert/", serial);
                let mut cert: CertRecord = match tx_get(tx, &key)? {
                    Some(c) => c,
                    None => continue,
                };
                if cert.revoked.is_some() {
                    continue;
                }
                cert.revoked = Some(rev.clone());
                tx.insert(key, encode(&cert))?;
                tx.insert(k(&format!("rev/{}/", cert.backend), serial), encode(rev))?;
            }
            for (backend, number) in &c.raise_crl_numbers {
                let key = k("meta/crl_number/", backend);
                let old = tx
                    .get(&key)?
                    .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                if *number > old {
                    tx.insert(key, number.to_be_bytes().to_vec())?;
                }
            }
            let mut written = None;
            if let Some(event) = &c.audit {
                let head: Option<Head> = tx_get(tx, AUDIT_HEAD)?;
                let (seq, prev) = match head {
                    Some(h) => (h.seq + 1, h.hash),
                    None => (1, GENESIS_HASH.to_string()),
                };
                let rec = AuditRecord::chained(seq, prev, event.clone());
                let hash = rec.hash.clone();
                tx.insert(format!("audit/{seq:020}").into_bytes(), encode(&rec))?;
                tx.insert(AUDIT_HEAD, encode(&Head { seq, hash }))?;
                written = Some(rec);
            }
            Ok(written)
        });
        result.map_err(|e| match e {
            ::sled::transaction::TransactionError::Abort(e) => e,
            ::sled::transaction::TransactionError::Storage(e) => io(e),
        })
    }
}

type TxError = ::sled::transaction::ConflictableTransactionError<StoreError>;

/// The number of active registrations, kept with every change so that counting them
/// (metrics, readiness) does not scan a million keys.
const ACTIVE_COUNT: &[u8] = b"meta/active_count";

fn add_active(tx: &::sled::transaction::TransactionalTree, delta: i64) -> Result<(), TxError> {
    let n: u64 = tx_get(tx, ACTIVE_COUNT)?.unwrap_or(0);
    tx.insert(ACTIVE_COUNT, encode(&n.saturating_add_signed(delta)))?;
    Ok(())
}

fn tx_get<T: for<'de> Deserialize<'de>>(
    tx: &::sled::transaction::TransactionalTree,
    key: &[u8],
) -> Result<Option<T>, TxError> {
    match tx.get(key)? {
        Some(v) => decode(key, &v)
            .map(Some)
            .map_err(::sled::transaction::ConflictableTransactionError::Abort),
        None => Ok(None),
    }
}

impl BlockingStore for SledStore {
    fn commit(&self, c: Commit) -> Result<Option<AuditRecord>, StoreError> {
        let written = self.apply(&c)?;
        // Durable before the caller answers, in a flush shared with concurrent commits.
        self.flusher.wait_durable(&self.db)?;
        Ok(written)
    }

    fn commit_all(&self, cs: Vec<Commit>) -> Result<(), StoreError> {
        for c in &cs {
            self.apply(c)?;
        }
        self.flusher.wait_durable(&self.db)
    }

    fn record(&self, event: AuditEvent) -> Result<Option<AuditRecord>, StoreError> {
        self.apply(&Commit {
            audit: Some(event),
            ..Default::default()
        })
    }

    fn registration(&self, id: &str) -> Result<Option<RegistrationRecord>, StoreError> {
        self.get(&k("reg/", id))
    }

    fn active_registration_for(&self, ees_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .tree
            .get(k("ees/", &ees_id.to_ascii_lowercase()))
            .map_err(io)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn cert(&self, serial: &str) -> Result<Option<CertRecord>, StoreError> {
        self.get(&k("cert/", serial))
    }

    fn third_party_cert_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Option<CertRecord>, StoreError> {
        // A store written before this lookup served only third-party certificates also
        // holds `fp/` entries of ECS-issued ones: they are not answers.
        Ok(match self.tree.get(k("fp/", fingerprint)).map_err(io)? {
            Some(serial) => self
                .cert(&String::from_utf8_lossy(&serial))?
                .filter(|c| c.backend == super::THIRD_PARTY),
            None => None,
        })
    }

    fn token_spent(&self, iss: &str, jti: &str) -> Result<bool, StoreError> {
        self.tree
            .contains_key(k("jti/", &format!("{iss}\0{jti}")))
            .map_err(io)
    }

    fn due_expiries(&self, now: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        let end = exp_key(now, "\u{10ffff}");
        let mut out = Vec::new();
        for item in self.tree.range(b"exp/".to_vec()..end).take(limit) {
            let (key, _) = item.map_err(io)?;
            out.push(String::from_utf8_lossy(&key[12..]).into_owned());
        }
        Ok(out)
    }

    fn revoked(&self, backend: &str) -> Result<Vec<(String, Revocation)>, StoreError> {
        let prefix = format!("rev/{backend}/");
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(prefix.as_bytes()) {
            let (key, v) = item.map_err(io)?;
            let serial = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            // The index holds the revocation itself, so a CRL of 100,000 entries is one
            // range scan; stores written before it did hold an empty value.
            let rev = if v.is_empty() {
                self.cert(&serial)?.and_then(|c| c.revoked)
            } else {
                Some(decode(&key, &v)?)
            };
            if let Some(rev) = rev {
                out.push((serial, rev));
            }
        }
        Ok(out)
    }

    fn purge_spent_tokens(&self, before: i64) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.tree.scan_prefix(b"jti/") {
            let (key, v) = item.map_err(io)?;
            let t: SpentToken = decode(&key, &v)?;
            if t.exp < before {
                self.tree.remove(key).map_err(io)?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn next_crl_number(&self, backend: &str) -> Result<u64, StoreError> {
        let key = k("meta/crl_number/", backend);
        let v = self
            .tree
            .update_and_fetch(&key, |old| {
                let n = old
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                Some((n + 1).to_be_bytes().to_vec())
            })
            .map_err(io)?
            .ok_or_else(|| io("CRL number vanished"))?;
        self.db.flush().map_err(io)?;
        let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| StoreError::Corrupt {
            key: String::from_utf8_lossy(&key).into_owned(),
            detail: "not 8 bytes".into(),
        })?;
        Ok(u64::from_be_bytes(bytes))
    }

    fn audit_records(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let start = format!("audit/{from:020}").into_bytes();
        let mut out = Vec::new();
        for item in self.tree.range(start..b"audit0".to_vec()).take(limit) {
            let (key, v) = item.map_err(io)?;
            out.push(decode(&key, &v)?);
        }
        Ok(out)
    }

    fn audit_head(&self) -> Result<(u64, String), StoreError> {
        Ok(match self.get::<Head>(AUDIT_HEAD)? {
            Some(h) => (h.seq, h.hash),
            None => (0, GENESIS_HASH.to_string()),
        })
    }

    fn counts(&self) -> Result<StoreCounts, StoreError> {
        let active: u64 = self.get(ACTIVE_COUNT)?.unwrap_or(0);
        Ok(StoreCounts {
            active_registrations: active as usize,
            audit_records: self.audit_head()?.0,
            bytes: self.db.size_on_disk().unwrap_or(0),
        })
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(io)
    }

    fn backup(&self, each: &mut dyn FnMut(BackupItem) -> bool) -> Result<(), StoreError> {
        // sled has no snapshot reads: commits wait while the dump runs.
        let _turn = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        for item in self.tree.scan_prefix(b"reg/") {
            let (key, v) = item.map_err(io)?;
            let registration: RegistrationRecord = decode(&key, &v)?;
            let mut certificates = Vec::with_capacity(registration.certs.len());
            for serial in &registration.certs {
                certificates.push(self.cert(serial)?.ok_or_else(|| StoreError::Corrupt {
                    key: format!("reg/{}", registration.id),
                    detail: format!("certificate {serial} is missing"),
                })?);
            }
            if !each(BackupItem::Registration {
                registration,
                certificates,
            }) {
                return Ok(());
            }
        }
        for item in self.tree.scan_prefix(b"jti/") {
            let (key, v) = item.map_err(io)?;
            if !each(BackupItem::SpentToken(decode(&key, &v)?)) {
                return Ok(());
            }
        }
        for item in self.tree.scan_prefix(b"meta/crl_number/") {
            let (key, v) = item.map_err(io)?;
            let backend = String::from_utf8_lossy(&key[b"meta/crl_number/".len()..]).into_owned();
            let number = <[u8; 8]>::try_from(v.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    detail: "not 8 bytes".into(),
                })?;
            if !each(BackupItem::CrlNumber { backend, number }) {
                return Ok(());
            }
        }
        for item in self.tree.range(b"audit/".to_vec()..b"audit0".to_vec()) {
            let (key, v) = item.map_err(io)?;
            if !each(BackupItem::Audit(decode(&key, &v)?)) {
                return Ok(());
            }
        }
        Ok(())
    }

    fn active_registrations(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(RegistrationRecord, CertRecord)>, StoreError> {
        // In registration ID order: the `reg/` keys, skipping those no longer active.
        let mut start = k("reg/", after);
        start.push(0);
        let mut out = Vec::new();
        for item in self.tree.range(start..b"reg0".to_vec()) {
            if out.len() >= limit {
                break;
            }
            let (key, v) = item.map_err(io)?;
            let reg: RegistrationRecord = decode(&key, &v)?;
            if reg.state == RegState::Active
                && let Some(cert) = self.cert(&reg.current_cert)?
            {
                out.push((reg, cert));
            }
        }
        Ok(out)
    }
}
