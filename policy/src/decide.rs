//! The pure decisions: facts in, every rule evaluated in order, an approval or the refusal
//! naming the first rule that failed.

use crate::*;

/// The facts of one onboarding (or re-key) request, gathered by the daemon.
#[derive(Debug, Clone)]
pub struct OnboardingFacts<'a> {
    /// The configuration name of the token issuer whose signature was verified.
    pub token_issuer: &'a str,
    pub ees_id: &'a str,
    /// The names the EES asks its certificate to carry.
    pub endpoint: EndpointFacts<'a>,
    /// The type of the key in the CSR.
    pub key_type: Option<KeyType>,
    /// A human description of the key when `key_type` is `None` (e.g. "RSA 1024").
    pub key_description: &'a str,
    /// The `expTime` the EES proposed, in seconds since the Unix epoch.
    pub requested_expiry: Option<i64>,
    pub secret_token_requested: bool,
    /// The decision time, seconds since the Unix epoch.
    pub now: i64,
}

/// The facts of a change to an existing registration that keeps its certificate.
#[derive(Debug, Clone)]
pub struct UpdateFacts<'a> {
    /// The configuration name of the token issuer that onboarded the registration.
    pub token_issuer: &'a str,
    pub ees_id: &'a str,
    pub endpoint: EndpointFacts<'a>,
    pub requested_expiry: Option<i64>,
    pub now: i64,
}

/// Why a request was refused; the daemon maps each kind to one contract cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// The key is outside `key_types`: `WEAK_KEY`.
    WeakKey,
    /// Any other rule: `POLICY_REJECTED`.
    Rejected,
    /// A third-party certificate rule: `UNTRUSTED_CLIENT_CERT`.
    UntrustedCertificate,
}

/// A refusal, naming the rule that decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    /// Stable identifier of the rule, e.g. `domains.ecsp-a.ees_ids`.
    pub rule: String,
    pub reason: String,
}

/// What the policy approved for an onboarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    pub backend: Option<String>,
    /// The subjectAltNames the certificate carries: the only names an issuer is given.
    pub names: Vec<SanName>,
    /// Requested certificate lifetime in seconds, before the issuer caps it at its own
    /// `notAfter`.
    pub cert_validity_secs: u64,
    /// The registration's expiry (seconds since the epoch) as the ECS decided it.
    pub registration_expiry: i64,
    pub issue_secret_token: bool,
}

/// One rule evaluated, in order, with its result: what `policy explain` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleResult {
    pub rule: String,
    pub passed: bool,
    pub detail: String,
}

/// The decision for one request: every rule evaluated and the outcome.
#[derive(Debug, Clone)]
pub struct Decision {
    pub evaluated: Vec<RuleResult>,
    pub outcome: Result<Approval, Refusal>,
}

/// Runs rules in order, logging each, and stops at the first that fails.
struct Rules<'a> {
    domain: &'a str,
    log: Vec<RuleResult>,
}

impl Rules<'_> {
    fn check(
        &mut self,
        key: &str,
        passed: bool,
        detail: String,
        kind: RefusalKind,
    ) -> Result<(), Refusal> {
        let rule = format!("domains.{}.{key}", self.domain);
        self.log.push(RuleResult {
            rule: rule.clone(),
            passed,
            detail: detail.clone(),
        });
        if passed {
            Ok(())
        } else {
            Err(Refusal {
                kind,
                rule,
                reason: detail,
            })
        }
    }
}

