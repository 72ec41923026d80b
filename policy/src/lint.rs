//! Validation of one domain (what `serve` refuses) and the lint across domains.

use crate::*;
use serde::Serialize;
use std::fmt;
use std::net::IpAddr;

/// How bad a finding of [`DomainPolicy::validate`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

/// One problem found in a domain's policy, naming the configuration key at fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// The full key, e.g. `domains.ecsp-a.cert_validity`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        write!(f, "{sev}: {}: {}", self.key, self.message)
    }
}

/// What the rest of the configuration offers, so that a domain's references can be checked.
pub struct Known<'a> {
    pub backends: &'a [&'a str],
    pub token_issuers: &'a [&'a str],
}

impl DomainPolicy {
    /// Checks this domain's policy; `Error` findings make `ecsd serve` refuse to start.
    pub fn validate(&self, domain: &str, known: &Known<'_>) -> Vec<Finding> {
        // Every field is named: a new rule that this function does not look at does not
        // compile until it is added here (`_` where nothing can be wrong with it alone; the
        // third-party section is checked with the files it names, by the caller).
        let DomainPolicy {
            token_issuers: _,
            ees_ids: _,
            backend: _,
            cert_validity: _,
            max_registration: _,
            key_types: _,
            secret_token: _,
            third_party: _,
            endpoint_names: _,
            endpoint_addresses: _,
        } = self;
        let mut out = Vec::new();
        let key = |k: &str| format!("domains.{domain}.{k}");
        let mut push = |severity, k: &str, message: String| {
            out.push(Finding {
                severity,
                key: key(k),
                message,
            })
        };
        if self.token_issuers.is_empty() {
            push(
                Severity::Warning,
                "token_issuers",
                "no token issuer is trusted: this domain can onboard no EES".into(),
            );
        }
        for name in &self.token_issuers {
            if !known.token_issuers.contains(&name.as_str()) {
                push(
                    Severity::Error,
                    "token_issuers",
                    format!("unknown token issuer {name:?}: no [token_issuers.{name}] section"),
                );
            }
        }
        if self.ees_ids.is_empty() {
            push(
                Severity::Warning,
                "ees_ids",
                "no eesId pattern: this domain admits no EES".into(),
            );
        }
        for pattern in &self.ees_ids {
            if pattern.trim().is_empty() {
                push(
                    Severity::Error,
                    "ees_ids",
                    "an empty pattern matches nothing".into(),
                );
            }
        }
        match &self.backend {
            Some(b) if !known.backends.contains(&b.as_str()) => push(
                Severity::Error,
                "backend",
                format!("unknown backend {b:?}: no [backends.{b}] section"),
            ),
            None if known.backends.len() != 1 => push(
                Severity::Error,
                "backend",
                "missing: the configuration has several backends, name the one for this domain"
                    .into(),
            ),
            _ => {}
        }
        let validity = self.cert_validity.as_secs();
        if validity == 0 {
            push(
                Severity::Error,
                "cert_validity",
                "must be longer than zero".into(),
            );
        } else if validity > MAX_CERT_VALIDITY_SECS {
            push(
                Severity::Error,
                "cert_validity",
                format!("{} is longer than 3 years", self.cert_validity),
            );
        } else if validity > 398 * 86_400 {
            push(
                Severity::Warning,
                "cert_validity",
                format!("{} is longer than 398 days", self.cert_validity),
            );
        }
        if self.max_registration.as_secs() == 0 {
            push(
                Severity::Error,
                "max_registration",
                "must be longer than zero".into(),
            );
        }
        for pattern in self.endpoint_names.iter().flatten() {
            if pattern.trim().is_empty() {
                push(
                    Severity::Error,
                    "endpoint_names",
                    "an empty pattern matches nothing".into(),
                );
            } else if pattern.trim() == "*" {
                push(
                    Severity::Warning,
                    "endpoint_names",
                    "\"*\" lets an EES name any host (but this ECS's own) in its certificate"
                        .into(),
                );
            }
        }
        for range in &self.endpoint_addresses {
            let loopback: IpAddr = match range {
                IpNet::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                IpNet::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            };
            if range.prefix_len() == 0 {
                push(
                    Severity::Warning,
                    "endpoint_addresses",
                    format!("{range} lets an EES name any address in its certificate"),
                );
            } else if range.contains(&loopback) {
                push(
                    Severity::Warning,
                    "endpoint_addresses",
                    format!("{range} holds the loopback address {loopback}"),
                );
            }
        }
        if self.key_types.is_empty() {
            push(
                Severity::Error,
                "key_types",
                "empty: no EES key would be accepted".into(),
            );
        }
        if self.key_types.contains(&KeyType::Rsa2048) {
            push(
                Severity::Warning,
                "key_types",
                "rsa2048 is allowed; 3072 bits or more is recommended".into(),
            );
        }
        out
    }
}

