//! SQLite, the embedded default: one database file in WAL mode, the tables of
//! [`schema`](super::schema).
//!
//! One writer thread owns the only read-write connection. Each commit it receives is a
//! savepoint inside one transaction that takes every commit waiting at that moment (group
//! commit), and the transaction's COMMIT, with `synchronous = FULL`, is the fsync that
//! makes all of them durable before any caller hears back. Reads use their own connections
//! on the blocking pool and never wait for the writer (WAL readers see the last commit).

use super::schema::{self, Dialect};
use super::writes::{Done, Job, Work, Writes};
use super::*;
use crate::audit::GENESIS_HASH;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc;
use tokio::sync::oneshot;

/// The most commits one transaction takes: bounds the latency of the first in a burst.
const GROUP_MAX: usize = 512;
/// Idle read connections kept open: as many as requests read at once under load (a
/// connection opened past it parses the schema and prepares its statements again).
const READERS_KEPT: usize = 16;

pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// Each reader's page cache: together they have half of `storage.cache_mib`.
    cache_kib: i64,
    readers: Mutex<Vec<Connection>>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// An exclusive `flock` on the database file: one ecsd per store (the writer's audit
    /// head and the reservations live in that process).
    _lock: std::fs::File,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Readers close first: the writer's connection, closing last, checkpoints the WAL
        // into the database file (a read-only connection cannot).
        self.readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        // Closing the queue ends the writer once the queued work is done.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = w.join();
        }
    }
}

fn io(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |e| StoreError::Io(format!("{}: {e}", path.display()))
}

impl SqliteStore {
    /// Opens (or creates) the database at `path`, migrating it to this binary's schema.
    pub fn open(path: &Path, cache_mib: u64) -> Result<Self, StoreError> {
        if path.is_dir() {
            return Err(StoreError::Unusable(format!(
                "{} is a folder, not an SQLite database: a sled store? Set storage.kind = \"sled\" \
                 to keep serving it, or move it to SQLite with `ecsd store backup` and \
                 `ecsd store restore`",
                path.display()
            )));
        }
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::Io(format!("{}: {e}", parent.display())))?;
        }
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|_| StoreError::Locked(path.display().to_string()))?;
        // Half the cache for the writer, whose pages every commit touches; the readers
        // share the other half.
        let half_kib = (cache_mib.max(2) << 10) / 2;
        let cache_kib = (half_kib / READERS_KEPT as u64) as i64;
        let mut conn = connect(path, half_kib as i64, true).map_err(|e| unusable(path, e))?;
        migrate(&mut conn, path)?;
        // Each job's savepoint journals the pages it changes (one job's worth at a time);
        // past 64 KiB that journal became a temporary file, one write per page and a new
        // file per group. Set after the migrations: an index they build sorts through
        // temporary files, which must not all be held in memory on a large store.
        conn.pragma_update(None, "temp_store", "MEMORY")
            .map_err(|e| unusable(path, e))?;
        let head = read_head(&conn).map_err(|e| unusable(path, e))?;
        let (tx, rx) = mpsc::channel();
        let writer_path = path.to_path_buf();
        let writer = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                Writer {
                    conn,
                    head,
                    path: writer_path,
                }
                .run(rx)
            })
            .map_err(|e| StoreError::Io(format!("writer thread: {e}")))?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                cache_kib,
                readers: Mutex::new(Vec::new()),
                jobs: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(writer)),
                _lock: lock,
            }),
        })
    }

    /// Runs `f` with a read connection, on the blocking pool.
    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.blocking(move |inner| inner.read_here(f)).await
    }

    /// Runs `f` on the blocking pool.
    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Io(format!("store task: {e}")))?
    }
}

impl Inner {
    /// Runs `f` with a read connection on this thread, which may block.
    fn read_here<R>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R>,
    ) -> Result<R, StoreError> {
        let conn = self.readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match conn {
            Some(c) => c,
            None => connect(&self.path, self.cache_kib, false).map_err(io(&self.path))?,
        };
        let result = f(&conn).map_err(|e| map_read_error(&self.path, e));
        let mut idle = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < READERS_KEPT {
            idle.push(conn);
        }
        result
    }
}

