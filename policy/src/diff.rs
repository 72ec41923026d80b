//! What a policy change moves, rule by rule.

use crate::*;
use serde::Serialize;
use std::fmt;

/// How a policy change moves a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Added,
    Removed,
    /// Admits less than before.
    Tightened,
    /// Admits more than before.
    Loosened,
    /// Different, neither strictly more nor less (a backend, a set that gained and lost).
    Changed,
}

/// One rule's change between two policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleChange {
    pub rule: String,
    pub change: ChangeKind,
    pub detail: String,
}

/// `a, b` for people; `none` for an empty list.
fn listed<T: fmt::Display>(xs: &[&T]) -> String {
    if xs.is_empty() {
        return "none".into();
    }
    xs.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A value that may be absent, for people: the value, or `(none)`.
fn shown<T: fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "(none)".into(), |v| v.to_string())
}

fn set_change<T: PartialEq + fmt::Display>(
    rule: String,
    old: &[T],
    new: &[T],
    more_is_looser: bool,
) -> Option<RuleChange> {
    let added: Vec<&T> = new.iter().filter(|x| !old.contains(x)).collect();
    let removed: Vec<&T> = old.iter().filter(|x| !new.contains(x)).collect();
    let change = match (added.is_empty(), removed.is_empty()) {
        (true, true) => return None,
        (false, true) if more_is_looser => ChangeKind::Loosened,
        (false, true) => ChangeKind::Tightened,
        (true, false) if more_is_looser => ChangeKind::Tightened,
        (true, false) => ChangeKind::Loosened,
        (false, false) => ChangeKind::Changed,
    };
    Some(RuleChange {
        rule,
        change,
        detail: format!("added {}; removed {}", listed(&added), listed(&removed)),
    })
}

fn order_change<T: PartialOrd + fmt::Display>(
    rule: String,
    old: T,
    new: T,
    more_is_looser: bool,
) -> Option<RuleChange> {
    if old == new {
        return None;
    }
    let looser = (new > old) == more_is_looser;
    Some(RuleChange {
        rule,
        change: if looser {
            ChangeKind::Loosened
        } else {
            ChangeKind::Tightened
        },
        detail: format!("{old} → {new}"),
    })
}

/// What changes, rule by rule, from `old` to `new` domains.
pub fn diff_domains(
    old: &std::collections::BTreeMap<String, DomainPolicy>,
    new: &std::collections::BTreeMap<String, DomainPolicy>,
) -> Vec<RuleChange> {
    let mut out = Vec::new();
    for (name, o) in old {
        let Some(n) = new.get(name) else {
            out.push(RuleChange {
                rule: format!("domains.{name}"),
                change: ChangeKind::Removed,
                detail: "the domain is removed: it admits nothing".into(),
            });
            continue;
        };
        // Every field is named: a new rule that the diff does not compare does not compile
        // until it is added here and compared below.
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
        } = o;
        let k = |key: &str| format!("domains.{name}.{key}");
        out.extend(set_change(
            k("token_issuers"),
            &o.token_issuers,
            &n.token_issuers,
            true,
        ));
        out.extend(set_change(k("ees_ids"), &o.ees_ids, &n.ees_ids, true));
        out.extend(set_change(k("key_types"), &o.key_types, &n.key_types, true));
        let endpoint_names =
            |d: &DomainPolicy| d.endpoint_names.clone().unwrap_or(d.ees_ids.clone());
        out.extend(set_change(
            k("endpoint_names"),
            &endpoint_names(o),
            &endpoint_names(n),
            true,
        ));
        out.extend(set_change(
            k("endpoint_addresses"),
            &o.endpoint_addresses,
            &n.endpoint_addresses,
            true,
        ));
        out.extend(order_change(
            k("cert_validity"),
            o.cert_validity,
            n.cert_validity,
            true,
        ));
        out.extend(order_change(
            k("max_registration"),
            o.max_registration,
            n.max_registration,
            true,
        ));
        if o.backend != n.backend {
            out.push(RuleChange {
                rule: k("backend"),
                change: ChangeKind::Changed,
                detail: format!(
                    "{} → {}",
                    shown(o.backend.as_ref()),
                    shown(n.backend.as_ref())
                ),
            });
        }
        if o.secret_token != n.secret_token {
            out.push(RuleChange {
                rule: k("secret_token"),
                change: ChangeKind::Changed,
                detail: format!("{} → {}", o.secret_token, n.secret_token),
            });
        }
        let (ot, nt) = (
            o.third_party.clone().unwrap_or_default(),
            n.third_party.clone().unwrap_or_default(),
        );
        if ot.accept != nt.accept {
            out.push(RuleChange {
                rule: k("third_party.accept"),
                change: if nt.accept {
                    ChangeKind::Loosened
                } else {
                    ChangeKind::Tightened
                },
                detail: format!("{} → {}", ot.accept, nt.accept),
            });
        }
        out.extend(set_change(
            k("third_party.trust_anchors"),
            &ot.trust_anchors,
            &nt.trust_anchors,
            true,
        ));
        out.extend(set_change(
            k("third_party.require_eku"),
            &ot.require_eku,
            &nt.require_eku,
            false,
        ));
        out.extend(set_change(k("third_party.crls"), &ot.crls, &nt.crls, false));
        if ot.names_must_match != nt.names_must_match {
            out.push(RuleChange {
                rule: k("third_party.names_must_match"),
                change: if nt.names_must_match {
                    ChangeKind::Tightened
                } else {
                    ChangeKind::Loosened
                },
                detail: format!("{} → {}", ot.names_must_match, nt.names_must_match),
            });
        }
        let secs = |d: Option<PolicyDuration>| d.map(|d| d.as_secs()).unwrap_or(u64::MAX);
        if ot.max_validity != nt.max_validity {
            out.push(RuleChange {
                rule: k("third_party.max_validity"),
                change: if secs(nt.max_validity) > secs(ot.max_validity) {
                    ChangeKind::Loosened
                } else {
                    ChangeKind::Tightened
                },
                detail: format!("{} → {}", shown(ot.max_validity), shown(nt.max_validity)),
            });
        }
    }
    for name in new.keys().filter(|n| !old.contains_key(*n)) {
        out.push(RuleChange {
            rule: format!("domains.{name}"),
            change: ChangeKind::Added,
            detail: "a new domain".into(),
        });
    }
    out
}