/// The facts of a request to accept a third-party certificate as the EES certificate
/// (`thirdPartyCert: true`), gathered by the daemon; the cryptography (path validation,
/// CRL signatures) was done before and is given as results.
#[derive(Debug, Clone)]
pub struct ThirdPartyFacts<'a> {
    pub token_issuer: &'a str,
    pub ees_id: &'a str,
    /// The names the EES asks for (its endpoint).
    pub endpoint: EndpointFacts<'a>,
    /// Path validation to this domain's trust anchors: the anchor reached, or why none was.
    pub path: Result<String, String>,
    /// `clientAuth`, `serverAuth` or dotted OIDs.
    pub leaf_ekus: &'a [String],
    /// The leaf's keyUsage allows digitalSignature (or it has no keyUsage): it can sign the
    /// TLS handshake it authenticates.
    pub leaf_allows_signing: bool,
    /// The subjectAltName entries of the leaf (dNSName, URI, iPAddress); never the CN.
    pub leaf_names: &'a [String],
    pub leaf_not_before: i64,
    pub leaf_not_after: i64,
    pub key_type: Option<KeyType>,
    pub key_description: &'a str,
    /// The CRL check when the domain lists CRLs: `Err` says why the leaf is refused
    /// (revoked, not covered, CRL expired or unreachable).
    pub revocation: Option<Result<(), String>>,
    pub requested_expiry: Option<i64>,
    pub secret_token_requested: bool,
    pub now: i64,
}

impl DomainPolicy {
    /// Decides an onboarding (POST, or a re-key by CSR) in domain `domain`.
    ///
    /// Rules are evaluated in a fixed order and evaluation stops at the first refusal, so the
    /// refusal names the first rule that failed.
    pub fn decide_onboarding(&self, domain: &str, facts: &OnboardingFacts<'_>) -> Decision {
        let mut rules = Rules {
            domain,
            log: Vec::new(),
        };
        let outcome = self.evaluate(&mut rules, facts);
        Decision {
            evaluated: rules.log,
            outcome,
        }
    }

    /// Decides whether a third-party certificate becomes this EES's certificate (solution
    /// #12 step 4). Third-party rules refuse with [`RefusalKind::UntrustedCertificate`].
    pub fn decide_third_party(&self, domain: &str, facts: &ThirdPartyFacts<'_>) -> Decision {
        let mut rules = Rules {
            domain,
            log: Vec::new(),
        };
        let outcome = self.evaluate_third_party(&mut rules, facts);
        Decision {
            evaluated: rules.log,
            outcome,
        }
    }

    fn admission(
        &self,
        r: &mut Rules<'_>,
        token_issuer: &str,
        ees_id: &str,
    ) -> Result<(), Refusal> {
        let domain = r.domain;
        let issuer_ok = self.token_issuers.iter().any(|i| i == token_issuer);
        r.check(
            "token_issuers",
            issuer_ok,
            if issuer_ok {
                format!("token issuer {token_issuer:?} is trusted")
            } else {
                format!("token issuer {token_issuer:?} is not trusted by domain {domain:?}")
            },
            RefusalKind::Rejected,
        )?;
        let pattern = self.ees_ids.iter().find(|p| glob_match(p, ees_id));
        r.check(
            "ees_ids",
            pattern.is_some(),
            match pattern {
                Some(p) => format!("eesId {ees_id:?} matches {p:?}"),
                None => format!("eesId {ees_id:?} matches none of {:?}", self.ees_ids),
            },
            RefusalKind::Rejected,
        )
    }

    /// The endpoint rules: every name the EES asks for is approved, or the first that is not
    /// refuses the request (`POLICY_REJECTED`, whatever path asked).
    fn names(
        &self,
        r: &mut Rules<'_>,
        ees_id: &str,
        endpoint: &EndpointFacts<'_>,
    ) -> Result<Vec<SanName>, Refusal> {
        let (patterns, key) = match &self.endpoint_names {
            Some(p) => (p.as_slice(), "endpoint_names"),
            None => (
                self.ees_ids.as_slice(),
                "ees_ids, as endpoint_names is absent",
            ),
        };
        match names::approve(patterns, key, &self.endpoint_addresses, ees_id, endpoint) {
            Ok(approved) => {
                let list: Vec<String> = approved.iter().map(|n| n.to_string()).collect();
                r.check(
                    "endpoint_names",
                    true,
                    format!("certificate names approved: {}", list.join(", ")),
                    RefusalKind::Rejected,
                )?;
                Ok(approved)
            }
            Err(refused) => {
                r.check(refused.rule, false, refused.reason, RefusalKind::Rejected)?;
                unreachable!("a failed check returns Err")
            }
        }
    }

