//! The backup file: engine-neutral, so that a backup of one engine restores into any other.
//!
//! JSON Lines. The first line is a header, the last an `end` record with the counts. Every
//! line starts with a SHA-256, in hex, over the previous line's digest and this line's JSON.
//! So a line that was edited, dropped, swapped or added fails at that line, and a file that
//! lacks its `end` was cut short. The digests catch damage and careless edits, not a writer
//! who recomputes them: the audit records inside stay hash-chained, and `ecsd audit verify`
//! checks the restored chain against the signed checkpoints kept outside the store.

use super::{BackupItem, Commit, Store};
use crate::audit::{GENESIS_HASH, chain_hash};
use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::path::Path;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// The format's version, in the header.
const FORMAT: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Line {
    Header {
        ecsd_backup: u32,
        created: String,
        /// The engine it was taken from (informative).
        engine: String,
    },
    End {
        counts: Counts,
    },
    #[serde(untagged)]
    Item(Box<BackupItem>),
}

/// What a backup holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub registrations: u64,
    pub certificates: u64,
    pub spent_tokens: u64,
    pub crl_numbers: u64,
    pub audit_records: u64,
}

impl Counts {
    fn add(&mut self, item: &BackupItem) {
        match item {
            BackupItem::Registration { certificates, .. } => {
                self.registrations += 1;
                self.certificates += certificates.len() as u64;
            }
            BackupItem::SpentToken(_) => self.spent_tokens += 1,
            BackupItem::CrlNumber { .. } => self.crl_numbers += 1,
            BackupItem::Audit(_) => self.audit_records += 1,
        }
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} registrations, {} certificates, {} spent token IDs, {} CRL numbers, {} audit records",
            self.registrations,
            self.certificates,
            self.spent_tokens,
            self.crl_numbers,
            self.audit_records
        )
    }
}

/// Chains each line's digest to the one before.
struct Digest(String);

impl Digest {
    fn new() -> Self {
        Digest(GENESIS_HASH.to_string())
    }

    fn next(&mut self, json: &str) -> &str {
        self.0 = ecs_ca_backends::sha256_hex(format!("{}{json}", self.0).as_bytes());
        &self.0
    }
}

/// Writes a backup of `store` to `out`: one snapshot, streamed (memory does not grow with
/// the store).
pub async fn write(
    store: &dyn Store,
    engine: &str,
    out: &mut (dyn AsyncWrite + Unpin + Send),
) -> Result<Counts, String> {
    let (sink, items) = tokio::sync::mpsc::channel(256);
    let dump = store.backup(sink);
    let mut digest = Digest::new();
    let mut counts = Counts::default();
    let mut buf = Vec::with_capacity(1 << 16);
    let mut line = |buf: &mut Vec<u8>, l: &Line| {
        let json = serde_json::to_string(l).expect("backup lines serialise");
        buf.extend_from_slice(digest.next(&json).as_bytes());
        buf.push(b' ');
        buf.extend_from_slice(json.as_bytes());
        buf.push(b'\n');
    };
    line(
        &mut buf,
        &Line::Header {
            ecsd_backup: FORMAT,
            created: crate::clock::format_time(crate::clock::now()),
            engine: engine.to_string(),
        },
    );
    let write_items = async {
        // Owned here: if writing fails, the channel closes and the dump stops with it
        // (instead of waiting on a full channel while it holds its snapshot).
        let mut items = items;
        while let Some(item) = items.recv().await {
            counts.add(&item);
            line(&mut buf, &Line::Item(Box::new(item)));
            if buf.len() >= 1 << 16 {
                out.write_all(&buf).await.map_err(|e| e.to_string())?;
                buf.clear();
            }
        }
        Ok::<_, String>(())
    };
    let (dumped, written) = tokio::join!(dump, write_items);
    written?;
    dumped.map_err(|e| e.to_string())?;
    line(&mut buf, &Line::End { counts });
    out.write_all(&buf).await.map_err(|e| e.to_string())?;
    out.flush().await.map_err(|e| e.to_string())?;
    Ok(counts)
}

/// Reads a backup line by line, checking each digest; `each` gets every item in order.
/// Fails naming the line (and the record) at fault.
fn read(
    path: &Path,
    each: &mut dyn FnMut(BackupItem) -> Result<(), String>,
) -> Result<Counts, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let at = |n: usize, what: &str| format!("{} line {n}: {what}", path.display());
    let mut digest = Digest::new();
    let mut counts = Counts::default();
    let mut end = None;
    for (i, text) in std::io::BufReader::new(file).lines().enumerate() {
        let n = i + 1;
        let text = text.map_err(|e| at(n, &e.to_string()))?;
        if end.is_some() {
            return Err(at(
                n,
                "a line after the end record: the file was appended to",
            ));
        }
        let (given, json) = text
            .split_once(' ')
            .ok_or_else(|| at(n, "not a backup line (no digest)"))?;
        let line = parse_line(json).map_err(|e| at(n, &e.to_string()))?;
        if digest.next(json) != given {
            return Err(at(
                n,
                &format!("{} does not match its digest: altered", describe(&line)),
            ));
        }
        match (n, line) {
            (1, Line::Header { ecsd_backup, .. }) if ecsd_backup == FORMAT => {}
            (1, Line::Header { ecsd_backup, .. }) => {
                return Err(at(
                    1,
                    &format!("backup format {ecsd_backup}, this ecsd reads {FORMAT}"),
                ));
            }
            (1, _) => return Err(at(1, "no backup header: not an ecsd backup")),
            (_, Line::Header { .. }) => return Err(at(n, "a second header")),
            (_, Line::End { counts: declared }) => {
                if declared != counts {
                    return Err(at(
                        n,
                        &format!("the end record counts {declared}, the file holds {counts}"),
                    ));
                }
                end = Some(n);
            }
            (_, Line::Item(item)) => {
                counts.add(&item);
                each(*item).map_err(|e| at(n, &e))?;
            }
        }
    }
    match end {
        Some(_) => Ok(counts),
        None => Err(format!(
            "{}: no end record: the backup was cut short",
            path.display()
        )),
    }
}