/// What a lint knows about a trust anchor file (read by the caller).
#[derive(Debug, Clone)]
pub struct AnchorFacts {
    /// The configured path.
    pub path: String,
    /// `Err` when the file cannot be read or parsed.
    pub parsed: Result<(), String>,
    pub is_ca: bool,
    pub not_after: i64,
}

/// Checks across the whole policy that no single domain can see: overlapping `ees_ids`,
/// backends and token issuers that no domain uses, and trust anchors that are not CAs or
/// expire within 30 days of `now`. `anchors` maps each domain to its anchors' facts.
pub fn lint_policy(
    domains: &std::collections::BTreeMap<String, DomainPolicy>,
    known: &Known<'_>,
    default_backend: &str,
    anchors: &std::collections::BTreeMap<String, Vec<AnchorFacts>>,
    now: i64,
) -> Vec<Finding> {
    let mut out = Vec::new();
    for (name, d) in domains {
        out.extend(d.validate(name, known));
    }
    let names: Vec<&String> = domains.keys().collect();
    for (i, a) in names.iter().enumerate() {
        for b in &names[i + 1..] {
            for pa in &domains[*a].ees_ids {
                for pb in &domains[*b].ees_ids {
                    if glob_overlap(pa, pb) {
                        out.push(Finding {
                            severity: Severity::Warning,
                            key: format!("domains.{b}.ees_ids"),
                            message: format!(
                                "{pb:?} overlaps {pa:?} of domains.{a}: an EES ID both admit is placed by provId alone"
                            ),
                        });
                    }
                }
            }
        }
    }
    for backend in known.backends {
        let used = *backend == default_backend
            || domains
                .values()
                .any(|d| d.backend.as_deref().unwrap_or(default_backend) == *backend);
        if !used {
            out.push(Finding {
                severity: Severity::Warning,
                key: format!("backends.{backend}"),
                message: "no domain uses this backend".into(),
            });
        }
    }
    for issuer in known.token_issuers {
        if !domains
            .values()
            .any(|d| d.token_issuers.iter().any(|t| t == issuer))
        {
            out.push(Finding {
                severity: Severity::Warning,
                key: format!("token_issuers.{issuer}"),
                message: "no domain trusts this token issuer".into(),
            });
        }
    }
    for (domain, facts) in anchors {
        let key = format!("domains.{domain}.third_party.trust_anchors");
        for a in facts {
            let mut push = |severity, message: String| {
                out.push(Finding {
                    severity,
                    key: key.clone(),
                    message: format!("{}: {message}", a.path),
                })
            };
            if let Err(e) = &a.parsed {
                push(Severity::Error, e.clone());
            } else if !a.is_ca {
                push(Severity::Error, "not a CA certificate".into());
            } else if a.not_after <= now {
                push(Severity::Error, "expired".into());
            } else if a.not_after <= now + 30 * 86_400 {
                push(Severity::Warning, "expires within 30 days".into());
            }
        }
    }
    out
}