    fn key_rule(
        &self,
        r: &mut Rules<'_>,
        key_type: Option<KeyType>,
        description: &str,
        kind: RefusalKind,
    ) -> Result<(), Refusal> {
        let key_ok = key_type.is_some_and(|k| self.key_types.contains(&k));
        let names: Vec<&str> = self.key_types.iter().map(|k| k.name()).collect();
        r.check(
            "key_types",
            key_ok,
            if key_ok {
                format!("key {description} is allowed")
            } else {
                format!(
                    "key {description} is not allowed; allowed: {}",
                    names.join(", ")
                )
            },
            kind,
        )
    }

    fn grant(
        &self,
        r: &mut Rules<'_>,
        names: Vec<SanName>,
        requested_expiry: Option<i64>,
        secret_requested: bool,
        now: i64,
    ) -> Result<Approval, Refusal> {
        let secret_ok = !(secret_requested && self.secret_token == SecretTokenMode::Never);
        r.check(
            "secret_token",
            secret_ok,
            if secret_ok {
                "Secret_token rule holds".into()
            } else {
                "a Secret_token was requested but this domain never issues one".into()
            },
            RefusalKind::Rejected,
        )?;
        let issue_secret_token = match self.secret_token {
            SecretTokenMode::Never => false,
            SecretTokenMode::OnRequest => secret_requested,
            SecretTokenMode::Always => true,
        };
        let registration_expiry = self.registration_expiry(requested_expiry, now);
        r.check(
            "max_registration",
            true,
            format!(
                "registration expires at {registration_expiry} (cap {} from now)",
                self.max_registration
            ),
            RefusalKind::Rejected,
        )?;
        Ok(Approval {
            backend: self.backend.clone(),
            names,
            cert_validity_secs: self.cert_validity.as_secs().min(MAX_CERT_VALIDITY_SECS),
            registration_expiry,
            issue_secret_token,
        })
    }

    fn evaluate(
        &self,
        r: &mut Rules<'_>,
        facts: &OnboardingFacts<'_>,
    ) -> Result<Approval, Refusal> {
        self.admission(r, facts.token_issuer, facts.ees_id)?;
        let names = self.names(r, facts.ees_id, &facts.endpoint)?;
        self.key_rule(
            r,
            facts.key_type,
            facts.key_description,
            RefusalKind::WeakKey,
        )?;
        self.grant(
            r,
            names,
            facts.requested_expiry,
            facts.secret_token_requested,
            facts.now,
        )
    }

