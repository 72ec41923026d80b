//! PostgreSQL: one database that several `ecsd` replicas share, the tables of
//! [`schema`](super::schema).
//!
//! Every rule that keeps the ECS safe across replicas is the database's: a token ID spent
//! once, one active registration per EES ID and a serial used once are constraints; a
//! change to a registration finds it as its request saw it ([`schema::HOLD_IF_CURRENT`]);
//! CRL numbers are one row each, raised in place. The audit log is one hash chain for all
//! replicas: a transaction that appends to it first takes a transaction-scoped advisory
//! lock, then reads the head, so appends from any replica follow one another.
//!
//! Each replica has one writer task with its own connection. Like the SQLite writer, it
//! takes every commit waiting at that moment into one transaction, one savepoint each
//! (group commit): a refused commit rolls back alone, and the COMMIT answers everyone in
//! the group, only once the database has made it durable. Reads use a pool.

use super::schema::{self, Dialect};
use super::writes::{Done, Job, Work, Writes};
use super::*;
use crate::audit::GENESIS_HASH;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::path::Path;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Statement};

/// The most commits one transaction takes: bounds the latency of the first in a burst.
const GROUP_MAX: usize = 256;
/// The longest a connection attempt, a pooled read or a group's transaction may take
/// before the store is reported unavailable (a database behind a dead network answers
/// nothing, and a request must not hang on it).
const PATIENCE: Duration = Duration::from_secs(10);
/// Advisory lock keys (an arbitrary constant each, "ECS" then a number): the audit chain's
/// head, and the schema migrations.
const AUDIT_LOCK: i64 = 0x4543_5300_0000_0001;
const MIGRATION_LOCK: i64 = 0x4543_5300_0000_0002;

pub struct PostgresStore {
    pool: Pool,
    jobs: mpsc::UnboundedSender<Job>,
    /// `host:port/database`, for messages (never the password).
    label: String,
}

/// TLS to the database: verified against `tls_ca`, or none (loopback, a private network).
#[derive(Clone)]
enum Tls {
    Plain,
    Verified(tokio_postgres_rustls::MakeRustlsConnect),
}

/// What opening needs, kept by the writer to reconnect.
#[derive(Clone)]
struct Target {
    config: tokio_postgres::Config,
    tls: Tls,
    label: String,
}

impl Target {
    async fn connect(&self) -> Result<Client, StoreError> {
        let fail =
            |e: tokio_postgres::Error| StoreError::Io(format!("{}: {}", self.label, describe(&e)));
        let connecting = async {
            match &self.tls {
                Tls::Plain => {
                    let (client, conn) = self.config.connect(NoTls).await.map_err(fail)?;
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    Ok(client)
                }
                Tls::Verified(t) => {
                    let (client, conn) = self.config.connect(t.clone()).await.map_err(fail)?;
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    Ok(client)
                }
            }
        };
        tokio::time::timeout(PATIENCE, connecting)
            .await
            .map_err(|_| StoreError::Io(format!("{}: no answer in {PATIENCE:?}", self.label)))?
    }
}

fn db_error(label: &str) -> impl Fn(tokio_postgres::Error) -> StoreError + '_ {
    move |e| StoreError::Io(format!("{label}: {}", describe(&e)))
}

/// The server's own message when there is one (tokio-postgres's `Display` says only
/// "db error"), else the error with its causes ("error performing TLS handshake: invalid
/// peer certificate: UnknownIssuer").
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.code().code(), db.message());
    }
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        out.push_str(&format!(": {c}"));
        cause = c.source();
    }
    out
}

impl PostgresStore {
    /// Connects, migrates the schema under an advisory lock (replicas starting together on
    /// an empty database are safe) and starts the writer.
    pub async fn open(cfg: &StorageConfig) -> Result<Self, StoreError> {
        let url = cfg.url.as_deref().unwrap_or_default();
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Unusable(format!("storage.url: {e}")))?;
        if let Some(spec) = &cfg.password {
            // A relative file: was made absolute against the configuration's folder.
            let password = crate::secrets::resolve(spec, "storage.password", Path::new("/"))
                .map_err(StoreError::Unusable)?;
            config.password(password.as_bytes());
        }
        config
            .application_name("ecsd")
            .connect_timeout(PATIENCE)
            .keepalives_idle(Duration::from_secs(30));
        let label = label_of(&config);
        let tls = match &cfg.tls_ca {
            None => Tls::Plain,
            Some(ca) => {
                let pem = crate::files::read(ca).map_err(|e| {
                    StoreError::Unusable(format!("storage.tls_ca: {}: {e}", ca.display()))
                })?;
                let roots = crate::client::root_store(&pem).map_err(|e| {
                    StoreError::Unusable(format!("storage.tls_ca: {}: {e}", ca.display()))
                })?;
                let tls = rustls::ClientConfig::builder_with_provider(crate::client::provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| StoreError::Unusable(format!("storage.tls_ca: {e}")))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                // Without TLS the connection must fail, never fall back to plain text.
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                Tls::Verified(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
            }
        };
        let target = Target {
            config: config.clone(),
            tls: tls.clone(),
            label: label.clone(),
        };
        let mut writer = target.connect().await?;
        migrate(&mut writer, &label).await?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match tls {
            Tls::Plain => Manager::from_config(config, NoTls, manager_config),
            Tls::Verified(t) => Manager::from_config(config, t, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(PATIENCE))
            .create_timeout(Some(PATIENCE))
            .recycle_timeout(Some(PATIENCE))
            .build()
            .map_err(|e| StoreError::Io(format!("{label}: {e}")))?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(
            Writer {
                target,
                client: Some(writer),
                statements: None,
            }
            .run(rx),
        );
        Ok(PostgresStore {
            pool,
            jobs: tx,
            label,
        })
    }

    /// A pooled connection, or the store reported unavailable.
    async fn reader(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Io(format!("{}: {e}", self.label)))
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let c = self.reader().await?;
        let fail = db_error(&self.label);
        let stmt = c.prepare_cached(sql).await.map_err(&fail)?;
        tokio::time::timeout(PATIENCE, c.query(&stmt, params))
            .await
            .map_err(|_| StoreError::Io(format!("{}: no answer in {PATIENCE:?}", self.label)))?
            .map_err(fail)
    }