#[cfg(test)]
mod diff_tests {
    use super::*;

    #[test]
    fn a_change_is_named_and_classified() {
        let old: std::collections::BTreeMap<String, DomainPolicy> = toml::from_str::<toml::Table>(
            "[a]\ntoken_issuers=[\"x\"]\nees_ids=[\"*.a\"]\ncert_validity=\"30d\"\n[b]\nees_ids=[\"*\"]\n",
        )
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.try_into().unwrap()))
        .collect();
        let mut new = old.clone();
        new.get_mut("a").unwrap().cert_validity = PolicyDuration::from_secs(10 * 86_400);
        new.get_mut("a").unwrap().ees_ids.push("*.a2".into());
        new.get_mut("a")
            .unwrap()
            .key_types
            .retain(|k| *k != KeyType::Rsa2048);
        new.remove("b");
        let d = diff_domains(&old, &new);
        let find = |r: &str| d.iter().find(|c| c.rule == r).map(|c| c.change);
        assert_eq!(find("domains.a.cert_validity"), Some(ChangeKind::Tightened));
        assert_eq!(find("domains.a.ees_ids"), Some(ChangeKind::Loosened));
        assert_eq!(find("domains.a.key_types"), Some(ChangeKind::Tightened));
        assert_eq!(find("domains.b"), Some(ChangeKind::Removed));
        assert_eq!(find("domains.a.token_issuers"), None);
    }

    #[test]
    fn details_are_written_for_people_not_as_rust_values() {
        let old: std::collections::BTreeMap<String, DomainPolicy> = toml::from_str::<toml::Table>(
            "[a]\nees_ids=[\"*.a\"]\n[a.third_party]\naccept=true\nmax_validity=\"398d\"\n",
        )
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.try_into().unwrap()))
        .collect();
        let mut new = old.clone();
        let a = new.get_mut("a").unwrap();
        a.ees_ids = vec!["*.b".into()];
        a.backend = Some("hsm".into());
        a.secret_token = SecretTokenMode::Always;
        a.third_party.as_mut().unwrap().max_validity = Some(PolicyDuration::from_secs(90 * 86_400));
        let d = diff_domains(&old, &new);
        let detail = |r: &str| d.iter().find(|c| c.rule == r).unwrap().detail.clone();
        assert_eq!(detail("domains.a.ees_ids"), "added *.b; removed *.a");
        assert_eq!(detail("domains.a.backend"), "(none) → hsm");
        assert_eq!(detail("domains.a.secret_token"), "on_request → always");
        assert_eq!(detail("domains.a.third_party.max_validity"), "398d → 90d");
    }
}
