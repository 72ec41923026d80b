//! Signed checkpoints of the audit chain, kept outside the store.
//!
//! The hash chain proves that no record was changed or removed in the middle, but someone
//! who can write the store can cut records at the end and rewrite the head: the shorter
//! chain is still a chain. So at most every `audit.checkpoint_interval`, and at stop, the ECS
//! signs (sequence, head hash, time, policy hash) with `audit.checkpoint_key` — a key used for
//! nothing else — and appends it to `audit.checkpoint_log`, a file outside the store (and to
//! its log). `ecsd audit verify` then checks that the chain in the store extends every
//! checkpoint: a store cut below a checkpoint, or rewritten under one, fails and names it.

use crate::audit::AuditRecord;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ecs_ca_backends::{KeySigner, SoftwareKey, sha256_hex};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One signed checkpoint: a line of the checkpoint log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The sequence number of the newest audit record it covers.
    pub seq: u64,
    /// That record's hash.
    pub head: String,
    pub time: String,
    pub policy_hash: String,
    /// SHA-256 of the signing key's SubjectPublicKeyInfo.
    pub key_id: String,
    /// The signature algorithm's OID.
    pub alg: String,
    /// Base64 signature over [`message`].
    pub signature: String,
}

/// The signed bytes: a fixed label, then each field on its own line.
pub fn message(seq: u64, head: &str, time: &str, policy_hash: &str) -> Vec<u8> {
    format!("ecs-audit-checkpoint/v1\n{seq}\n{head}\n{time}\n{policy_hash}").into_bytes()
}

/// Signs checkpoints and appends them to the log.
pub struct CheckpointSigner {
    signer: Arc<dyn KeySigner>,
    log: PathBuf,
}

impl CheckpointSigner {
    /// The signer of `[audit]`: a PKCS#8 private key file, private to its user.
    pub fn load(key: &Path, log: &Path) -> Result<Self, String> {
        crate::secrets::check_private(key, "audit.checkpoint_key")?;
        let pem = zeroize::Zeroizing::new(
            crate::files::read_to_string(key)
                .map_err(|e| format!("audit.checkpoint_key: {}: {e}", key.display()))?,
        );
        let signer = SoftwareKey::from_pkcs8_pem(&pem)
            .map_err(|e| format!("audit.checkpoint_key: {}: {e}", key.display()))?;
        Ok(CheckpointSigner {
            signer: Arc::new(signer),
            log: log.to_path_buf(),
        })
    }

    pub fn public_key_der(&self) -> &[u8] {
        self.signer.public_key_der()
    }

    /// Signs a checkpoint of the chain at (`seq`, `head`) and appends it to the log,
    /// durably, before returning it.
    pub fn write(
        &self,
        seq: u64,
        head: &str,
        time: &str,
        policy_hash: &str,
    ) -> Result<Checkpoint, String> {
        let signature = self
            .signer
            .sign(&message(seq, head, time, policy_hash))
            .map_err(|e| format!("audit.checkpoint_key: signing failed: {e}"))?;
        let c = Checkpoint {
            seq,
            head: head.to_string(),
            time: time.to_string(),
            policy_hash: policy_hash.to_string(),
            key_id: sha256_hex(self.signer.public_key_der()),
            alg: self
                .signer
                .algorithm()
                .algorithm_identifier()
                .oid
                .to_string(),
            signature: B64.encode(signature),
        };
        let mut line = serde_json::to_vec(&c).expect("checkpoints serialise");
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("audit.checkpoint_log: {}: {e}", self.log.display()))?;
        f.write_all(&line)
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("audit.checkpoint_log: {}: {e}", self.log.display()))?;
        Ok(c)
    }
}

/// The public key that verifies the checkpoints of `[audit]`.
pub fn verifying_key(key: &Path) -> Result<Vec<u8>, String> {
    Ok(CheckpointSigner::load(key, Path::new("/dev/null"))?
        .public_key_der()
        .to_vec())
}

