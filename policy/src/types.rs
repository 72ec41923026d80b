//! The policy as data: what an ECSP security team writes under `[domains.*]`.

use crate::*;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The longest certificate validity the EES certificate profile allows (TS 33.310: 3 years).
pub const MAX_CERT_VALIDITY_SECS: u64 = 3 * 365 * 86_400;

/// A key algorithm and size an EES may present, as named in `key_types`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    P256,
    P384,
    Ed25519,
    Rsa2048,
    Rsa3072,
    Rsa4096,
}

impl KeyType {
    /// The name used in configuration files.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::P256 => "p256",
            KeyType::P384 => "p384",
            KeyType::Ed25519 => "ed25519",
            KeyType::Rsa2048 => "rsa2048",
            KeyType::Rsa3072 => "rsa3072",
            KeyType::Rsa4096 => "rsa4096",
        }
    }

    /// The key types accepted when a domain does not say (`contract/api.md` §6).
    pub fn defaults() -> Vec<KeyType> {
        vec![
            KeyType::P256,
            KeyType::P384,
            KeyType::Ed25519,
            KeyType::Rsa2048,
            KeyType::Rsa3072,
            KeyType::Rsa4096,
        ]
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a domain hands out the optional Secret_token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretTokenMode {
    Never,
    #[default]
    OnRequest,
    Always,
}

impl fmt::Display for SecretTokenMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SecretTokenMode::Never => "never",
            SecretTokenMode::OnRequest => "on_request",
            SecretTokenMode::Always => "always",
        })
    }
}

/// Acceptance of third-party EES client certificates (`[domains.X.third_party]`).
///
/// Parsed and validated here so that a configuration written for it is accepted; the
/// decision on a presented chain belongs to the third-party issue.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThirdPartyPolicy {
    #[serde(default)]
    pub accept: bool,
    #[serde(default)]
    pub trust_anchors: Vec<String>,
    #[serde(default)]
    pub require_eku: Vec<String>,
    #[serde(default = "default_true")]
    pub names_must_match: bool,
    #[serde(default)]
    pub max_validity: Option<PolicyDuration>,
    #[serde(default)]
    pub crls: Vec<String>,
}

fn default_true() -> bool {
    true
}

/// One ECSP domain's policy, keyed in the configuration by the `eesProf.provId` it governs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainPolicy {
    /// Names of `[token_issuers.*]` whose onboarding tokens this domain accepts.
    #[serde(default)]
    pub token_issuers: Vec<String>,
    /// Glob patterns (`*` matches any run of characters) that the `eesId` must match.
    #[serde(default)]
    pub ees_ids: Vec<String>,
    /// The `[backends.*]` name that signs this domain's EES certificates; may be left out when
    /// the configuration has exactly one signing backend.
    #[serde(default)]
    pub backend: Option<String>,
    #[serde(default = "default_cert_validity")]
    pub cert_validity: PolicyDuration,
    #[serde(default = "default_max_registration")]
    pub max_registration: PolicyDuration,
    #[serde(default = "KeyType::defaults")]
    pub key_types: Vec<KeyType>,
    #[serde(default)]
    pub secret_token: SecretTokenMode,
    #[serde(default)]
    pub third_party: Option<ThirdPartyPolicy>,
    /// Glob patterns that every endpoint name (`endPt.fqdn`, the host of `endPt.uri`) must
    /// match; absent: the domain's `ees_ids`. The ECS's own names never match.
    #[serde(default)]
    pub endpoint_names: Option<Vec<String>>,
    /// CIDR ranges that every endpoint address (`endPt.ipv4Addrs`, `ipv6Addrs`, an address
    /// as URI host) must lie in; empty: addresses are refused.
    #[serde(default)]
    pub endpoint_addresses: Vec<IpNet>,
}

fn default_cert_validity() -> PolicyDuration {
    PolicyDuration::from_secs(30 * 86_400)
}

fn default_max_registration() -> PolicyDuration {
    PolicyDuration::from_secs(365 * 86_400)
}