    fn evaluate_third_party(
        &self,
        r: &mut Rules<'_>,
        f: &ThirdPartyFacts<'_>,
    ) -> Result<Approval, Refusal> {
        use RefusalKind::UntrustedCertificate as U;
        self.admission(r, f.token_issuer, f.ees_id)?;
        let names = self.names(r, f.ees_id, &f.endpoint)?;
        let tp = self.third_party.clone().unwrap_or_default();
        r.check(
            "third_party.accept",
            tp.accept,
            if tp.accept {
                "this domain accepts third-party EES certificates".into()
            } else {
                "this domain does not accept third-party EES certificates".into()
            },
            U,
        )?;
        r.check(
            "third_party.trust_anchors",
            f.path.is_ok(),
            match &f.path {
                Ok(a) => format!("the chain validates to trust anchor {a}"),
                Err(why) => {
                    format!("the chain does not validate to this domain's trust anchors: {why}")
                }
            },
            U,
        )?;
        let missing: Vec<&String> = tp
            .require_eku
            .iter()
            .filter(|e| !f.leaf_ekus.contains(e))
            .collect();
        r.check(
            "third_party.require_eku",
            missing.is_empty(),
            if missing.is_empty() {
                format!("extendedKeyUsage has {:?}", tp.require_eku)
            } else {
                format!("extendedKeyUsage lacks {missing:?} (has {:?})", f.leaf_ekus)
            },
            U,
        )?;
        r.check(
            "third_party.key_usage",
            f.leaf_allows_signing,
            if f.leaf_allows_signing {
                "keyUsage allows digitalSignature".into()
            } else {
                "keyUsage lacks digitalSignature: the certificate cannot authenticate a TLS client"
                    .into()
            },
            U,
        )?;
        let endpoint_names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let matching = f.leaf_names.iter().find(|n| {
            n.eq_ignore_ascii_case(f.ees_id)
                || endpoint_names.iter().any(|e| e.eq_ignore_ascii_case(n))
        });
        let names_ok = !tp.names_must_match || matching.is_some();
        r.check(
            "third_party.names_must_match",
            names_ok,
            match (tp.names_must_match, matching) {
                (false, _) => "names are not required to match".into(),
                (true, Some(n)) => format!("the certificate names {n:?}"),
                (true, None) => format!(
                    "the certificate names {:?}, none of which is the eesId {:?} or the endpoint {:?}",
                    f.leaf_names, f.ees_id, endpoint_names
                ),
            },
            U,
        )?;
        let lifetime = f.leaf_not_after - f.leaf_not_before;
        let max = tp.max_validity.map(|d| d.as_secs() as i64);
        let validity_ok = max.is_none_or(|m| lifetime <= m);
        r.check(
            "third_party.max_validity",
            validity_ok,
            match tp.max_validity {
                Some(m) if validity_ok => format!("validity {lifetime} s is within {m}"),
                Some(m) => format!("validity {lifetime} s is longer than {m}"),
                None => "no maximum validity".into(),
            },
            U,
        )?;
        self.key_rule(r, f.key_type, f.key_description, U)?;
        match &f.revocation {
            None => r.check("third_party.crls", true, "no CRL is configured".into(), U)?,
            Some(Ok(())) => r.check(
                "third_party.crls",
                true,
                "not revoked on the configured CRLs".into(),
                U,
            )?,
            Some(Err(why)) => r.check("third_party.crls", false, why.clone(), U)?,
        }
        let mut approval = self.grant(
            r,
            names,
            f.requested_expiry,
            f.secret_token_requested,
            f.now,
        )?;
        approval.cert_validity_secs = lifetime.max(0) as u64;
        Ok(approval)
    }

    /// The registration expiry the ECS grants: the proposal, capped at `max_registration`
    /// from `now`; with no proposal, the cap itself.
    pub fn registration_expiry(&self, requested: Option<i64>, now: i64) -> i64 {
        let cap = now.saturating_add(self.max_registration.as_secs() as i64);
        match requested {
            Some(t) => t.min(cap),
            None => cap,
        }
    }

    /// Decides a change to a registration that keeps its certificate (PUT or PATCH without
    /// a new key): the registration's token issuer and EES ID must still be admitted, every
    /// endpoint name approved, and the new `expTime` is capped as at onboarding.
    pub fn decide_update(&self, domain: &str, facts: &UpdateFacts<'_>) -> Decision {
        let mut r = Rules {
            domain,
            log: Vec::new(),
        };
        let outcome = (|| {
            self.admission(&mut r, facts.token_issuer, facts.ees_id)?;
            let names = self.names(&mut r, facts.ees_id, &facts.endpoint)?;
            self.grant(&mut r, names, facts.requested_expiry, false, facts.now)
        })();
        Decision {
            evaluated: r.log,
            outcome,
        }
    }

