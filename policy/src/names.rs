//! The names an EES asks its certificate to carry, and the rules that authorise them.
//!
//! An EES certificate is a server certificate too (serverAuth): every name in it is a name a
//! client will trust the EES for. So no name reaches a certificate because the EES wrote it
//! in its profile; it reaches it because the domain's policy approved it here, and the
//! approved list is the only thing the issuer is given (`Approval::names`).

use crate::glob_match;
use std::fmt;
use std::net::IpAddr;

/// One name the EES asks for, as the daemon read it from `eesProf.endPt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestedName {
    /// `endPt.fqdn`.
    Dns(String),
    /// One of `endPt.ipv4Addrs` / `endPt.ipv6Addrs`.
    Ip(IpAddr),
    /// `endPt.uri`, with the host of its authority when it has one.
    Uri { uri: String, host: Option<UriHost> },
}

/// The host part of an endpoint URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UriHost {
    Dns(String),
    Ip(IpAddr),
}

/// A subjectAltName the policy approved, in the form it will have in the certificate
/// (DNS names lower case, without a trailing dot).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SanName {
    Dns(String),
    Ip(IpAddr),
    Uri(String),
}

impl fmt::Display for SanName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SanName::Dns(d) => f.write_str(d),
            SanName::Ip(ip) => write!(f, "{ip}"),
            SanName::Uri(u) => f.write_str(u),
        }
    }
}

/// The ECS's own names and addresses (its identifier, public URL host, listeners, and the
/// names of its TLS certificate): never approved for an EES, whatever a pattern says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnNames {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
}

impl OwnNames {
    pub fn new(
        dns: impl IntoIterator<Item = String>,
        ips: impl IntoIterator<Item = IpAddr>,
    ) -> Self {
        let mut dns: Vec<String> = dns.into_iter().map(|d| normalize_dns(&d)).collect();
        dns.sort();
        dns.dedup();
        let mut ips: Vec<IpAddr> = ips.into_iter().collect();
        ips.sort();
        ips.dedup();
        OwnNames { dns, ips }
    }

    fn has_dns(&self, name: &str) -> bool {
        self.dns.iter().any(|d| d == name)
    }

    fn has_ip(&self, ip: &IpAddr) -> bool {
        self.ips.contains(ip)
    }
}

/// The TS 29.571 `Fqdn` pattern: labels of letters, digits and hyphens, a last label of
/// 2 to 63 letters, 4 to 253 characters.
pub fn is_fqdn(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.len() < 4 || s.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = s.split('.').collect();
    if labels.len() < 2 {
        return false;
    }
    let last = labels[labels.len() - 1];
    if !(2..=63).contains(&last.len()) || !last.chars().all(|c| c.is_ascii_alphabetic()) {
        return false;
    }
    labels.iter().all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    })
}

/// DNS names compare in lower case and without the root's trailing dot.
pub fn normalize_dns(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// The name facts of one request: what the EES asks for, and what it may never have.
#[derive(Debug, Clone, Copy)]
pub struct EndpointFacts<'a> {
    pub requested: &'a [RequestedName],
    /// The eesId goes into the certificate as a dNSName too when it is an FQDN.
    pub ees_id_is_fqdn: bool,
    pub own: &'a OwnNames,
}

/// Why a name was not approved, and under which rule (`endpoint_names`,
/// `endpoint_addresses` or `ees_ids`).
pub(crate) struct NameRefusal {
    pub rule: &'static str,
    pub reason: String,
}

