//! The writes of the SQL engines, as messages to their one writer (a thread for SQLite, a
//! task for PostgreSQL): what a job asks, what it answers, and the [`Store`] write methods
//! in terms of sending one. Each engine's writer takes every job waiting at that moment
//! into one transaction (group commit).

use super::{AuditEvent, AuditRecord, Commit, StoreError};
use tokio::sync::oneshot;

pub(super) enum Work {
    Commit(Box<Commit>),
    CommitAll(Vec<Commit>),
    NextCrlNumber(String),
    Purge(i64),
}

impl Work {
    /// The commits a job carries.
    pub(super) fn commits(&self) -> &[Commit] {
        match self {
            Work::Commit(c) => std::slice::from_ref(c.as_ref()),
            Work::CommitAll(cs) => cs,
            Work::NextCrlNumber(_) | Work::Purge(_) => &[],
        }
    }
}

pub(super) enum Done {
    Audit(Option<Box<AuditRecord>>),
    Unit,
    Number(u64),
    Count(usize),
}

pub(super) struct Job {
    pub(super) work: Work,
    pub(super) reply: oneshot::Sender<Result<Done, StoreError>>,
}

/// An engine with a writer: hands it a job and awaits the answer.
#[async_trait::async_trait]
pub(super) trait Writes: Send + Sync {
    async fn write(&self, work: Work) -> Result<Done, StoreError>;

    async fn commit(&self, c: Commit) -> Result<Option<AuditRecord>, StoreError> {
        match self.write(Work::Commit(Box::new(c))).await? {
            Done::Audit(a) => Ok(a.map(|a| *a)),
            _ => unreachable!("a commit answers with its audit record"),
        }
    }

    async fn commit_all(&self, cs: Vec<Commit>) -> Result<(), StoreError> {
        self.write(Work::CommitAll(cs)).await.map(|_| ())
    }

    async fn record(&self, event: AuditEvent) -> Result<Option<AuditRecord>, StoreError> {
        self.commit(Commit {
            audit: Some(event),
            ..Default::default()
        })
        .await
    }

    async fn purge_spent_tokens(&self, before: i64) -> Result<usize, StoreError> {
        match self.write(Work::Purge(before)).await? {
            Done::Count(n) => Ok(n),
            _ => unreachable!("a purge answers with a count"),
        }
    }

    async fn next_crl_number(&self, backend: &str) -> Result<u64, StoreError> {
        match self.write(Work::NextCrlNumber(backend.to_owned())).await? {
            Done::Number(n) => Ok(n),
            _ => unreachable!("a CRL number answers with a number"),
        }
    }

    /// Every write is durable when it is answered; an empty job through the writer waits
    /// for the ones before it.
    async fn flush(&self) -> Result<(), StoreError> {
        self.write(Work::CommitAll(Vec::new())).await.map(|_| ())
    }
}