/// A line by its tag: an item is parsed as an item, so that a damaged one is named by what
/// is wrong in it (an untagged variant would only say that no variant matched).
fn parse_line(json: &str) -> serde_json::Result<Line> {
    #[derive(Deserialize)]
    struct Tag<'a> {
        #[serde(borrow)]
        t: Option<std::borrow::Cow<'a, str>>,
    }
    match serde_json::from_str::<Tag>(json)?.t.as_deref() {
        Some("header" | "end") => serde_json::from_str(json),
        _ => serde_json::from_str(json).map(|item| Line::Item(Box::new(item))),
    }
}

fn describe(line: &Line) -> String {
    let item = match line {
        Line::Header { .. } => return "the header".into(),
        Line::End { .. } => return "the end record".into(),
        Line::Item(item) => item.as_ref(),
    };
    match item {
        BackupItem::Registration { registration, .. } => {
            format!("registration {}", registration.id)
        }
        BackupItem::SpentToken(t) => format!("spent token {}", t.jti),
        BackupItem::CrlNumber { backend, .. } => format!("CRL number of {backend}"),
        BackupItem::Audit(r) => format!("audit record {}", r.seq),
    }
}

/// Checks a whole backup without writing anything: every digest, the end record, and the
/// audit chain inside it. Returns what it holds and the head of its audit chain.
pub fn verify(path: &Path) -> Result<(Counts, (u64, String)), String> {
    let mut chain = ChainCheck::default();
    let counts = read(path, &mut |item| chain.check(&item))?;
    Ok((counts, chain.head.unwrap_or((0, GENESIS_HASH.to_string()))))
}

/// The audit records of a backup, checked as they stream past: each extends the one before.
#[derive(Default)]
struct ChainCheck {
    head: Option<(u64, String)>,
}

impl ChainCheck {
    fn check(&mut self, item: &BackupItem) -> Result<(), String> {
        let BackupItem::Audit(r) = item else {
            return match self.head {
                Some(_) => Err("a record after the audit log, which comes last".into()),
                None => Ok(()),
            };
        };
        let (seq, prev) = self.head.take().unwrap_or((0, GENESIS_HASH.to_string()));
        if r.seq != seq + 1 || r.prev_hash != prev {
            return Err(format!(
                "audit record {} does not follow record {seq}",
                r.seq
            ));
        }
        if !r.unchained.is_empty() || chain_hash(&prev, &r.event) != r.hash {
            return Err(format!("audit record {} fails its hash", r.seq));
        }
        self.head = Some((r.seq, r.hash.clone()));
        Ok(())
    }
}

/// Loads a verified backup into `store`, which must be empty. Checks the whole file before
/// the first write, so a damaged backup leaves the store as it was.
pub async fn restore(store: &dyn Store, path: &Path) -> Result<Counts, String> {
    super::must_be_empty(store).await?;
    let (counts, head) = verify(path)?;
    // The file was read once to check it; it is read again to load it, in batches, on a
    // blocking thread that hands each batch over.
    let (batches, mut rx) = tokio::sync::mpsc::channel::<Vec<Commit>>(4);
    let path = path.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || {
        let mut batch = Vec::with_capacity(BATCH);
        read(&path, &mut |item| {
            batch.push(commit_of(item));
            if batch.len() >= BATCH {
                batches
                    .blocking_send(std::mem::take(&mut batch))
                    .map_err(|_| "the store stopped taking records".to_string())?;
            }
            Ok(())
        })?;
        if !batch.is_empty() {
            let _ = batches.blocking_send(batch);
        }
        Ok::<_, String>(())
    });
    while let Some(batch) = rx.recv().await {
        store
            .commit_all(batch)
            .await
            .map_err(|e| format!("loading: {e}"))?;
    }
    reader.await.map_err(|e| e.to_string())??;
    store.flush().await.map_err(|e| e.to_string())?;
    let restored = store.audit_head().await.map_err(|e| e.to_string())?;
    if restored != head {
        return Err(format!(
            "the restored audit chain ends at record {} ({}), the backup's at {} ({})",
            restored.0, restored.1, head.0, head.1
        ));
    }
    Ok(counts)
}

const BATCH: usize = 500;

/// The commit that puts one item back as it was. An audit record is appended from its
/// event: the chain starts empty, so it is rebuilt with the same sequence numbers and
/// hashes (the caller compares the head).
fn commit_of(item: BackupItem) -> Commit {
    match item {
        BackupItem::Registration {
            registration,
            certificates,
        } => {
            let mut revocations = Vec::new();
            let new_certs = certificates
                .into_iter()
                .map(|mut c| {
                    if let Some(r) = c.revoked.take() {
                        revocations.push((c.serial.clone(), r));
                    }
                    c
                })
                .collect();
            Commit {
                registration: Some(registration),
                new_certs,
                revocations,
                ..Default::default()
            }
        }
        BackupItem::SpentToken(t) => Commit {
            spend_token: Some(t),
            ..Default::default()
        },
        BackupItem::CrlNumber { backend, number } => Commit {
            raise_crl_numbers: vec![(backend, number)],
            ..Default::default()
        },
        BackupItem::Audit(r) => Commit {
            audit: Some(r.event),
            ..Default::default()
        },
    }
}
