//! The audit log: one record per decision, each holding the hash of the one before.
//!
//! Records are written by the store inside the same transaction as the change they
//! describe, so an acknowledged registration always has its record, and a refusal leaves
//! only its record. `ecsd audit verify` recomputes the chain.

pub mod checkpoint;
pub mod refusals;

use serde::{Deserialize, Serialize};

/// The `prev_hash` of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Register,
    Get,
    Update,
    Rekey,
    Patch,
    Deregister,
    Expire,
    PolicyReload,
    /// A count of identical refusals not recorded one by one.
    RefusalsAggregated,
    /// A request refused before it named an operation (a method the resource lacks).
    #[default]
    Request,
}

impl Action {
    /// The name in records and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Action::Register => "register",
            Action::Get => "get",
            Action::Update => "update",
            Action::Rekey => "rekey",
            Action::Patch => "patch",
            Action::Deregister => "deregister",
            Action::Expire => "expire",
            Action::PolicyReload => "policy_reload",
            Action::RefusalsAggregated => "refusals_aggregated",
            Action::Request => "request",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

/// Whether the decision accepted or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    #[default]
    Accepted,
    Refused,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Outcome::Accepted => "accepted",
            Outcome::Refused => "refused",
        })
    }
}

/// What happened, as the pipeline reports it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AuditEvent {
    /// RFC 3339 time of the decision.
    pub time: String,
    /// The client's address.
    pub client: String,
    /// `register`, `get`, `update`, `patch`, `rekey`, `deregister`, `expire`.
    pub action: Action,
    /// `accepted` or `refused`.
    pub outcome: Outcome,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ees_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prov_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_fingerprint: Option<String>,
    /// The EES key presented (e.g. `ECDSA P-256`), so a policy change can be replayed
    /// against past decisions (`ecsd policy diff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The policy's name of that key (`p256`, ...), when it has one: what `policy diff`
    /// replays a refusal with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_type: Option<ecs_policy::KeyType>,
    /// Content hash of the policy configuration in force.
    pub policy_hash: String,
}

impl AuditEvent {
    #[cfg(test)]
    pub fn test(detail: &str) -> Self {
        AuditEvent {
            time: "2026-11-27T00:00:00Z".into(),
            action: Action::Register,
            outcome: Outcome::Accepted,
            detail: Some(detail.into()),
            ..Default::default()
        }
    }
}

/// A stored record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub prev_hash: String,
    #[serde(flatten)]
    pub event: AuditEvent,
    pub hash: String,
    /// Fields in the stored record that the hash does not cover: there are none in a record
    /// this ECS wrote, so any here were injected, and the record fails verification.
    #[serde(
        flatten,
        default,
        skip_serializing_if = "std::collections::BTreeMap::is_empty"
    )]
    pub unchained: std::collections::BTreeMap<String, serde_json::Value>,
}

impl AuditRecord {
    /// The record that follows `prev_hash` as number `seq`.
    pub fn chained(seq: u64, prev_hash: String, event: AuditEvent) -> AuditRecord {
        let hash = chain_hash(&prev_hash, &event);
        AuditRecord {
            seq,
            prev_hash,
            event,
            hash,
            unchained: Default::default(),
        }
    }
}

/// SHA-256 over the previous hash and the event's canonical JSON.
pub fn chain_hash(prev: &str, event: &AuditEvent) -> String {
    let json = serde_json::to_string(event).expect("events serialise");
    ecs_ca_backends::sha256_hex(format!("{prev}\n{json}").as_bytes())
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenRecord {
    pub seq: u64,
    pub reason: String,
}

/// Recomputes the chain of `records` (in order from seq 1) against the stored head.
/// Returns the number of records verified, or the first broken one.
pub fn verify_chain(records: &[AuditRecord], head: (u64, &str)) -> Result<u64, BrokenRecord> {
    let mut prev = GENESIS_HASH.to_string();
    let mut expected_seq = 1;
    for r in records {
        let broken = |reason: String| BrokenRecord { seq: r.seq, reason };
        if r.seq != expected_seq {
            return Err(BrokenRecord {
                seq: expected_seq,
                reason: format!("record {expected_seq} is missing (found {} next)", r.seq),
            });
        }
        if r.prev_hash != prev {
            return Err(broken(
                "prev_hash does not match the previous record".into(),
            ));
        }
        if chain_hash(&prev, &r.event) != r.hash {
            return Err(broken("hash does not match the record's content".into()));
        }
        if !r.unchained.is_empty() {
            let keys: Vec<&String> = r.unchained.keys().collect();
            return Err(broken(format!(
                "fields {keys:?} are not covered by the chain: they were added after the record was written"
            )));
        }
        prev = r.hash.clone();
        expected_seq += 1;
    }
    let last = expected_seq - 1;
    if last != head.0 || prev != head.1 {
        return Err(BrokenRecord {
            seq: last + 1,
            reason: format!(
                "the log ends at record {last} but the head names record {}",
                head.0
            ),
        });
    }
    Ok(last)
}

/// A chain of `n` intact records, for tests.
#[cfg(test)]
pub(crate) fn test_chain(n: u64) -> Vec<AuditRecord> {
    let mut prev = GENESIS_HASH.to_string();
    (1..=n)
        .map(|seq| {
            let event = AuditEvent::test(&format!("a{seq}"));
            let hash = chain_hash(&prev, &event);
            let r = AuditRecord {
                seq,
                prev_hash: prev.clone(),
                event,
                hash: hash.clone(),
                unchained: Default::default(),
            };
            prev = hash;
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<AuditRecord> {
        test_chain(n)
    }

    #[test]
    fn an_intact_chain_verifies() {
        let c = chain(3);
        let head = c[2].hash.clone();
        assert_eq!(verify_chain(&c, (3, &head)), Ok(3));
    }

    #[test]
    fn tampering_names_the_first_broken_record() {
        let c = chain(4);
        let head = c[3].hash.clone();
        let mut edited = c.clone();
        edited[1].event.outcome = Outcome::Refused;
        assert_eq!(verify_chain(&edited, (4, &head)).unwrap_err().seq, 2);
        let mut removed = c.clone();
        removed.remove(2);
        assert_eq!(verify_chain(&removed, (4, &head)).unwrap_err().seq, 3);
        let truncated = &c[..3];
        assert_eq!(verify_chain(truncated, (4, &head)).unwrap_err().seq, 4);
        // A field injected into a stored record is not covered by its hash: refused.
        let mut stored: serde_json::Value = serde_json::to_value(&c[1]).unwrap();
        stored["granted_by"] = serde_json::json!("nobody");
        let mut injected = c.clone();
        injected[1] = serde_json::from_value(stored).unwrap();
        let e = verify_chain(&injected, (4, &head)).unwrap_err();
        assert_eq!(e.seq, 2, "{}", e.reason);
        assert!(e.reason.contains("granted_by"), "{}", e.reason);
    }
}