/// Reads the checkpoint log (absent: no checkpoint yet).
pub fn read_log(path: &Path) -> Result<Vec<Checkpoint>, String> {
    let text = match crate::files::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("audit.checkpoint_log: {}: {e}", path.display())),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                format!(
                    "audit.checkpoint_log: {} line {}: not a checkpoint: {e}",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// Checks every checkpoint against `spki` and the chain `records` (already verified, in
/// order from 1): each is signed by the key, and the chain holds its record with its hash.
/// Returns the number of checkpoints, or why the first that fails does.
pub fn verify(
    records: &[AuditRecord],
    checkpoints: &[Checkpoint],
    spki: &[u8],
) -> Result<usize, String> {
    let key_id = sha256_hex(spki);
    let mut last_seq = 0;
    for (i, c) in checkpoints.iter().enumerate() {
        let n = i + 1;
        let at = |why: String| format!("checkpoint {n} (record {}, {}): {why}", c.seq, c.time);
        if c.key_id != key_id {
            return Err(at("signed by another key than audit.checkpoint_key".into()));
        }
        let alg: const_oid::ObjectIdentifier = c
            .alg
            .parse()
            .map_err(|_| at(format!("unknown algorithm {}", c.alg)))?;
        let signature = B64
            .decode(&c.signature)
            .map_err(|_| at("the signature is not base64".into()))?;
        ecs_ca_backends::verify_signature(
            spki,
            &alg,
            &message(c.seq, &c.head, &c.time, &c.policy_hash),
            &signature,
        )
        .map_err(|_| at("the signature does not verify".into()))?;
        if c.seq < last_seq {
            return Err(at(format!(
                "goes back from record {last_seq}: the checkpoint log was reordered"
            )));
        }
        last_seq = c.seq;
        if c.seq == 0 {
            continue;
        }
        match records.get(c.seq as usize - 1) {
            None => {
                return Err(at(format!(
                    "the audit log ends at record {}: records were cut after a checkpoint",
                    records.len()
                )));
            }
            Some(r) if r.hash != c.head => {
                return Err(at(format!(
                    "record {} is not the one checkpointed: the log was rewritten",
                    c.seq
                )));
            }
            Some(_) => {}
        }
    }
    Ok(checkpoints.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<AuditRecord> {
        crate::audit::test_chain(n)
    }

    #[test]
    fn a_cut_or_rewritten_log_fails_at_the_checkpoint_it_breaks() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("audit.key");
        std::fs::write(
            &key,
            ecs_ca_backends::generate_p256_pkcs8_pem()
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let log = dir.path().join("checkpoints.jsonl");
        let signer = CheckpointSigner::load(&key, &log).unwrap();
        let records = chain(5);
        signer.write(3, &records[2].hash, "t3", "p").unwrap();
        signer.write(5, &records[4].hash, "t5", "p").unwrap();
        let checkpoints = read_log(&log).unwrap();
        let spki = signer.public_key_der().to_vec();
        assert_eq!(verify(&records, &checkpoints, &spki), Ok(2));

        let cut = verify(&records[..4], &checkpoints, &spki).unwrap_err();
        assert!(cut.starts_with("checkpoint 2 (record 5"), "{cut}");
        let mut rewritten = chain(5);
        rewritten[2].hash = "0".repeat(64);
        let e = verify(&rewritten, &checkpoints, &spki).unwrap_err();
        assert!(e.starts_with("checkpoint 1 (record 3"), "{e}");
        let mut forged = checkpoints.clone();
        forged[1].seq = 4;
        forged[1].head = records[3].hash.clone();
        let e = verify(&records, &forged, &spki).unwrap_err();
        assert!(e.contains("signature does not verify"), "{e}");
        let other = ecs_ca_backends::generate_p256_pkcs8_pem().unwrap();
        let other = SoftwareKey::from_pkcs8_pem(&other).unwrap();
        let e = verify(&records, &checkpoints, other.public_key_der()).unwrap_err();
        assert!(e.contains("another key"), "{e}");
    }
}