    async fn registrations_from(
        &self,
        rows: Vec<Row>,
    ) -> Result<Vec<RegistrationRecord>, StoreError> {
        let ids: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        let mut serials: std::collections::HashMap<String, Vec<String>> = Default::default();
        for r in self.query(CERT_SERIALS_OF_MANY, &[&ids]).await? {
            serials
                .entry(r.get::<_, String>(0))
                .or_default()
                .push(r.get(1));
        }
        rows.iter()
            .map(|r| {
                let id: String = r.get(0);
                let certs = serials.remove(&id).unwrap_or_default();
                registration_from(r, certs)
            })
            .collect()
    }
}

/// `host:port/database` of a connection's configuration.
fn label_of(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "PostgreSQL {host}:{port}/{}",
        config.get_dbname().unwrap_or("")
    )
}

async fn migrate(client: &mut Client, label: &str) -> Result<(), StoreError> {
    let fail =
        |e: tokio_postgres::Error| StoreError::Unusable(format!("{label}: {}", describe(&e)));
    let tx = client.transaction().await.map_err(fail)?;
    // Held to the end of the transaction: replicas starting together migrate one at a time,
    // and each after the first finds the work done.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(fail)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        .await
        .map_err(fail)?;
    let current: i64 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
        .await
        .map_err(fail)?
        .get(0);
    let latest = schema::latest_version();
    if current > latest {
        return Err(StoreError::Unusable(format!(
            "{label}: the store's schema is version {current}, newer than this ecsd's {latest}: \
             run the newer ecsd that wrote it"
        )));
    }
    for (i, ddl) in Dialect::Postgres.migrations().iter().enumerate() {
        let version = i as i64 + 1;
        if version <= current {
            continue;
        }
        tx.batch_execute(ddl).await.map_err(fail)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(fail)?;
        tracing::info!(version, store = %label, "store schema migrated");
    }
    tx.commit().await.map_err(fail)
}

/// The writer's statements, prepared once per connection.
struct Statements {
    spend_token: Statement,
    hold_if_current: Statement,
    upsert_registration: Statement,
    insert_certificate: Statement,
    revoke: Statement,
    raise_crl_number: Statement,
    append_audit: Statement,
    audit_head: Statement,
    audit_lock: Statement,
    next_crl_number: Statement,
    purge: Statement,
}

impl Statements {
    async fn prepare(c: &Client) -> Result<Self, tokio_postgres::Error> {
        Ok(Statements {
            spend_token: c.prepare(schema::SPEND_TOKEN).await?,
            hold_if_current: c.prepare(schema::HOLD_IF_CURRENT).await?,
            upsert_registration: c.prepare(schema::UPSERT_REGISTRATION).await?,
            insert_certificate: c.prepare(schema::INSERT_CERTIFICATE).await?,
            revoke: c.prepare(schema::REVOKE).await?,
            raise_crl_number: c.prepare(schema::RAISE_CRL_NUMBER).await?,
            append_audit: c.prepare(APPEND_AUDIT_MANY).await?,
            audit_head: c.prepare(schema::AUDIT_HEAD).await?,
            audit_lock: c.prepare("SELECT pg_advisory_xact_lock($1)").await?,
            next_crl_number: c.prepare(schema::NEXT_CRL_NUMBER).await?,
            purge: c.prepare(schema::PURGE_SPENT_TOKENS).await?,
        })
    }
}

/// The writer task: this replica's one read-write connection.
struct Writer {
    target: Target,
    client: Option<Client>,
    statements: Option<Statements>,
}

impl Writer {
    async fn run(mut self, mut jobs: mpsc::UnboundedReceiver<Job>) {
        while let Some(first) = jobs.recv().await {
            let mut group = vec![first];
            while group.len() < GROUP_MAX {
                match jobs.try_recv() {
                    Ok(j) => group.push(j),
                    Err(_) => break,
                }
            }
            self.run_group(group).await;
        }
    }