    /// Whether an update may keep this EES ID (a PUT or PATCH re-checks the profile).
    pub fn admits_ees_id(&self, domain: &str, ees_id: &str) -> Result<(), Refusal> {
        if self.ees_ids.iter().any(|p| glob_match(p, ees_id)) {
            Ok(())
        } else {
            Err(Refusal {
                kind: RefusalKind::Rejected,
                rule: format!("domains.{domain}.ees_ids"),
                reason: format!("eesId {ees_id:?} matches none of {:?}", self.ees_ids),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> DomainPolicy {
        toml::from_str(
            r#"
            token_issuers = ["ecsp-a-as"]
            ees_ids = ["*.ecsp-a.example"]
            backend = "hsm"
            cert_validity = "30d"
            max_registration = "365d"
            key_types = ["p256", "p384", "ed25519", "rsa3072", "rsa4096"]
            secret_token = "on_request"
            "#,
        )
        .unwrap()
    }

    static OWN: OwnNames = OwnNames {
        dns: Vec::new(),
        ips: Vec::new(),
    };

    /// The contract example's endpoint: its FQDN is the eesId.
    fn endpoint() -> EndpointFacts<'static> {
        EndpointFacts {
            requested: &[],
            ees_id_is_fqdn: true,
            own: &OWN,
        }
    }

    fn facts<'a>() -> OnboardingFacts<'a> {
        OnboardingFacts {
            token_issuer: "ecsp-a-as",
            ees_id: "ees1.edn1.ecsp-a.example",
            endpoint: endpoint(),
            key_type: Some(KeyType::P256),
            key_description: "ECDSA P-256",
            requested_expiry: None,
            secret_token_requested: true,
            now: 1_000_000,
        }
    }

    #[test]
    fn the_contract_example_is_approved() {
        let d = policy().decide_onboarding("ecsp-a", &facts());
        let a = d.outcome.unwrap();
        assert_eq!(a.backend.as_deref(), Some("hsm"));
        assert_eq!(a.cert_validity_secs, 30 * 86_400);
        assert_eq!(a.registration_expiry, 1_000_000 + 365 * 86_400);
        assert!(a.issue_secret_token);
        assert!(d.evaluated.iter().all(|r| r.passed));
    }

    #[test]
    fn each_refusal_names_its_rule() {
        type Case = (&'static str, Box<dyn Fn(&mut OnboardingFacts)>, RefusalKind);
        let cases: Vec<Case> = vec![
            (
                "domains.ecsp-a.token_issuers",
                Box::new(|f| f.token_issuer = "other"),
                RefusalKind::Rejected,
            ),
            (
                "domains.ecsp-a.ees_ids",
                Box::new(|f| f.ees_id = "ees1.ecsp-b.example"),
                RefusalKind::Rejected,
            ),
            (
                "domains.ecsp-a.key_types",
                Box::new(|f| f.key_type = Some(KeyType::Rsa2048)),
                RefusalKind::WeakKey,
            ),
            (
                "domains.ecsp-a.key_types",
                Box::new(|f| f.key_type = None),
                RefusalKind::WeakKey,
            ),
        ];
        for (rule, change, kind) in cases {
            let mut f = facts();
            change(&mut f);
            let refusal = policy()
                .decide_onboarding("ecsp-a", &f)
                .outcome
                .unwrap_err();
            assert_eq!(refusal.rule, rule);
            assert_eq!(refusal.kind, kind);
        }
    }

    #[test]
    fn secret_token_modes() {
        let mut p = policy();
        p.secret_token = SecretTokenMode::Never;
        let r = p.decide_onboarding("ecsp-a", &facts()).outcome.unwrap_err();
        assert_eq!(r.rule, "domains.ecsp-a.secret_token");
        let mut f = facts();
        f.secret_token_requested = false;
        assert!(
            !p.decide_onboarding("ecsp-a", &f)
                .outcome
                .unwrap()
                .issue_secret_token
        );
        p.secret_token = SecretTokenMode::Always;
        assert!(
            p.decide_onboarding("ecsp-a", &f)
                .outcome
                .unwrap()
                .issue_secret_token
        );
    }

    #[test]
    fn expiry_is_capped_by_max_registration() {
        let p = policy();
        assert_eq!(p.registration_expiry(Some(2_000_000), 1_000_000), 2_000_000);
        assert_eq!(
            p.registration_expiry(Some(i64::MAX), 1_000_000),
            1_000_000 + 365 * 86_400
        );
    }

    #[test]
    fn validation_names_the_key() {
        let mut p = policy();
        p.cert_validity = PolicyDuration::from_secs(4 * 365 * 86_400);
        p.backend = Some("nope".into());
        let known = Known {
            backends: &["hsm"],
            token_issuers: &["ecsp-a-as"],
        };
        let f = p.validate("ecsp-a", &known);
        let keys: Vec<_> = f
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .map(|f| f.key.as_str())
            .collect();
        assert_eq!(
            keys,
            ["domains.ecsp-a.backend", "domains.ecsp-a.cert_validity"]
        );
        assert!(policy().validate("ecsp-a", &known).is_empty());
    }

    fn third_party_policy() -> DomainPolicy {
        let mut p = policy();
        p.third_party = Some(
            toml::from_str(
                r#"
            accept = true
            trust_anchors = ["partner-root.pem"]
            require_eku = ["clientAuth"]
            names_must_match = true
            max_validity = "398d"
            "#,
            )
            .unwrap(),
        );
        p
    }

    #[test]
    fn third_party_rules_each_refuse_with_their_name() {
        let ekus = vec!["clientAuth".to_string(), "serverAuth".to_string()];
        let names = vec!["ees1.edn1.ecsp-a.example".to_string()];
        let other_names = vec!["bank.example".to_string()];
        let server_only = vec!["serverAuth".to_string()];
        let base = ThirdPartyFacts {
            token_issuer: "ecsp-a-as",
            ees_id: "ees1.edn1.ecsp-a.example",
            endpoint: endpoint(),
            path: Ok("partner-root.pem".into()),
            leaf_ekus: &ekus,
            leaf_allows_signing: true,
            leaf_names: &names,
            leaf_not_before: 0,
            leaf_not_after: 90 * 86_400,
            key_type: Some(KeyType::P256),
            key_description: "ECDSA P-256",
            revocation: None,
            requested_expiry: None,
            secret_token_requested: false,
            now: 1_000,
        };
        let ok = third_party_policy().decide_third_party("ecsp-a", &base);
        assert_eq!(ok.outcome.unwrap().cert_validity_secs, 90 * 86_400);
        let mut no_accept = third_party_policy();
        no_accept.third_party.as_mut().unwrap().accept = false;
        let r = no_accept
            .decide_third_party("ecsp-a", &base)
            .outcome
            .unwrap_err();
        assert_eq!(r.rule, "domains.ecsp-a.third_party.accept");
        let cases: Vec<(&str, ThirdPartyFacts)> = vec![
            (
                "third_party.trust_anchors",
                ThirdPartyFacts {
                    path: Err("unknown issuer".into()),
                    ..base.clone()
                },
            ),
            (
                "third_party.require_eku",
                ThirdPartyFacts {
                    leaf_ekus: &server_only,
                    ..base.clone()
                },
            ),
            (
                "third_party.key_usage",
                ThirdPartyFacts {
                    leaf_allows_signing: false,
                    ..base.clone()
                },
            ),
            (
                "third_party.names_must_match",
                ThirdPartyFacts {
                    leaf_names: &other_names,
                    ..base.clone()
                },
            ),
            (
                "third_party.names_must_match",
                ThirdPartyFacts {
                    leaf_names: &[],
                    ..base.clone()
                },
            ),
            (
                "third_party.max_validity",
                ThirdPartyFacts {
                    leaf_not_after: 400 * 86_400,
                    ..base.clone()
                },
            ),
            (
                "key_types",
                ThirdPartyFacts {
                    key_type: Some(KeyType::Rsa2048),
                    ..base.clone()
                },
            ),
            (
                "third_party.crls",
                ThirdPartyFacts {
                    revocation: Some(Err("revoked".into())),
                    ..base.clone()
                },
            ),
            (
                "ees_ids",
                ThirdPartyFacts {
                    ees_id: "x.ecsp-b.example",
                    ..base.clone()
                },
            ),
        ];
        for (rule, facts) in cases {
            let d = third_party_policy().decide_third_party("ecsp-a", &facts);
            let r = d.outcome.unwrap_err();
            assert_eq!(r.rule, format!("domains.ecsp-a.{rule}"));
            let expected = if rule == "ees_ids" {
                RefusalKind::Rejected
            } else {
                RefusalKind::UntrustedCertificate
            };
            assert_eq!(r.kind, expected, "{rule}");
            assert_eq!(
                d.evaluated.last().unwrap().rule,
                r.rule,
                "evaluation stops at the refusal"
            );
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<DomainPolicy>("ees_idz = []").unwrap_err();
        assert!(err.to_string().contains("ees_idz"));
    }
}