impl ClaimsCheck for Inner {
    fn check_claims(&self, iss: &str, jti: &str, ees_id: &str) -> Result<(), StoreError> {
        let key = ees_id.to_ascii_lowercase();
        let (held, spent) = self.read_here(|c| {
            let held = c
                .prepare_cached(schema::ACTIVE_FOR_EES)?
                .exists(params![key])?;
            let spent = c
                .prepare_cached(schema::TOKEN_SPENT)?
                .exists(params![iss, jti])?;
            Ok((held, spent))
        })?;
        judge_claims(held, spent)
    }
}

fn map_read_error(path: &Path, e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::FromSqlConversionFailure(_, _, detail) => StoreError::Corrupt {
            key: path.display().to_string(),
            detail: detail.to_string(),
        },
        e => StoreError::Io(format!("{}: {e}", path.display())),
    }
}

fn unusable(path: &Path, e: rusqlite::Error) -> StoreError {
    let hint = match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) | Some(rusqlite::ErrorCode::DatabaseCorrupt) => {
            ": the file is damaged or not a store; move it away and restore the last backup \
             (`ecsd store restore`)"
        }
        _ => "",
    };
    StoreError::Unusable(format!("{}: {e}{hint}", path.display()))
}

fn connect(path: &Path, cache_kib: i64, write: bool) -> rusqlite::Result<Connection> {
    let flags = if write {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Negative: KiB, not pages.
    conn.pragma_update(None, "cache_size", -cache_kib)?;
    if write {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // The COMMIT returns after the WAL is fsynced: no 201 for what a crash could lose.
        conn.pragma_update(None, "synchronous", "FULL")?;
    }
    Ok(conn)
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let fail = |e: rusqlite::Error| unusable(path, e);
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        .map_err(fail)?;
    let current: i64 = conn
        .query_row(
            "SELECT coalesce(max(version), 0) FROM schema_version",
            [],
            |r| r.get(0),
        )
        .map_err(fail)?;
    let latest = schema::latest_version();
    if current > latest {
        return Err(StoreError::Unusable(format!(
            "{}: the store's schema is version {current}, newer than this ecsd's {latest}: \
             run the newer ecsd that wrote it",
            path.display()
        )));
    }
    for (i, ddl) in Dialect::Sqlite.migrations().iter().enumerate() {
        let version = i as i64 + 1;
        if version <= current {
            continue;
        }
        let tx = conn.transaction().map_err(fail)?;
        tx.execute_batch(ddl).map_err(fail)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            params![version],
        )
        .map_err(fail)?;
        tx.commit().map_err(fail)?;
        tracing::info!(version, store = %path.display(), "store schema migrated");
    }
    Ok(())
}

fn read_head(conn: &Connection) -> rusqlite::Result<(u64, String)> {
    Ok(conn
        .query_row(schema::AUDIT_HEAD, [], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
        })
        .optional()?
        .unwrap_or_else(|| (0, GENESIS_HASH.to_string())))
}

/// The writer thread: the one read-write connection and the head of the audit chain.
struct Writer {
    conn: Connection,
    head: (u64, String),
    path: PathBuf,
}

