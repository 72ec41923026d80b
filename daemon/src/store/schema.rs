//! The relational layout of the store, written once for every SQL engine.
//!
//! Statements use `$n` parameters, which both SQLite and PostgreSQL read (SQLite numbers
//! them by first appearance, so each statement names them in order). The DDL differs in two
//! words only, which [`Dialect`] fills in. The rules the pipeline relies on are constraints
//! here, so that no engine (and no second process) can break them:
//! - one active registration per EES ID: a unique index over the active rows;
//! - a token ID spent once: the primary key of `spent_tokens`;
//! - a serial used once: the unique `certificates.serial`.

use super::{CertRecord, CertSource, RegState, Revocation, StoreError};

/// What differs between the SQL engines' DDL.
#[derive(Debug, Clone, Copy)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    fn fill(self, ddl: &str) -> String {
        let (blob, identity) = match self {
            Dialect::Sqlite => ("BLOB", "INTEGER PRIMARY KEY"),
            Dialect::Postgres => ("BYTEA", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"),
        };
        ddl.replace("{blob}", blob).replace("{identity}", identity)
    }

    /// The forward migrations, oldest first: migration `i` brings the store to version
    /// `i + 1`.
    pub fn migrations(self) -> Vec<String> {
        MIGRATIONS.iter().map(|m| self.fill(m)).collect()
    }
}

/// The schema version this binary writes; a store at a higher version is refused.
pub fn latest_version() -> i64 {
    MIGRATIONS.len() as i64
}

