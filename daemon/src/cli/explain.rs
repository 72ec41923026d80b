//! `ecsd policy explain`: the decision the running policy would take for one case, with
//! every rule evaluated in order. An audit tool: a token given here is read, not verified.

use crate::config::{Config, DEFAULT_DOMAIN};
use crate::store::CertSource;
use ecs_policy::{Decision, KeyType, OnboardingFacts, RefusalKind};
use serde_json::{Value, json};

/// One case to explain.
pub struct Case {
    pub domain: String,
    pub ees_id: Option<String>,
    /// An onboarding token (read for `iss`, `sub`, `provId`; not verified).
    pub token: Option<String>,
    /// The token issuer's configuration name, when no token is given.
    pub token_issuer: Option<String>,
    /// A third-party chain (PEM, leaf first): explains the third-party path.
    pub chain_pem: Option<String>,
    /// The key type of the CSR, for the ECS-issued path.
    pub key_type: KeyType,
    /// The endpoint the EES declares (`endPt`): an FQDN, IP addresses, or a URI; empty: none
    /// but the eesId.
    pub endpoint: Vec<String>,
    pub at: i64,
}

/// The decision, as text or JSON.
pub fn explain(cfg: &Config, case: &Case) -> Result<(Decision, Value), String> {
    let domain = cfg
        .domains
        .get(&case.domain)
        .ok_or_else(|| format!("--domain: no [domains.{}]", case.domain))?;
    let claims: Value = match &case.token {
        Some(t) => jsonwebtoken::dangerous::insecure_decode_claims(t)
            .map_err(|e| format!("--token: {e}"))?,
        None => Value::Null,
    };
    let issuer_name = match (&case.token_issuer, claims["iss"].as_str()) {
        (Some(n), _) => n.clone(),
        (None, Some(iss)) => cfg
            .token_issuers
            .iter()
            .find(|(_, i)| i.issuer == iss)
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| format!("(untrusted issuer {iss})")),
        (None, None) => "(no token)".into(),
    };
    let ees_id = case
        .ees_id
        .clone()
        .or_else(|| claims["sub"].as_str().map(String::from))
        .ok_or("give --ees-id or a --token with sub")?;
    let own = crate::app::own_names(cfg)?;
    let requested = endpoint_names(&case.endpoint)?;
    let endpoint = ecs_policy::EndpointFacts {
        requested: &requested,
        ees_id_is_fqdn: ecs_policy::is_fqdn(&ees_id),
        own: &own,
    };
    let decision = match &case.chain_pem {
        None => domain.decide_onboarding(
            &case.domain,
            &OnboardingFacts {
                token_issuer: &issuer_name,
                ees_id: &ees_id,
                endpoint,
                key_type: Some(case.key_type),
                key_description: case.key_type.name(),
                requested_expiry: None,
                secret_token_requested: false,
                now: case.at,
            },
        ),
        Some(pem) => {
            let chain =
                ecs_ca_backends::pem_chain_to_der(pem).map_err(|e| format!("--cert: {e}"))?;
            if chain.is_empty() {
                return Err("--cert: no certificate".into());
            }
            let tp = domain.third_party.clone().unwrap_or_default();
            let anchors = crate::trust::read_anchors(&case.domain, &tp)?;
            crate::trust::judge(
                &case.domain,
                domain,
                crate::trust::ChainCase {
                    chain: &chain,
                    anchors: &anchors,
                    crls: (!tp.crls.is_empty()).then(|| crl_files(&tp.crls)),
                    token_issuer: &issuer_name,
                    ees_id: &ees_id,
                    endpoint,
                    requested_expiry: None,
                    secret_token_requested: false,
                    now: case.at,
                },
            )
            .map_err(|e| format!("--cert: {e}"))?
            .decision
        }
    };
    let mut v = json!({
        "domain": case.domain,
        "eesId": ees_id,
        "tokenIssuer": issuer_name,
        "at": crate::clock::format_time(case.at),
        "path": if case.chain_pem.is_some() { CertSource::ThirdParty } else { CertSource::EcsIssued }.name(),
        "rules": decision.evaluated.iter().map(|r| json!({"rule": r.rule, "passed": r.passed, "detail": r.detail})).collect::<Vec<_>>(),
    });
    if let Some(p) = claims["provId"].as_str()
        && p != case.domain
        && !(case.domain == DEFAULT_DOMAIN && p.is_empty())
    {
        v["warning"] = json!(format!("the token's provId {p:?} is not this domain"));
    }
    match &decision.outcome {
        Ok(a) => {
            v["allowed"] = json!(true);
            v["approval"] = json!({
                "backend": a.backend.clone().unwrap_or_else(|| cfg.default_backend().to_string()),
                "certValiditySecs": a.cert_validity_secs,
                "registrationExpiry": crate::clock::format_time(a.registration_expiry),
                "secretToken": a.issue_secret_token,
            });
        }
        Err(r) => {
            let cause = match r.kind {
                RefusalKind::WeakKey => "WEAK_KEY",
                RefusalKind::Rejected => "POLICY_REJECTED",
                RefusalKind::UntrustedCertificate => "UNTRUSTED_CLIENT_CERT",
            };
            v["allowed"] = json!(false);
            v["refusal"] = json!({"rule": r.rule, "cause": cause, "reason": r.reason});
        }
    }
    Ok((decision, v))
}