impl Writer {
    fn run(mut self, jobs: mpsc::Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut group = vec![first];
            while group.len() < GROUP_MAX {
                match jobs.try_recv() {
                    Ok(j) => group.push(j),
                    Err(_) => break,
                }
            }
            self.run_group(group);
        }
    }

    /// One transaction for the whole group; each job a savepoint in it, so that a refused
    /// job leaves nothing and the others still commit.
    fn run_group(&mut self, group: Vec<Job>) {
        let mut results = Vec::with_capacity(group.len());
        if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            let e = self.fault(e);
            for job in group {
                let _ = job.reply.send(Err(e.clone()));
            }
            return;
        }
        let head_before = self.head.clone();
        for job in group {
            let head = self.head.clone();
            let result = self
                .conn
                .execute_batch("SAVEPOINT job")
                .map_err(|e| self.fault(e))
                .and_then(|_| self.apply(job.work));
            let result = match result {
                Ok(done) => match self.conn.execute_batch("RELEASE job") {
                    Ok(()) => Ok(done),
                    Err(e) => Err(self.fault(e)),
                },
                Err(e) => {
                    let _ = self.conn.execute_batch("ROLLBACK TO job; RELEASE job");
                    self.head = head;
                    Err(e)
                }
            };
            results.push((job.reply, result));
        }
        if let Err(e) = self.conn.execute_batch("COMMIT") {
            // Nothing of the group is on disk (a full disk, an I/O error): every caller
            // hears so, and the chain's head is the one on disk.
            let e = self.fault(e);
            let _ = self.conn.execute_batch("ROLLBACK");
            self.head = read_head(&self.conn).unwrap_or(head_before);
            for (reply, result) in results {
                let _ = reply.send(result.and(Err(e.clone())));
            }
            return;
        }
        for (reply, result) in results {
            let _ = reply.send(result);
        }
    }

    fn fault(&self, e: rusqlite::Error) -> StoreError {
        StoreError::Io(format!("{}: {e}", self.path.display()))
    }

    fn apply(&mut self, work: Work) -> Result<Done, StoreError> {
        match work {
            Work::Commit(c) => self.apply_commit(&c).map(|a| Done::Audit(a.map(Box::new))),
            Work::CommitAll(cs) => {
                for c in &cs {
                    self.apply_commit(c)?;
                }
                Ok(Done::Unit)
            }
            Work::NextCrlNumber(backend) => self
                .conn
                .prepare_cached(schema::NEXT_CRL_NUMBER)
                .and_then(|mut s| s.query_row(params![backend], |r| r.get::<_, i64>(0)))
                .map(|n| Done::Number(n as u64))
                .map_err(|e| self.fault(e)),
            Work::Purge(before) => self
                .conn
                .prepare_cached(schema::PURGE_SPENT_TOKENS)
                .and_then(|mut s| s.execute(params![before]))
                .map(Done::Count)
                .map_err(|e| self.fault(e)),
        }
    }

    fn apply_commit(&mut self, c: &Commit) -> Result<Option<AuditRecord>, StoreError> {
        // Each constraint, when it fires, is the refusal it stands for.
        let refused = |e: rusqlite::Error, why: StoreError| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::ConstraintViolation) => why,
            _ => self.fault(e),
        };
        if let Some(t) = &c.spend_token {
            self.conn
                .prepare_cached(schema::SPEND_TOKEN)
                .and_then(|mut s| s.execute(params![t.iss, t.jti, t.exp]))
                .map_err(|e| refused(e, StoreError::TokenReplayed))?;
        }
        if let (Some(reg), Some(expected)) = (&c.registration, &c.expect_current) {
            let held = self
                .conn
                .prepare_cached(schema::HOLD_IF_CURRENT)
                .and_then(|mut s| s.execute(params![reg.id, expected]))
                .map_err(|e| self.fault(e))?;
            if held == 0 {
                return Err(StoreError::Changed);
            }
        }
        if let Some(reg) = &c.registration {
            let profile = serde_json::to_string(&reg.profile).expect("JSON values serialise");
            self.conn
                .prepare_cached(schema::UPSERT_REGISTRATION)
                .and_then(|mut s| {
                    s.execute(params![
                        reg.id,
                        reg.state.name(),
                        reg.ees_id,
                        reg.ees_id.to_ascii_lowercase(),
                        reg.prov_id,
                        reg.domain,
                        reg.backend,
                        profile,
                        reg.exp_time,
                        reg.supp_feat,
                        reg.created_at,
                        reg.updated_at,
                        reg.cert_source.name(),
                        reg.current_cert,
                        reg.secret_token_hash,
                        reg.token_issuer,
                    ])
                })
                .map_err(|e| refused(e, StoreError::EesAlreadyRegistered))?;
        }
        for cert in &c.new_certs {
            let chain = schema::join_chain(cert);
            let revoked = cert.revoked.as_ref();
            self.conn
                .prepare_cached(schema::INSERT_CERTIFICATE)
                .and_then(|mut s| {
                    s.execute(params![
                        cert.serial,
                        cert.registration_id,
                        cert.backend,
                        cert.der,
                        cert.fingerprint,
                        cert.not_before,
                        cert.not_after,
                        revoked.map(|r| r.at),
                        revoked.map(|r| r.reason.name()),
                        chain,
                    ])
                })
                .map_err(|e| refused(e, StoreError::SerialCollision))?;
        }
        for (serial, rev) in &c.revocations {
            self.conn
                .prepare_cached(schema::REVOKE)
                .and_then(|mut s| s.execute(params![rev.at, rev.reason.name(), serial]))
                .map_err(|e| self.fault(e))?;
        }
        for (backend, number) in &c.raise_crl_numbers {
            self.conn
                .prepare_cached(schema::RAISE_CRL_NUMBER)
                .and_then(|mut s| s.execute(params![backend, *number as i64]))
                .map_err(|e| self.fault(e))?;
        }
        let Some(event) = &c.audit else {
            return Ok(None);
        };
        let rec = AuditRecord::chained(self.head.0 + 1, self.head.1.clone(), event.clone());
        let json = serde_json::to_string(&rec).expect("records serialise");
        self.conn
            .prepare_cached(schema::APPEND_AUDIT)
            .and_then(|mut s| s.execute(params![rec.seq as i64, rec.hash, json]))
            .map_err(|e| self.fault(e))?;
        self.head = (rec.seq, rec.hash.clone());
        Ok(Some(rec))
    }
}

