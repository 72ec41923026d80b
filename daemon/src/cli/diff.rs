//! `ecsd policy diff`: what a proposed policy changes, rule by rule, and what it would do to
//! the registrations in the store and to the refusals in the audit log.

use crate::audit::AuditRecord;
use crate::config::{Config, DEFAULT_DOMAIN};
use crate::store::{CertRecord, CertSource, RegistrationRecord};
use ecs_policy::{OnboardingFacts, RuleChange};
use serde::Serialize;

/// A registration the proposed policy would no longer admit.
#[derive(Debug, Serialize)]
pub struct NoLongerAdmitted {
    pub registration_id: String,
    pub ees_id: String,
    pub domain: String,
    pub cert_source: CertSource,
    pub rule: String,
    pub reason: String,
}

/// A refusal in the audit log that the proposed policy would admit.
#[derive(Debug, Serialize)]
pub struct NowAdmitted {
    pub seq: u64,
    pub time: String,
    pub ees_id: String,
    pub domain: String,
    pub refused_by: String,
}

#[derive(Debug, Serialize)]
pub struct Diff {
    pub current_policy_hash: String,
    pub proposed_policy_hash: String,
    pub rules: Vec<RuleChange>,
    pub no_longer_admitted: Vec<NoLongerAdmitted>,
    pub now_admitted: Vec<NowAdmitted>,
    /// Refusals that cannot be replayed (third-party chains are not in the audit log).
    pub not_replayed: usize,
}

/// Computes the diff from the current configuration, its store's contents, and the
/// proposed configuration, at time `now`.
/// The names the proposed ECS would call its own (never an EES's). One it cannot read is
/// said, not taken as none (which would approve every name); read before the store, so an
/// error in the proposal is named first.
pub fn proposed_own_names(proposed: &Config) -> Result<ecs_policy::OwnNames, String> {
    crate::app::own_names(proposed).map_err(|e| format!("--proposed: {e}"))
}