/// `--endpoint` values read as an `endPt` would be: an IP address, a URI, or an FQDN.
fn endpoint_names(given: &[String]) -> Result<Vec<ecs_policy::RequestedName>, String> {
    let mut out = Vec::new();
    for e in given {
        let form = match e.parse::<std::net::IpAddr>() {
            Ok(ip) if ip.is_ipv4() => json!({ "ipv4Addrs": [e] }),
            Ok(_) => json!({ "ipv6Addrs": [e] }),
            Err(_) if e.contains(':') => json!({ "uri": e }),
            Err(_) => json!({ "fqdn": e }),
        };
        let profile = json!({ "eesId": "x", "endPt": form, "eecRegConf": false });
        let p = crate::registration::body::parse_profile(&profile)
            .map_err(|err| format!("--endpoint {e:?}: {}", err.detail))?;
        out.extend(p.requested_names());
    }
    Ok(out)
}

fn crl_files(crls: &[String]) -> Result<Vec<Vec<u8>>, String> {
    crls.iter()
        .map(|c| {
            if c.starts_with("https://") {
                return Err(format!(
                    "CRL {c} is not fetched by explain; the daemon fetches it"
                ));
            }
            crate::trust::read_crl_file(c).map_err(|e| format!("CRL {e}"))
        })
        .collect()
}

/// The human rendering.
pub fn render_text(v: &Value) -> String {
    let mut s = format!(
        "domain {}, EES ID {}, token issuer {}, {} path, at {}\n",
        v["domain"].as_str().unwrap_or(""),
        v["eesId"].as_str().unwrap_or(""),
        v["tokenIssuer"].as_str().unwrap_or(""),
        v["path"].as_str().unwrap_or(""),
        v["at"].as_str().unwrap_or("")
    );
    for r in v["rules"].as_array().into_iter().flatten() {
        s += &format!(
            "  {} {:<44} {}\n",
            if r["passed"] == json!(true) {
                "pass"
            } else {
                "FAIL"
            },
            r["rule"].as_str().unwrap_or(""),
            r["detail"].as_str().unwrap_or("")
        );
    }
    if let Some(w) = v["warning"].as_str() {
        s += &format!("  warning: {w}\n");
    }
    if v["allowed"] == json!(true) {
        let a = &v["approval"];
        s += &format!(
            "decision: ALLOWED (backend {}, certificate {} s, registration until {}, Secret_token {})\n",
            a["backend"].as_str().unwrap_or(""),
            a["certValiditySecs"],
            a["registrationExpiry"].as_str().unwrap_or(""),
            a["secretToken"]
        );
    } else {
        let r = &v["refusal"];
        s += &format!(
            "decision: REFUSED {} by {}: {}\n",
            r["cause"].as_str().unwrap_or(""),
            r["rule"].as_str().unwrap_or(""),
            r["reason"].as_str().unwrap_or("")
        );
    }
    s
}