const REGISTRATION_SELECT: &str = "SELECT id, state, ees_id, prov_id, domain, backend, \
     profile, exp_time, supp_feat, created_at, updated_at, cert_source, current_cert, \
     secret_token_hash, token_issuer FROM registrations";

const CERTIFICATE_SELECT: &str = "SELECT serial, registration_id, backend, der, fingerprint, \
     not_before, not_after, revoked_at, revocation_reason, chain FROM certificates";

fn corrupt(column: usize, detail: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, detail.into())
}

fn registration_row(conn: &Connection, r: &Row) -> rusqlite::Result<RegistrationRecord> {
    let id: String = r.get(0)?;
    let state: String = r.get(1)?;
    let profile: String = r.get(6)?;
    let source: String = r.get(11)?;
    let certs = conn
        .prepare_cached(schema::CERT_SERIALS_OF)?
        .query_map(params![id], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(RegistrationRecord {
        state: RegState::from_name(&state)
            .ok_or_else(|| corrupt(1, format!("registration {id}: state {state:?}")))?,
        ees_id: r.get(2)?,
        prov_id: r.get(3)?,
        domain: r.get(4)?,
        backend: r.get(5)?,
        profile: serde_json::from_str(&profile)
            .map_err(|e| corrupt(6, format!("registration {id}: profile: {e}")))?,
        exp_time: r.get(7)?,
        supp_feat: r.get(8)?,
        created_at: r.get(9)?,
        updated_at: r.get(10)?,
        cert_source: CertSource::from_name(&source)
            .ok_or_else(|| corrupt(11, format!("registration {id}: cert_source {source:?}")))?,
        current_cert: r.get(12)?,
        certs,
        secret_token_hash: r.get(13)?,
        token_issuer: r.get(14)?,
        id,
    })
}

fn cert_row(r: &Row) -> rusqlite::Result<CertRecord> {
    let serial: String = r.get(0)?;
    let der: Vec<u8> = r.get(3)?;
    let (revoked, chain) = schema::revocation_and_chain(&serial, r.get(7)?, r.get(8)?, r.get(9)?)
        .map_err(|e| corrupt(7, e.to_string()))?;
    Ok(CertRecord {
        registration_id: r.get(1)?,
        backend: r.get(2)?,
        der,
        fingerprint: r.get(4)?,
        not_before: r.get(5)?,
        not_after: r.get(6)?,
        revoked,
        chain,
        serial,
    })
}

fn one_registration(conn: &Connection, id: &str) -> rusqlite::Result<Option<RegistrationRecord>> {
    conn.prepare_cached(&format!("{REGISTRATION_SELECT} WHERE id = $1"))?
        .query_row(params![id], |r| registration_row(conn, r))
        .optional()
}

fn one_cert(conn: &Connection, serial: &str) -> rusqlite::Result<Option<CertRecord>> {
    conn.prepare_cached(&format!("{CERTIFICATE_SELECT} WHERE serial = $1"))?
        .query_row(params![serial], cert_row)
        .optional()
}

fn audit_row(r: &Row) -> rusqlite::Result<AuditRecord> {
    let json: String = r.get(0)?;
    serde_json::from_str(&json).map_err(|e| corrupt(0, format!("audit record: {e}")))
}

/// Every item, table by table; stops when `each` answers false.
fn dump(c: &Connection, each: &mut dyn FnMut(BackupItem) -> bool) -> rusqlite::Result<()> {
    let mut regs = c.prepare(&format!("{REGISTRATION_SELECT} ORDER BY id"))?;
    let mut rows = regs.query([])?;
    let mut certs = c.prepare(&format!(
        "{CERTIFICATE_SELECT} WHERE registration_id = $1 ORDER BY seq"
    ))?;
    while let Some(row) = rows.next()? {
        let registration = registration_row(c, row)?;
        let certificates = certs
            .query_map(params![registration.id], cert_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        if !each(BackupItem::Registration {
            registration,
            certificates,
        }) {
            return Ok(());
        }
    }
    let mut tokens = c.prepare("SELECT iss, jti, exp FROM spent_tokens ORDER BY iss, jti")?;
    let mut rows = tokens.query([])?;
    while let Some(r) = rows.next()? {
        let t = SpentToken {
            iss: r.get(0)?,
            jti: r.get(1)?,
            exp: r.get(2)?,
        };
        if !each(BackupItem::SpentToken(t)) {
            return Ok(());
        }
    }
    let mut numbers = c.prepare(schema::CRL_NUMBERS)?;
    let mut rows = numbers.query([])?;
    while let Some(r) = rows.next()? {
        let item = BackupItem::CrlNumber {
            backend: r.get(0)?,
            number: r.get::<_, i64>(1)? as u64,
        };
        if !each(item) {
            return Ok(());
        }
    }
    let mut audit = c.prepare("SELECT record FROM audit_log ORDER BY seq")?;
    let mut rows = audit.query([])?;
    while let Some(r) = rows.next()? {
        if !each(BackupItem::Audit(audit_row(r)?)) {
            return Ok(());
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl Writes for SqliteStore {
    async fn write(&self, work: Work) -> Result<Done, StoreError> {
        let (reply, answer) = oneshot::channel();
        {
            let jobs = self.inner.jobs.lock().unwrap_or_else(|e| e.into_inner());
            jobs.as_ref()
                .ok_or_else(|| StoreError::Io("the store is closing".into()))?
                .send(Job { work, reply })
                .map_err(|_| StoreError::Io("the store's writer stopped".into()))?;
        }
        answer
            .await
            .map_err(|_| StoreError::Io("the store's writer stopped".into()))?
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn commit(&self, c: Commit) -> Result<Option<AuditRecord>, StoreError> {
        Writes::commit(self, c).await
    }

    async fn commit_all(&self, cs: Vec<Commit>) -> Result<(), StoreError> {
        Writes::commit_all(self, cs).await
    }

    async fn record(&self, event: AuditEvent) -> Result<Option<AuditRecord>, StoreError> {
        Writes::record(self, event).await
    }

    async fn registration(&self, id: &str) -> Result<Option<RegistrationRecord>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| one_registration(c, &id)).await
    }

    async fn active_registration_for(&self, ees_id: &str) -> Result<Option<String>, StoreError> {
        let key = ees_id.to_ascii_lowercase();
        self.read(move |c| {
            c.prepare_cached(schema::ACTIVE_FOR_EES)?
                .query_row(params![key], |r| r.get(0))
                .optional()
        })
        .await
    }

    async fn cert(&self, serial: &str) -> Result<Option<CertRecord>, StoreError> {
        let serial = serial.to_owned();
        self.read(move |c| one_cert(c, &serial)).await
    }

    async fn third_party_cert_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Option<CertRecord>, StoreError> {
        let fp = fingerprint.to_owned();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "{CERTIFICATE_SELECT} {}",
                schema::THIRD_PARTY_BY_FINGERPRINT
            ))?
            .query_row(params![fp], cert_row)
            .optional()
        })
        .await
    }

    async fn token_spent(&self, iss: &str, jti: &str) -> Result<bool, StoreError> {
        let (iss, jti) = (iss.to_owned(), jti.to_owned());
        self.read(move |c| {
            c.prepare_cached(schema::TOKEN_SPENT)?
                .exists(params![iss, jti])
        })
        .await
    }

    async fn check_claims(&self, iss: &str, jti: &str, ees_id: &str) -> Result<(), StoreError> {
        let (iss, jti, ees_id) = (iss.to_owned(), jti.to_owned(), ees_id.to_owned());
        self.blocking(move |inner| inner.check_claims(&iss, &jti, &ees_id))
            .await
    }

    fn blocking_claims(&self) -> Option<Arc<dyn ClaimsCheck>> {
        Some(self.inner.clone())
    }

    async fn due_expiries(&self, now: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        self.read(move |c| {
            c.prepare_cached(schema::DUE_EXPIRIES)?
                .query_map(params![now, limit as i64], |r| r.get(0))?
                .collect()
        })
        .await
    }

    async fn revoked(&self, backend: &str) -> Result<Vec<(String, Revocation)>, StoreError> {
        let backend = backend.to_owned();
        self.read(move |c| {
            c.prepare_cached(schema::REVOKED_OF_BACKEND)?
                .query_map(params![backend], |r| {
                    let serial: String = r.get(0)?;
                    let reason: String = r.get(2)?;
                    let reason = ecs_ca_backends::RevocationReason::from_name(&reason)
                        .ok_or_else(|| corrupt(2, format!("cert {serial}: reason {reason:?}")))?;
                    Ok((
                        serial,
                        Revocation {
                            at: r.get(1)?,
                            reason,
                        },
                    ))
                })?
                .collect()
        })
        .await
    }

    async fn purge_spent_tokens(&self, before: i64) -> Result<usize, StoreError> {
        Writes::purge_spent_tokens(self, before).await
    }

    async fn next_crl_number(&self, backend: &str) -> Result<u64, StoreError> {
        Writes::next_crl_number(self, backend).await
    }

    async fn audit_records(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        self.read(move |c| {
            c.prepare_cached(schema::AUDIT_RECORDS)?
                .query_map(params![from as i64, limit as i64], audit_row)?
                .collect()
        })
        .await
    }

    async fn audit_head(&self) -> Result<(u64, String), StoreError> {
        self.read(read_head).await
    }

    async fn counts(&self) -> Result<StoreCounts, StoreError> {
        self.read(|c| {
            let active: i64 = c.query_row(schema::COUNT_ACTIVE, [], |r| r.get(0))?;
            let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            let page_size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            Ok(StoreCounts {
                active_registrations: active as usize,
                audit_records: read_head(c)?.0,
                bytes: (pages * page_size) as u64,
            })
        })
        .await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Writes::flush(self).await
    }

    async fn backup(&self, sink: BackupSink) -> Result<(), StoreError> {
        self.read(move |c| {
            // One read transaction: a WAL snapshot of one moment, while the writer goes on.
            c.execute_batch("BEGIN")?;
            let result = dump(c, &mut |item| sink.blocking_send(item).is_ok());
            c.execute_batch("COMMIT")?;
            result
        })
        .await
    }

    async fn active_registrations(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(RegistrationRecord, CertRecord)>, StoreError> {
        let after = after.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "{REGISTRATION_SELECT} WHERE state = 'active' AND id > $1 ORDER BY id LIMIT $2"
            ))?;
            let regs = stmt
                .query_map(params![after, limit as i64], |r| registration_row(c, r))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut out = Vec::with_capacity(regs.len());
            for reg in regs {
                if let Some(cert) = one_cert(c, &reg.current_cert)? {
                    out.push((reg, cert));
                }
            }
            Ok(out)
        })
        .await
    }
}