/// The approved subjectAltNames of a request, or the first name that is not approved.
pub(crate) fn approve(
    name_patterns: &[String],
    patterns_key: &'static str,
    ranges: &[ipnet::IpNet],
    ees_id: &str,
    facts: &EndpointFacts<'_>,
) -> Result<Vec<SanName>, NameRefusal> {
    let dns = |name: &str| -> Result<String, NameRefusal> {
        let name = normalize_dns(name);
        if facts.own.has_dns(&name) {
            return Err(NameRefusal {
                rule: "endpoint_names",
                reason: format!("{name:?} is a name of this ECS, never of an EES"),
            });
        }
        match name_patterns.iter().find(|p| glob_match(p, &name)) {
            Some(_) => Ok(name),
            None => Err(NameRefusal {
                rule: "endpoint_names",
                reason: format!(
                    "endpoint name {name:?} matches none of {name_patterns:?} ({patterns_key})"
                ),
            }),
        }
    };
    let ip = |ip: IpAddr| -> Result<IpAddr, NameRefusal> {
        if facts.own.has_ip(&ip) {
            return Err(NameRefusal {
                rule: "endpoint_addresses",
                reason: format!("{ip} is an address of this ECS, never of an EES"),
            });
        }
        if ranges.is_empty() {
            return Err(NameRefusal {
                rule: "endpoint_addresses",
                reason: format!(
                    "endpoint address {ip} is not allowed: this domain lists no endpoint_addresses"
                ),
            });
        }
        match ranges.iter().find(|r| r.contains(&ip)) {
            Some(_) => Ok(ip),
            None => Err(NameRefusal {
                rule: "endpoint_addresses",
                reason: format!(
                    "endpoint address {ip} is in none of {:?}",
                    ranges.iter().map(|r| r.to_string()).collect::<Vec<_>>()
                ),
            }),
        }
    };
    let mut out: Vec<SanName> = Vec::new();
    let mut push = |n: SanName| {
        if !out.contains(&n) {
            out.push(n);
        }
    };
    for name in facts.requested {
        match name {
            RequestedName::Dns(d) => push(SanName::Dns(dns(d)?)),
            RequestedName::Ip(a) => push(SanName::Ip(ip(*a)?)),
            RequestedName::Uri { uri, host } => {
                match host {
                    Some(UriHost::Dns(d)) => {
                        dns(d)?;
                    }
                    Some(UriHost::Ip(a)) => {
                        ip(*a)?;
                    }
                    None => {
                        return Err(NameRefusal {
                            rule: "endpoint_names",
                            reason: format!(
                                "endpoint URI {uri:?} has no host that a policy could authorise"
                            ),
                        });
                    }
                }
                push(SanName::Uri(uri.clone()));
            }
        }
    }
    if facts.ees_id_is_fqdn {
        let id = normalize_dns(ees_id);
        if facts.own.has_dns(&id) {
            return Err(NameRefusal {
                rule: "ees_ids",
                reason: format!("eesId {id:?} is a name of this ECS, never of an EES"),
            });
        }
        push(SanName::Dns(id));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> OwnNames {
        OwnNames::new(
            ["ecs.mno.example".to_string(), "ECS-Alt.mno.example.".into()],
            ["127.0.0.1".parse().unwrap()],
        )
    }

    fn run(requested: &[RequestedName], ranges: &[&str]) -> Result<Vec<SanName>, String> {
        let own = own();
        let ranges: Vec<ipnet::IpNet> = ranges.iter().map(|r| r.parse().unwrap()).collect();
        approve(
            &["*.edn1.ecsp-a.example".to_string()],
            "endpoint_names",
            &ranges,
            "ees1.edn1.ecsp-a.example",
            &EndpointFacts {
                requested,
                ees_id_is_fqdn: true,
                own: &own,
            },
        )
        .map_err(|r| format!("{}: {}", r.rule, r.reason))
    }

    #[test]
    fn names_inside_the_patterns_are_approved_in_certificate_form() {
        let got = run(
            &[RequestedName::Dns("EES1.edn1.ecsp-a.example.".into())],
            &[],
        )
        .unwrap();
        assert_eq!(got, vec![SanName::Dns("ees1.edn1.ecsp-a.example".into())]);
    }

    #[test]
    fn each_unapproved_name_is_refused_by_its_rule() {
        let ip = |s: &str| RequestedName::Ip(s.parse().unwrap());
        let cases: Vec<(RequestedName, &[&str], &str)> = vec![
            (
                RequestedName::Dns("ees1.ecsp-b.example".into()),
                &[],
                "endpoint_names",
            ),
            (
                RequestedName::Dns("ecs.mno.example".into()),
                &[],
                "endpoint_names",
            ),
            (
                RequestedName::Dns("ecs-alt.MNO.example".into()),
                &[],
                "endpoint_names",
            ),
            (ip("10.20.0.5"), &[], "endpoint_addresses"),
            (ip("10.30.0.5"), &["10.20.0.0/16"], "endpoint_addresses"),
            (ip("127.0.0.1"), &["127.0.0.0/8"], "endpoint_addresses"),
            (
                RequestedName::Uri {
                    uri: "https://ecs.mno.example/x".into(),
                    host: Some(UriHost::Dns("ecs.mno.example".into())),
                },
                &[],
                "endpoint_names",
            ),
            (
                RequestedName::Uri {
                    uri: "urn:ees:1".into(),
                    host: None,
                },
                &[],
                "endpoint_names",
            ),
        ];
        for (name, ranges, rule) in cases {
            let e = run(std::slice::from_ref(&name), ranges).unwrap_err();
            assert!(e.starts_with(rule), "{name:?}: {e}");
        }
    }

    #[test]
    fn addresses_inside_a_range_and_uris_with_approved_hosts_pass() {
        let got = run(
            &[
                RequestedName::Ip("10.20.0.5".parse().unwrap()),
                RequestedName::Uri {
                    uri: "https://ees1.edn1.ecsp-a.example/api".into(),
                    host: Some(UriHost::Dns("ees1.edn1.ecsp-a.example".into())),
                },
            ],
            &["10.20.0.0/16"],
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                SanName::Ip("10.20.0.5".parse().unwrap()),
                SanName::Uri("https://ees1.edn1.ecsp-a.example/api".into()),
                SanName::Dns("ees1.edn1.ecsp-a.example".into()),
            ]
        );
    }
}