pub fn diff(
    current: &Config,
    proposed: &Config,
    own: &ecs_policy::OwnNames,
    registrations: &[(RegistrationRecord, CertRecord)],
    audit: &[AuditRecord],
    now: i64,
) -> Result<Diff, String> {
    let rules = ecs_policy::diff_domains(&current.domains, &proposed.domains);
    let mut no_longer_admitted = Vec::new();
    for (reg, cert) in registrations {
        let refuse = |rule: String, reason: String| NoLongerAdmitted {
            registration_id: reg.id.clone(),
            ees_id: reg.ees_id.clone(),
            domain: reg.domain.clone(),
            cert_source: reg.cert_source,
            rule,
            reason,
        };
        let Some(domain) = proposed.domains.get(&reg.domain) else {
            no_longer_admitted.push(refuse(
                format!("domains.{}", reg.domain),
                "the domain is removed".into(),
            ));
            continue;
        };
        let der = &cert.der;
        let Ok(leaf) = ecs_ca_backends::chain::leaf_facts(der) else {
            continue;
        };
        let description = leaf.key.describe();
        let (requested, ees_id_is_fqdn) =
            match crate::registration::body::parse_profile(&reg.profile) {
                Ok(p) => (p.requested_names(), p.ees_id_is_fqdn()),
                Err(e) => {
                    no_longer_admitted.push(refuse(
                        format!("domains.{}.endpoint_names", reg.domain),
                        format!("the stored profile no longer parses: {}", e.detail),
                    ));
                    continue;
                }
            };
        let endpoint = ecs_policy::EndpointFacts {
            requested: &requested,
            ees_id_is_fqdn,
            own,
        };
        let decision = if reg.cert_source == CertSource::ThirdParty {
            let mut chain = vec![der.clone()];
            chain.extend(cert.chain.iter().cloned());
            let tp = domain.third_party.clone().unwrap_or_default();
            // An anchor the proposed policy cannot read would refuse every such certificate:
            // said, not skipped.
            let anchors = match crate::trust::read_anchors(&reg.domain, &tp) {
                Ok(a) => a,
                Err(why) => {
                    no_longer_admitted.push(refuse(
                        format!("domains.{}.third_party.trust_anchors", reg.domain),
                        why,
                    ));
                    continue;
                }
            };
            match crate::trust::judge(
                &reg.domain,
                domain,
                crate::trust::ChainCase {
                    chain: &chain,
                    anchors: &anchors,
                    // CRLs are the partner's to publish; the diff judges the policy.
                    crls: None,
                    token_issuer: &reg.token_issuer,
                    ees_id: &reg.ees_id,
                    endpoint,
                    requested_expiry: Some(reg.exp_time),
                    secret_token_requested: false,
                    now,
                },
            ) {
                Ok(j) => j.decision,
                Err(_) => continue,
            }
        } else {
            domain.decide_onboarding(
                &reg.domain,
                &OnboardingFacts {
                    token_issuer: &reg.token_issuer,
                    ees_id: &reg.ees_id,
                    endpoint,
                    key_type: crate::trust::key_type(leaf.key.kind),
                    key_description: &description,
                    requested_expiry: Some(reg.exp_time),
                    secret_token_requested: false,
                    now,
                },
            )
        };
        if let Err(r) = decision.outcome {
            no_longer_admitted.push(refuse(r.rule, r.reason));
        }
    }
    let mut now_admitted = Vec::new();
    let mut not_replayed = 0;
    for rec in audit {
        let e = &rec.event;
        let policy_refusal = e.outcome == crate::audit::Outcome::Refused
            && e.action == crate::audit::Action::Register
            && e.rule.as_deref().is_some_and(|r| r.starts_with("domains."));
        if !policy_refusal {
            continue;
        }
        let (Some(ees_id), Some(iss)) = (&e.ees_id, &e.token_iss) else {
            not_replayed += 1;
            continue;
        };
        if e.cause.as_deref() == Some("UNTRUSTED_CLIENT_CERT") {
            not_replayed += 1;
            continue;
        }
        let domain_name = e.prov_id.clone().unwrap_or_else(|| DEFAULT_DOMAIN.into());
        let Some(domain) = proposed.domains.get(&domain_name) else {
            continue;
        };
        let issuer = proposed
            .token_issuers
            .iter()
            .find(|(_, i)| &i.issuer == iss)
            .map(|(n, _)| n.clone())
            .unwrap_or_default();
        let description = e.key.clone().unwrap_or_default();
        let decision = domain.decide_onboarding(
            &domain_name,
            &OnboardingFacts {
                token_issuer: &issuer,
                ees_id,
                endpoint: ecs_policy::EndpointFacts {
                    requested: &[],
                    ees_id_is_fqdn: ecs_policy::is_fqdn(ees_id),
                    own,
                },
                key_type: e.key_type,
                key_description: &description,
                requested_expiry: None,
                secret_token_requested: false,
                now,
            },
        );
        if decision.outcome.is_ok() {
            now_admitted.push(NowAdmitted {
                seq: rec.seq,
                time: e.time.clone(),
                ees_id: ees_id.clone(),
                domain: domain_name,
                refused_by: e.rule.clone().unwrap_or_default(),
            });
        }
    }
    Ok(Diff {
        current_policy_hash: current.policy_hash(),
        proposed_policy_hash: proposed.policy_hash(),
        rules,
        no_longer_admitted,
        now_admitted,
        not_replayed,
    })
}

/// The human rendering.
pub fn render_text(d: &Diff) -> String {
    let mut s = format!(
        "policy {} → {}\n",
        &d.current_policy_hash[..12.min(d.current_policy_hash.len())],
        &d.proposed_policy_hash[..12.min(d.proposed_policy_hash.len())]
    );
    if d.rules.is_empty() {
        s += "rules: no change\n";
    } else {
        s += "rules:\n";
        for r in &d.rules {
            s += &format!(
                "  {:<10} {:<44} {}\n",
                format!("{:?}", r.change).to_lowercase(),
                r.rule,
                r.detail
            );
        }
    }
    s += &format!(
        "active registrations no longer admitted: {}\n",
        d.no_longer_admitted.len()
    );
    for n in &d.no_longer_admitted {
        s += &format!(
            "  {} {} ({}, {}): {} — {}\n",
            n.registration_id, n.ees_id, n.domain, n.cert_source, n.rule, n.reason
        );
    }
    s += &format!(
        "refusals in the audit log now admitted: {}\n",
        d.now_admitted.len()
    );
    for n in &d.now_admitted {
        s += &format!(
            "  record {} {} {} ({}): refused by {}\n",
            n.seq, n.time, n.ees_id, n.domain, n.refused_by
        );
    }
    if d.not_replayed > 0 {
        s += &format!(
            "({} third-party refusals not replayed: their chains are not in the audit log)\n",
            d.not_replayed
        );
    }
    s
}