const MIGRATIONS: &[&str] = &[
    // 1: the first relational layout.
    "
CREATE TABLE registrations (
    id                TEXT PRIMARY KEY,
    state             TEXT NOT NULL CHECK (state IN ('active', 'deregistered', 'expired')),
    ees_id            TEXT NOT NULL,
    -- eesId compared without case (DNS names): the key of the one-active rule.
    ees_key           TEXT NOT NULL,
    prov_id           TEXT,
    domain            TEXT NOT NULL,
    backend           TEXT NOT NULL,
    profile           TEXT NOT NULL,
    exp_time          BIGINT NOT NULL,
    supp_feat         TEXT,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    cert_source       TEXT NOT NULL CHECK (cert_source IN ('ECS_ISSUED', 'THIRD_PARTY')),
    current_cert      TEXT NOT NULL,
    secret_token_hash TEXT,
    token_issuer      TEXT NOT NULL
);
CREATE UNIQUE INDEX registrations_one_active_per_ees ON registrations (ees_key)
    WHERE state = 'active';
CREATE INDEX registrations_active_by_expiry ON registrations (exp_time, id)
    WHERE state = 'active';

CREATE TABLE certificates (
    -- Issue order: a registration's certificates, oldest first.
    seq               {identity},
    serial            TEXT NOT NULL UNIQUE,
    registration_id   TEXT NOT NULL,
    backend           TEXT NOT NULL,
    der               {blob} NOT NULL,
    fingerprint       TEXT NOT NULL,
    not_before        BIGINT NOT NULL,
    not_after         BIGINT NOT NULL,
    revoked_at        BIGINT,
    revocation_reason TEXT,
    -- An accepted third-party chain: its certificates' DER, one after the other.
    chain             {blob}
);
CREATE INDEX certificates_by_registration ON certificates (registration_id, seq);
CREATE INDEX certificates_by_fingerprint ON certificates (fingerprint);
CREATE INDEX certificates_revoked ON certificates (backend, serial)
    WHERE revoked_at IS NOT NULL;

CREATE TABLE spent_tokens (
    iss TEXT NOT NULL,
    jti TEXT NOT NULL,
    exp BIGINT NOT NULL,
    PRIMARY KEY (iss, jti)
);
CREATE INDEX spent_tokens_by_expiry ON spent_tokens (exp);

-- The hash chain: each record as written (JSON), its sequence number and hash.
CREATE TABLE audit_log (
    seq    BIGINT PRIMARY KEY,
    hash   TEXT NOT NULL,
    record TEXT NOT NULL
);

CREATE TABLE crl_numbers (
    backend TEXT PRIMARY KEY,
    number  BIGINT NOT NULL
);

CREATE TABLE metadata (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
",
    // 2: indexes that leave a query planner no wrong choice, even when it plans on empty
    // tables (PostgreSQL keeps a prepared statement's generic plan until the next ANALYZE).
    // The sweep's index no longer matches the one-active lookup (which then has only its
    // unique index), and the fingerprint lookup finds the newest certificate in its index
    // instead of walking every certificate newest first.
    "
DROP INDEX registrations_active_by_expiry;
CREATE INDEX registrations_due ON registrations (exp_time, id)
    WHERE state = 'active' AND exp_time IS NOT NULL;
DROP INDEX certificates_by_fingerprint;
CREATE INDEX certificates_by_fingerprint ON certificates (fingerprint, seq);
",
    // 3: only third-party certificates are looked up by fingerprint (an ECS-issued one is
    // found by its serial, which begins with the time it was issued). Every registration's
    // commit wrote a random leaf of the full index; on a store of a million registrations
    // that cost about 8 % of the rate. The condition is THIRD_PARTY_BY_FINGERPRINT's, word for
    // word, so that both engines' planners see the partial index serves it.
    "
DROP INDEX certificates_by_fingerprint;
CREATE INDEX certificates_third_party_by_fingerprint ON certificates (fingerprint, seq)
    WHERE backend = 'third-party';
",
];

/// The newest third-party certificate with fingerprint `$1` (appended to a certificate
/// `SELECT`). The backend is a literal, not a parameter: a planner uses a partial index only
/// for a condition it can see implies the index's.
pub const THIRD_PARTY_BY_FINGERPRINT: &str =
    "WHERE backend = 'third-party' AND fingerprint = $1 ORDER BY seq DESC LIMIT 1";

pub const UPSERT_REGISTRATION: &str = "INSERT INTO registrations (id, state, ees_id, ees_key, \
     prov_id, domain, backend, profile, exp_time, supp_feat, created_at, updated_at, \
     cert_source, current_cert, secret_token_hash, token_issuer) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
     ON CONFLICT (id) DO UPDATE SET state = excluded.state, ees_id = excluded.ees_id, \
     ees_key = excluded.ees_key, prov_id = excluded.prov_id, domain = excluded.domain, \
     backend = excluded.backend, profile = excluded.profile, exp_time = excluded.exp_time, \
     supp_feat = excluded.supp_feat, updated_at = excluded.updated_at, \
     cert_source = excluded.cert_source, current_cert = excluded.current_cert, \
     secret_token_hash = excluded.secret_token_hash, token_issuer = excluded.token_issuer";

/// A change to a registration that must find it as the request saw it: touches the row
/// (taking its lock on PostgreSQL, where the condition is re-checked after a wait) and
/// changes no row when another change got there first.
pub const HOLD_IF_CURRENT: &str = "UPDATE registrations SET updated_at = updated_at \
     WHERE id = $1 AND state = 'active' AND current_cert = $2";

pub const INSERT_CERTIFICATE: &str = "INSERT INTO certificates (serial, registration_id, \
     backend, der, fingerprint, not_before, not_after, revoked_at, revocation_reason, chain) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

pub const REVOKE: &str = "UPDATE certificates SET revoked_at = $1, revocation_reason = $2 \
     WHERE serial = $3 AND revoked_at IS NULL";

pub const SPEND_TOKEN: &str = "INSERT INTO spent_tokens (iss, jti, exp) VALUES ($1, $2, $3)";

pub const APPEND_AUDIT: &str = "INSERT INTO audit_log (seq, hash, record) VALUES ($1, $2, $3)";

pub const AUDIT_HEAD: &str = "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1";

pub const NEXT_CRL_NUMBER: &str = "INSERT INTO crl_numbers (backend, number) VALUES ($1, 1) \
     ON CONFLICT (backend) DO UPDATE SET number = crl_numbers.number + 1 RETURNING number";

/// A restored CRL number: never lowered.
pub const RAISE_CRL_NUMBER: &str = "INSERT INTO crl_numbers (backend, number) VALUES ($1, $2) \
     ON CONFLICT (backend) DO UPDATE SET number = $2 WHERE crl_numbers.number < $2";

pub const PURGE_SPENT_TOKENS: &str = "DELETE FROM spent_tokens WHERE exp < $1";

pub const ACTIVE_FOR_EES: &str =
    "SELECT id FROM registrations WHERE ees_key = $1 AND state = 'active'";

pub const TOKEN_SPENT: &str = "SELECT 1 FROM spent_tokens WHERE iss = $1 AND jti = $2";

pub const DUE_EXPIRIES: &str = "SELECT id FROM registrations WHERE state = 'active' \
     AND exp_time <= $1 ORDER BY exp_time, id LIMIT $2";

pub const CERT_SERIALS_OF: &str =
    "SELECT serial FROM certificates WHERE registration_id = $1 ORDER BY seq";

pub const REVOKED_OF_BACKEND: &str = "SELECT serial, revoked_at, revocation_reason \
     FROM certificates WHERE backend = $1 AND revoked_at IS NOT NULL ORDER BY serial";

pub const AUDIT_RECORDS: &str =
    "SELECT record FROM audit_log WHERE seq >= $1 ORDER BY seq LIMIT $2";

pub const COUNT_ACTIVE: &str = "SELECT count(*) FROM registrations WHERE state = 'active'";

pub const CRL_NUMBERS: &str = "SELECT backend, number FROM crl_numbers ORDER BY backend";

impl RegState {
    /// The name in the `state` column and in records.
    pub fn name(self) -> &'static str {
        match self {
            RegState::Active => "active",
            RegState::Deregistered => "deregistered",
            RegState::Expired => "expired",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [RegState::Active, RegState::Deregistered, RegState::Expired]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

impl CertSource {
    pub fn from_name(name: &str) -> Option<Self> {
        [CertSource::EcsIssued, CertSource::ThirdParty]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

/// The `chain` column of a certificate: its accepted third-party chain as one run of DER,
/// or NULL.
pub fn join_chain(cert: &CertRecord) -> Option<Vec<u8>> {
    (!cert.chain.is_empty()).then(|| cert.chain.concat())
}

/// A certificate's revocation and chain from their columns (`revoked_at`,
/// `revocation_reason`, `chain`).
pub fn revocation_and_chain(
    serial: &str,
    revoked_at: Option<i64>,
    reason: Option<String>,
    chain: Option<Vec<u8>>,
) -> Result<(Option<Revocation>, Vec<Vec<u8>>), StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        key: format!("cert/{serial}"),
        detail,
    };
    let revoked = match (revoked_at, reason) {
        (Some(at), Some(reason)) => Some(Revocation {
            at,
            reason: ecs_ca_backends::RevocationReason::from_name(&reason)
                .ok_or_else(|| corrupt(format!("reason {reason:?}")))?,
        }),
        (None, None) => None,
        _ => return Err(corrupt("half a revocation".into())),
    };
    let chain = match chain {
        Some(bytes) => split_der(&bytes).ok_or_else(|| corrupt("chain is not DER".into()))?,
        None => Vec::new(),
    };
    Ok((revoked, chain))
}

/// Splits concatenated DER certificates (the `chain` column) back into one each.
pub fn split_der(mut bytes: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        // A SEQUENCE: tag, then a short or long-form length.
        let first = *bytes.get(1)?;
        let (header, len) = if first < 0x80 {
            (2, first as usize)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 {
                return None;
            }
            let len = bytes
                .get(2..2 + n)?
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | *b as usize);
            (2 + n, len)
        };
        let total = header.checked_add(len)?;
        out.push(bytes.get(..total)?.to_vec());
        bytes = &bytes[total..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_column_splits_back_into_its_certificates() {
        let short = vec![0x30, 0x02, 0x01, 0x02];
        let mut long = vec![0x30, 0x81, 0x80];
        long.extend(std::iter::repeat_n(7u8, 0x80));
        let joined: Vec<u8> = [short.clone(), long.clone()].concat();
        assert_eq!(split_der(&joined), Some(vec![short, long]));
        assert_eq!(split_der(&[0x30, 0x05, 0x01]), None);
    }

    #[test]
    fn the_fingerprint_index_and_its_lookup_name_the_third_party_backend() {
        let condition = format!("backend = '{}'", super::super::THIRD_PARTY);
        assert!(MIGRATIONS[2].contains(&condition), "{}", MIGRATIONS[2]);
        assert!(THIRD_PARTY_BY_FINGERPRINT.contains(&condition));
    }

    #[test]
    fn sqlite_finds_a_third_party_certificate_through_its_partial_index() {
        // A wrong plan would scan every certificate on a refused mutual-TLS request.
        let c = rusqlite::Connection::open_in_memory().unwrap();
        for m in Dialect::Sqlite.migrations() {
            c.execute_batch(&m).unwrap();
        }
        let plan: String = c
            .query_row(
                &format!("EXPLAIN QUERY PLAN SELECT serial FROM certificates {THIRD_PARTY_BY_FINGERPRINT}"),
                ["00"],
                |r| r.get(3),
            )
            .unwrap();
        assert!(
            plan.contains("USING INDEX certificates_third_party_by_fingerprint"),
            "{plan}"
        );
    }
}