    /// A connection with its statements: the one kept, or a new one when it broke (the
    /// database restarted, the network failed).
    async fn ready(&mut self) -> Result<(), StoreError> {
        if self.client.as_ref().is_some_and(|c| !c.is_closed()) && self.statements.is_some() {
            return Ok(());
        }
        self.statements = None;
        let client = match self.client.take() {
            Some(c) if !c.is_closed() => c,
            _ => self.target.connect().await?,
        };
        let statements = Statements::prepare(&client)
            .await
            .map_err(db_error(&self.target.label))?;
        self.client = Some(client);
        self.statements = Some(statements);
        Ok(())
    }

    async fn run_group(&mut self, group: Vec<Job>) {
        let outcome = tokio::time::timeout(PATIENCE, self.transact(&group)).await;
        let outcome = match outcome {
            Ok(o) => o,
            Err(_) => Err(StoreError::Io(format!(
                "{}: no answer in {PATIENCE:?}",
                self.target.label
            ))),
        };
        match outcome {
            Ok(results) => {
                for (job, result) in group.into_iter().zip(results) {
                    let _ = job.reply.send(result);
                }
            }
            Err(e) => {
                // Nothing of the group committed (or, if the connection died during the
                // COMMIT, nobody can tell: the callers hear "unavailable", never a success
                // that might not have happened). A connection in an unknown state is not
                // reused.
                self.client = None;
                self.statements = None;
                for job in group {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// One transaction for the group; Err when the transaction itself failed.
    ///
    /// Each job is a savepoint whose statements go out as one pipeline. The audit records
    /// of the jobs that succeeded are chained last, in one statement, after taking the
    /// chain's lock: the lock is held only from there to the COMMIT, so replicas append in
    /// turn without waiting on each other's whole group.
    async fn transact(
        &mut self,
        group: &[Job],
    ) -> Result<Vec<Result<Done, StoreError>>, StoreError> {
        self.ready().await?;
        let label = self.target.label.clone();
        let fail = db_error(&label);
        let client = self.client.as_ref().expect("ready");
        let st = self.statements.as_ref().expect("ready");
        client.batch_execute("BEGIN").await.map_err(&fail)?;
        let mut results = match apply_pipelined(client, st, &label, group).await? {
            Some(done) => done.into_iter().map(Ok).collect(),
            None => apply_each(client, st, &label, group).await?,
        };
        // The events to chain, each with the job it belongs to.
        let mut events: Vec<(usize, AuditEvent)> = Vec::new();
        for (i, (job, result)) in group.iter().zip(&results).enumerate() {
            if result.is_ok() {
                for c in job.work.commits() {
                    events.extend(c.audit.iter().map(|e| (i, e.clone())));
                }
            }
        }
        if !events.is_empty() {
            let records = chain(client, st, &label, events.iter().map(|(_, e)| e)).await?;
            for ((i, _), rec) in events.iter().zip(records) {
                if let Ok(Done::Audit(slot)) = &mut results[*i] {
                    *slot = Some(Box::new(rec));
                }
            }
        }
        client.batch_execute("COMMIT").await.map_err(&fail)?;
        Ok(results)
    }
}

/// The group's jobs one after the other, each in its savepoint: a job that fails is rolled
/// back alone, and the others go on.
async fn apply_each(
    client: &Client,
    st: &Statements,
    label: &str,
    group: &[Job],
) -> Result<Vec<Result<Done, StoreError>>, StoreError> {
    let mut results = Vec::with_capacity(group.len());
    for job in group {
        match apply(client, st, label, &job.work).await {
            Ok(done) => results.push(Ok(done)),
            Err(e) => {
                undo(
                    client,
                    label,
                    "ROLLBACK TO SAVEPOINT job; RELEASE SAVEPOINT job",
                    &e,
                )
                .await?;
                results.push(Err(e));
            }
        }
    }
    Ok(results)
}

/// After `failed`: runs `sql` (a rollback) to go on with the group; on a closed connection
/// the group fails with `failed`.
async fn undo(
    client: &Client,
    label: &str,
    sql: &str,
    failed: &StoreError,
) -> Result<(), StoreError> {
    if client.is_closed() {
        return Err(failed.clone());
    }
    client.batch_execute(sql).await.map_err(db_error(label))
}

/// The group's jobs as one pipeline (up to [`PIPELINE_MAX`] jobs per round trip), when each
/// is a commit whose savepoint is released within its own statements: a group of new
/// registrations waits for one answer instead of one per job. Once one job fails, the
/// statements after it fail too (the transaction is aborted): then nothing is kept, the
/// transaction begins again, and `None` says to apply the jobs one by one.
async fn apply_pipelined(
    client: &Client,
    st: &Statements,
    label: &str,
    group: &[Job],
) -> Result<Option<Vec<Done>>, StoreError> {
    let pipelines = |w: &Work| matches!(w, Work::Commit(c) if c.expect_current.is_none());
    if group.len() < 2 || !group.iter().all(|j| pipelines(&j.work)) {
        return Ok(None);
    }
    let mut done = Vec::with_capacity(group.len());
    for jobs in group.chunks(PIPELINE_MAX) {
        let answers =
            futures_util::future::join_all(jobs.iter().map(|j| apply(client, st, label, &j.work)))
                .await;
        for answer in answers {
            match answer {
                Ok(d) => done.push(d),
                Err(e) => {
                    undo(client, label, "ROLLBACK; BEGIN", &e).await?;
                    return Ok(None);
                }
            }
        }
    }
    Ok(Some(done))
}

/// Appends `events` to the audit chain, in order: takes the chain's lock (to the end of the
/// transaction: whichever replica appends next reads the head this one leaves), reads the
/// head, and inserts every record in one statement.
async fn chain(
    c: &Client,
    st: &Statements,
    label: &str,
    events: impl Iterator<Item = &AuditEvent>,
) -> Result<Vec<AuditRecord>, StoreError> {
    let fail = db_error(label);
    // One after the other, never pipelined: the head must be read by a statement that
    // starts after the lock is held (each statement reads the last committed state).
    c.execute(&st.audit_lock, &[&AUDIT_LOCK])
        .await
        .map_err(&fail)?;
    let head = c.query_opt(&st.audit_head, &[]).await.map_err(&fail)?;
    let (mut seq, mut prev) = head.map_or_else(
        || (0, GENESIS_HASH.to_string()),
        |r| (r.get::<_, i64>(0) as u64, r.get(1)),
    );
    let mut records = Vec::new();
    let (mut seqs, mut hashes, mut jsons) = (Vec::new(), Vec::new(), Vec::new());
    for event in events {
        let rec = AuditRecord::chained(seq + 1, prev, event.clone());
        seqs.push(rec.seq as i64);
        hashes.push(rec.hash.clone());
        jsons.push(serde_json::to_string(&rec).expect("records serialise"));
        (seq, prev) = (rec.seq, rec.hash.clone());
        records.push(rec);
    }
    c.execute(&st.append_audit, &[&seqs, &hashes, &jsons])
        .await
        .map_err(&fail)?;
    Ok(records)
}

/// Runs a job in its savepoint (left open on an error, for the caller to roll back to).
async fn apply(c: &Client, st: &Statements, label: &str, work: &Work) -> Result<Done, StoreError> {
    let fail = db_error(label);
    match work {
        Work::Commit(commit) => apply_commit(c, st, label, commit)
            .await
            .map(|()| Done::Audit(None)),
        Work::CommitAll(cs) => {
            c.batch_execute("SAVEPOINT job").await.map_err(&fail)?;
            for commit in cs {
                apply_statements(c, st, label, commit, false).await?;
            }
            c.batch_execute("RELEASE SAVEPOINT job")
                .await
                .map_err(&fail)?;
            Ok(Done::Unit)
        }
        Work::NextCrlNumber(backend) => {
            c.batch_execute("SAVEPOINT job").await.map_err(&fail)?;
            let n: i64 = c
                .query_one(&st.next_crl_number, &[backend])
                .await
                .map_err(&fail)?
                .get(0);
            c.batch_execute("RELEASE SAVEPOINT job")
                .await
                .map_err(&fail)?;
            Ok(Done::Number(n as u64))
        }
        Work::Purge(before) => {
            c.batch_execute("SAVEPOINT job").await.map_err(&fail)?;
            let n = c.execute(&st.purge, &[before]).await.map_err(&fail)?;
            c.batch_execute("RELEASE SAVEPOINT job")
                .await
                .map_err(&fail)?;
            Ok(Done::Count(n as usize))
        }
    }
}

/// One commit in its own savepoint.
async fn apply_commit(
    c: &Client,
    st: &Statements,
    label: &str,
    commit: &Commit,
) -> Result<(), StoreError> {
    apply_statements(c, st, label, commit, true).await
}

/// What a statement's failure (or its row count) means.
#[derive(Clone, Copy)]
enum Step {
    Savepoint,
    SpendToken,
    Hold,
    Registration,
    Certificate,
    Other,
}

type Pending<'a> = futures_util::future::BoxFuture<'a, Result<u64, tokio_postgres::Error>>;

/// The statements of one commit (but its audit record), sent as one pipeline: tokio-postgres
/// sends a request when its future is first polled, and `join_all` polls a short list in
/// order, so the server gets them in this order without waiting for each answer. A long
/// list (a re-key's many revocations) is sent one statement after the other. With
/// `savepoint`, the pipeline opens the job's savepoint and, unless the commit must find the
/// registration unchanged (then the answer decides), releases it.
async fn apply_statements(
    c: &Client,
    st: &Statements,
    label: &str,
    commit: &Commit,
    savepoint: bool,
) -> Result<(), StoreError> {
    let fail = db_error(label);
    // The owned values the statements borrow.
    let reg = commit.registration.as_ref();
    let profile = reg.map(|r| serde_json::to_string(&r.profile).expect("JSON values serialise"));
    let ees_key = reg.map(|r| r.ees_id.to_ascii_lowercase());
    let certs = commit
        .new_certs
        .iter()
        .map(|cert| (cert.der.as_slice(), schema::join_chain(cert)))
        .collect::<Vec<_>>();
    let raised: Vec<i64> = commit
        .raise_crl_numbers
        .iter()
        .map(|(_, n)| *n as i64)
        .collect();
    let simple = |sql: &'static str| -> Pending<'_> {
        Box::pin(async move { c.batch_execute(sql).await.map(|()| 0) })
    };

    let mut steps: Vec<(Step, Pending<'_>)> = Vec::new();
    if savepoint {
        steps.push((Step::Savepoint, simple("SAVEPOINT job")));
    }
    if let Some(t) = &commit.spend_token {
        steps.push((
            Step::SpendToken,
            Box::pin(async move { c.execute(&st.spend_token, &[&t.iss, &t.jti, &t.exp]).await }),
        ));
    }
    if let (Some(r), Some(expected)) = (reg, &commit.expect_current) {
        steps.push((
            Step::Hold,
            Box::pin(async move { c.execute(&st.hold_if_current, &[&r.id, expected]).await }),
        ));
    }
    if let (Some(r), Some(profile), Some(ees_key)) = (reg, &profile, &ees_key) {
        steps.push((
            Step::Registration,
            Box::pin(async move {
                c.execute(
                    &st.upsert_registration,
                    &[
                        &r.id,
                        &r.state.name(),
                        &r.ees_id,
                        ees_key,
                        &r.prov_id,
                        &r.domain,
                        &r.backend,
                        profile,
                        &r.exp_time,
                        &r.supp_feat,
                        &r.created_at,
                        &r.updated_at,
                        &r.cert_source.name(),
                        &r.current_cert,
                        &r.secret_token_hash,
                        &r.token_issuer,
                    ],
                )
                .await
            }),
        ));
    }
    for (cert, (der, chain)) in commit.new_certs.iter().zip(&certs) {
        let revoked = cert.revoked.as_ref();
        steps.push((
            Step::Certificate,
            Box::pin(async move {
                c.execute(
                    &st.insert_certificate,
                    &[
                        &cert.serial,
                        &cert.registration_id,
                        &cert.backend,
                        der,
                        &cert.fingerprint,
                        &cert.not_before,
                        &cert.not_after,
                        &revoked.map(|r| r.at),
                        &revoked.map(|r| r.reason.name()),
                        chain,
                    ],
                )
                .await
            }),
        ));
    }
    for (serial, rev) in &commit.revocations {
        steps.push((
            Step::Other,
            Box::pin(async move {
                c.execute(&st.revoke, &[&rev.at, &rev.reason.name(), serial])
                    .await
            }),
        ));
    }
    for ((backend, _), number) in commit.raise_crl_numbers.iter().zip(&raised) {
        steps.push((
            Step::Other,
            Box::pin(async move { c.execute(&st.raise_crl_number, &[backend, number]).await }),
        ));
    }
    let release_now = savepoint && commit.expect_current.is_none();
    if release_now {
        steps.push((Step::Savepoint, simple("RELEASE SAVEPOINT job")));
    }

    let (kinds, futures): (Vec<Step>, Vec<Pending<'_>>) = steps.into_iter().unzip();
    let answers = if futures.len() <= PIPELINE_MAX {
        futures_util::future::join_all(futures).await
    } else {
        let mut out = Vec::with_capacity(futures.len());
        for f in futures {
            out.push(f.await);
        }
        out
    };
    // The first failure is the cause (what follows it failed because the transaction
    // was aborted by then).
    for (kind, answer) in kinds.into_iter().zip(answers) {
        let refusal = match kind {
            Step::SpendToken => Some(StoreError::TokenReplayed),
            Step::Registration => Some(StoreError::EesAlreadyRegistered),
            Step::Certificate => Some(StoreError::SerialCollision),
            Step::Savepoint | Step::Hold | Step::Other => None,
        };
        match answer {
            Err(e) => {
                return Err(match (e.code(), refusal) {
                    (Some(code), Some(why)) if *code == SqlState::UNIQUE_VIOLATION => why,
                    _ => fail(e),
                });
            }
            Ok(0) if matches!(kind, Step::Hold) => return Err(StoreError::Changed),
            Ok(_) => {}
        }
    }
    if savepoint && !release_now {
        c.batch_execute("RELEASE SAVEPOINT job")
            .await
            .map_err(&fail)?;
    }
    Ok(())
}

/// The longest list of statements sent as one pipeline (`join_all` polls up to this many
/// in order).
const PIPELINE_MAX: usize = 30;

const REGISTRATION_SELECT: &str = "SELECT id, state, ees_id, prov_id, domain, backend, \
     profile, exp_time, supp_feat, created_at, updated_at, cert_source, current_cert, \
     secret_token_hash, token_issuer FROM registrations";

const CERTIFICATE_SELECT: &str = "SELECT serial, registration_id, backend, der, fingerprint, \
     not_before, not_after, revoked_at, revocation_reason, chain FROM certificates";

/// The serials of several registrations at once, each one's oldest first.
const CERT_SERIALS_OF_MANY: &str = "SELECT registration_id, serial FROM certificates \
     WHERE registration_id = ANY($1) ORDER BY registration_id, seq";

fn registration_from(r: &Row, certs: Vec<String>) -> Result<RegistrationRecord, StoreError> {
    let id: String = r.get(0);
    let corrupt = |detail: String| StoreError::Corrupt {
        key: format!("registration {id}"),
        detail,
    };
    let state: String = r.get(1);
    let profile: String = r.get(6);
    let source: String = r.get(11);
    Ok(RegistrationRecord {
        state: RegState::from_name(&state).ok_or_else(|| corrupt(format!("state {state:?}")))?,
        ees_id: r.get(2),
        prov_id: r.get(3),
        domain: r.get(4),
        backend: r.get(5),
        profile: serde_json::from_str(&profile).map_err(|e| corrupt(format!("profile: {e}")))?,
        exp_time: r.get(7),
        supp_feat: r.get(8),
        created_at: r.get(9),
        updated_at: r.get(10),
        cert_source: CertSource::from_name(&source)
            .ok_or_else(|| corrupt(format!("cert_source {source:?}")))?,
        current_cert: r.get(12),
        certs,
        secret_token_hash: r.get(13),
        token_issuer: r.get(14),
        id: id.clone(),
    })
}

fn cert_from(r: &Row) -> Result<CertRecord, StoreError> {
    let serial: String = r.get(0);
    let der: Vec<u8> = r.get(3);
    let (revoked, chain) = schema::revocation_and_chain(&serial, r.get(7), r.get(8), r.get(9))?;
    Ok(CertRecord {
        registration_id: r.get(1),
        backend: r.get(2),
        der,
        fingerprint: r.get(4),
        not_before: r.get(5),
        not_after: r.get(6),
        revoked,
        chain,
        serial,
    })
}

fn audit_from(r: &Row) -> Result<AuditRecord, StoreError> {
    let json: String = r.get(0);
    serde_json::from_str(&json).map_err(|e| StoreError::Corrupt {
        key: "audit_log".into(),
        detail: e.to_string(),
    })
}

fn exists(rows: Vec<Row>) -> bool {
    !rows.is_empty()
}

#[async_trait::async_trait]
impl Writes for PostgresStore {
    async fn write(&self, work: Work) -> Result<Done, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { work, reply })
            .map_err(|_| StoreError::Io("the store's writer stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Io("the store's writer stopped".into()))?
    }
}

#[async_trait::async_trait]
impl Store for PostgresStore {
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
        let rows = self
            .query(&format!("{REGISTRATION_SELECT} WHERE id = $1"), &[&id])
            .await?;
        Ok(self.registrations_from(rows).await?.pop())
    }

    async fn active_registration_for(&self, ees_id: &str) -> Result<Option<String>, StoreError> {
        let key = ees_id.to_ascii_lowercase();
        let rows = self.query(schema::ACTIVE_FOR_EES, &[&key]).await?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    async fn cert(&self, serial: &str) -> Result<Option<CertRecord>, StoreError> {
        let rows = self
            .query(
                &format!("{CERTIFICATE_SELECT} WHERE serial = $1"),
                &[&serial],
            )
            .await?;
        rows.first().map(cert_from).transpose()
    }

    async fn third_party_cert_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Option<CertRecord>, StoreError> {
        let rows = self
            .query(
                &format!(
                    "{CERTIFICATE_SELECT} {}",
                    schema::THIRD_PARTY_BY_FINGERPRINT
                ),
                &[&fingerprint],
            )
            .await?;
        rows.first().map(cert_from).transpose()
    }

    async fn token_spent(&self, iss: &str, jti: &str) -> Result<bool, StoreError> {
        Ok(exists(
            self.query(schema::TOKEN_SPENT, &[&iss, &jti]).await?,
        ))
    }

    async fn check_claims(&self, iss: &str, jti: &str, ees_id: &str) -> Result<(), StoreError> {
        let key = ees_id.to_ascii_lowercase();
        let rows = self.query(CLAIMS, &[&key, &iss, &jti]).await?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::Io(format!("{}: no answer to a claim check", self.label)))?;
        judge_claims(row.get(0), row.get(1))
    }

    async fn due_expiries(&self, now: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        let rows = self
            .query(schema::DUE_EXPIRIES, &[&now, &(limit as i64)])
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn revoked(&self, backend: &str) -> Result<Vec<(String, Revocation)>, StoreError> {
        let rows = self.query(schema::REVOKED_OF_BACKEND, &[&backend]).await?;
        rows.iter()
            .map(|r| {
                let serial: String = r.get(0);
                let (revoked, _) = schema::revocation_and_chain(&serial, r.get(1), r.get(2), None)?;
                let revoked = revoked.ok_or_else(|| StoreError::Corrupt {
                    key: format!("cert/{serial}"),
                    detail: "revoked without a reason".into(),
                })?;
                Ok((serial, revoked))
            })
            .collect()
    }

    async fn purge_spent_tokens(&self, before: i64) -> Result<usize, StoreError> {
        Writes::purge_spent_tokens(self, before).await
    }

    async fn next_crl_number(&self, backend: &str) -> Result<u64, StoreError> {
        Writes::next_crl_number(self, backend).await
    }

    async fn audit_records(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = self
            .query(schema::AUDIT_RECORDS, &[&(from as i64), &(limit as i64)])
            .await?;
        rows.iter().map(audit_from).collect()
    }

    async fn audit_head(&self) -> Result<(u64, String), StoreError> {
        let rows = self.query(schema::AUDIT_HEAD, &[]).await?;
        Ok(rows.first().map_or_else(
            || (0, GENESIS_HASH.to_string()),
            |r| (r.get::<_, i64>(0) as u64, r.get(1)),
        ))
    }

    async fn counts(&self) -> Result<StoreCounts, StoreError> {
        let active: i64 = self.query(schema::COUNT_ACTIVE, &[]).await?[0].get(0);
        let bytes: i64 = self
            .query("SELECT pg_database_size(current_database())", &[])
            .await?[0]
            .get(0);
        Ok(StoreCounts {
            active_registrations: active as usize,
            audit_records: self.audit_head().await?.0,
            bytes: bytes as u64,
        })
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Writes::flush(self).await
    }

    async fn backup(&self, sink: BackupSink) -> Result<(), StoreError> {
        let mut c = self.reader().await?;
        let fail = db_error(&self.label);
        // One snapshot for the whole dump, while every replica goes on writing.
        let tx = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(&fail)?;
        let mut after = String::new();
        loop {
            let rows = tx
                .query(
                    &format!("{REGISTRATION_SELECT} WHERE id > $1 ORDER BY id LIMIT 500"),
                    &[&after],
                )
                .await
                .map_err(&fail)?;
            let Some(last) = rows.last() else { break };
            after = last.get(0);
            let ids: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
            let mut certs: std::collections::HashMap<String, Vec<CertRecord>> = Default::default();
            for r in tx
                .query(
                    &format!("{CERTIFICATE_SELECT} WHERE registration_id = ANY($1) ORDER BY registration_id, seq"),
                    &[&ids],
                )
                .await
                .map_err(&fail)?
            {
                let cert = cert_from(&r)?;
                certs.entry(cert.registration_id.clone()).or_default().push(cert);
            }
            for r in &rows {
                let id: String = r.get(0);
                let certificates = certs.remove(&id).unwrap_or_default();
                let serials = certificates.iter().map(|c| c.serial.clone()).collect();
                let item = BackupItem::Registration {
                    registration: registration_from(r, serials)?,
                    certificates,
                };
                if sink.send(item).await.is_err() {
                    return Ok(());
                }
            }
        }
        for r in tx
            .query(
                "SELECT iss, jti, exp FROM spent_tokens ORDER BY iss, jti",
                &[],
            )
            .await
            .map_err(&fail)?
        {
            let t = SpentToken {
                iss: r.get(0),
                jti: r.get(1),
                exp: r.get(2),
            };
            if sink.send(BackupItem::SpentToken(t)).await.is_err() {
                return Ok(());
            }
        }
        for r in tx.query(schema::CRL_NUMBERS, &[]).await.map_err(&fail)? {
            let item = BackupItem::CrlNumber {
                backend: r.get(0),
                number: r.get::<_, i64>(1) as u64,
            };
            if sink.send(item).await.is_err() {
                return Ok(());
            }
        }
        let mut from = 1i64;
        loop {
            let rows = tx
                .query(schema::AUDIT_RECORDS, &[&from, &1000i64])
                .await
                .map_err(&fail)?;
            let Some(last) = rows.last() else { break };
            from = audit_from(last)?.seq as i64 + 1;
            for r in &rows {
                if sink.send(BackupItem::Audit(audit_from(r)?)).await.is_err() {
                    return Ok(());
                }
            }
        }
        tx.commit().await.map_err(fail)
    }

    async fn active_registrations(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(RegistrationRecord, CertRecord)>, StoreError> {
        let rows = self
            .query(
                &format!(
                    "{REGISTRATION_SELECT} WHERE state = 'active' AND id > $1 ORDER BY id LIMIT $2"
                ),
                &[&after, &(limit as i64)],
            )
            .await?;
        let regs = self.registrations_from(rows).await?;
        let serials: Vec<String> = regs.iter().map(|r| r.current_cert.clone()).collect();
        let mut certs: std::collections::HashMap<String, CertRecord> = self
            .query(
                &format!("{CERTIFICATE_SELECT} WHERE serial = ANY($1)"),
                &[&serials],
            )
            .await?
            .iter()
            .map(|r| cert_from(r).map(|c| (c.serial.clone(), c)))
            .collect::<Result<_, _>>()?;
        Ok(regs
            .into_iter()
            .filter_map(|r| certs.remove(&r.current_cert).map(|c| (r, c)))
            .collect())
    }

    fn shared(&self) -> bool {
        true
    }

    async fn revoked_count(&self, backend: &str) -> Result<u64, StoreError> {
        let n: i64 = self.query(REVOKED_COUNT, &[&backend]).await?[0].get(0);
        Ok(n as u64)
    }
}

/// Several audit records in one statement.
const APPEND_AUDIT_MANY: &str = "INSERT INTO audit_log (seq, hash, record) \
     SELECT * FROM unnest($1::BIGINT[], $2::TEXT[], $3::TEXT[])";

/// Both claims of a new registration in one round trip: the EES ID held, the token spent.
const CLAIMS: &str = "SELECT EXISTS (SELECT 1 FROM registrations WHERE ees_key = $1 AND \
     state = 'active'), EXISTS (SELECT 1 FROM spent_tokens WHERE iss = $2 AND jti = $3)";

const REVOKED_COUNT: &str =
    "SELECT count(*) FROM certificates WHERE backend = $1 AND revoked_at IS NOT NULL";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::postgres::{PASSWORD, Postgres};

    /// The lookups on every request use their own index even in a plan made on empty
    /// tables, which PostgreSQL keeps for a prepared statement until the next ANALYZE: a
    /// wrong choice there walks every registration, or every certificate, per request.
    #[tokio::test]
    async fn hot_lookups_use_their_index_when_planned_on_empty_tables() {
        let pg = Postgres::shared();
        let db = pg.create_database();
        let mut cfg = StorageConfig {
            kind: crate::config::StorageKind::Postgres,
            url: Some(pg.url(&db)),
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("db-password");
        std::fs::write(&pw, PASSWORD).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        cfg.password = Some(format!("file:{}", pw.display()));
        let _store = PostgresStore::open(&cfg).await.unwrap();
        let mut config: tokio_postgres::Config = pg.url(&db).parse().unwrap();
        config.password(PASSWORD);
        let (c, conn) = config.connect(NoTls).await.unwrap();
        tokio::spawn(conn);
        let plan = |sql: String, params: usize| {
            let c = &c;
            let nulls = vec!["NULL"; params].join(", ");
            async move {
                c.batch_execute(&format!(
                    "SET plan_cache_mode = force_generic_plan; DEALLOCATE ALL; PREPARE q AS {sql}"
                ))
                .await
                .unwrap();
                let rows = c
                    .simple_query(&format!("EXPLAIN EXECUTE q({nulls})"))
                    .await
                    .unwrap();
                rows.iter()
                    .filter_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            }
        };
        let claims = plan(CLAIMS.to_string(), 3).await;
        assert!(
            claims.contains("registrations_one_active_per_ees")
                && claims.contains("spent_tokens_pkey"),
            "{claims}"
        );
        let by_fingerprint = plan(
            format!(
                "{CERTIFICATE_SELECT} {}",
                schema::THIRD_PARTY_BY_FINGERPRINT
            ),
            1,
        )
        .await;
        assert!(
            by_fingerprint.contains("certificates_third_party_by_fingerprint"),
            "{by_fingerprint}"
        );
        let due = plan(schema::DUE_EXPIRIES.to_string(), 2).await;
        assert!(due.contains("registrations_due"), "{due}");
    }
}

#[cfg(test)]
mod schema_tests {
    use super::*;
    use crate::testing::postgres::{PASSWORD, Postgres};

    fn config(pg: &Postgres, dir: &Path) -> StorageConfig {
        let pw = dir.join("db-password");
        std::fs::write(&pw, PASSWORD).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        StorageConfig {
            kind: crate::config::StorageKind::Postgres,
            url: Some(pg.url(&pg.create_database())),
            password: Some(format!("file:{}", pw.display())),
            ..Default::default()
        }
    }

    /// Replicas starting together on an empty database: each migrates or finds it done,
    /// and the schema is there once; a newer schema than this binary's is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn replicas_starting_together_migrate_once_and_a_newer_schema_is_refused() {
        let pg = Postgres::shared();
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(pg, dir.path());
        let opening: Vec<_> = (0..4)
            .map(|_| {
                let cfg = cfg.clone();
                tokio::spawn(async move { PostgresStore::open(&cfg).await.map(|_| ()) })
            })
            .collect();
        for o in opening {
            o.await.unwrap().unwrap();
        }
        let store = PostgresStore::open(&cfg).await.unwrap();
        let versions: Vec<i64> = store
            .query("SELECT version FROM schema_version ORDER BY version", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(versions, (1..=schema::latest_version()).collect::<Vec<_>>());
        store
            .query(
                "INSERT INTO schema_version (version) VALUES ($1) RETURNING version",
                &[&(schema::latest_version() + 1)],
            )
            .await
            .unwrap();
        let err = PostgresStore::open(&cfg).await.err().expect("refused");
        assert!(
            matches!(&err, StoreError::Unusable(m) if m.contains("newer than this ecsd")),
            "{err}"
        );
    }
}
