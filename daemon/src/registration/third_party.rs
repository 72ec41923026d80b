//! Solution #12 step 4, and after: a third-party certificate becomes an EES certificate only
//! if the domain's policy trusts it, and authenticates only while the policy in force still
//! does. The one place a third-party chain is judged.

use super::*;

pub use crate::store::THIRD_PARTY;

/// Judges a chain by the domain's policy in force now, with its CRLs fetched when due.
#[allow(clippy::too_many_arguments)]
async fn judge_third_party(
    app: &App,
    chain: &[Vec<u8>],
    domain_name: &str,
    domain: &DomainPolicy,
    token_issuer: &str,
    profile: &body::Profile,
    requested_expiry: Option<i64>,
    secret_token_requested: bool,
    now: i64,
) -> Result<crate::trust::Judgement, ApiError> {
    let policy = app.policy();
    let trust = policy.third_party.get(domain_name);
    let crls = match trust {
        Some(t) if !t.crls.is_empty() => Some(t.crls().await),
        _ => None,
    };
    let requested = profile.requested_names();
    crate::trust::judge(
        domain_name,
        domain,
        crate::trust::ChainCase {
            chain,
            anchors: trust.map(|t| t.anchors.as_slice()).unwrap_or_default(),
            crls,
            token_issuer,
            ees_id: &profile.ees_id,
            endpoint: endpoint_facts(app, profile, &requested),
            requested_expiry,
            secret_token_requested,
            now,
        },
    )
    .map_err(|why| {
        let rule = format!("domains.{domain_name}.third_party.trust_anchors");
        ApiError {
            rule: Some(rule.clone()),
            ..ApiError::new(Cause::UntrustedClientCert, format!("{why} (rule {rule})"))
        }
    })
}

/// Solution #12 step 4: the chain presented in this handshake, judged by the domain's
/// third-party policy. Returns the approval and the certificate record to store.
#[allow(clippy::too_many_arguments)]
pub(super) async fn third_party_decision(
    app: &App,
    ctx: &RequestCtx,
    token: &crate::token::VerifiedToken,
    req: &RegistrationBody,
    domain_name: &str,
    domain: &DomainPolicy,
    now: i64,
    f: &mut Facts,
) -> Result<(ecs_policy::Approval, CertRecord), ApiError> {
    let chain: Vec<Vec<u8>> = ctx.client_chain.as_ref().clone();
    if chain.is_empty() {
        return Err(ApiError::new(
            Cause::ClientCertRequired,
            "thirdPartyCert: true needs the third-party certificate chain in the TLS handshake",
        ));
    }
    let judged = judge_third_party(
        app,
        &chain,
        domain_name,
        domain,
        &token.issuer_name,
        &req.profile,
        req.exp_time,
        req.onboarding.as_ref().is_some_and(|o| o.secret_token),
        now,
    )
    .await?;
    let leaf = &judged.leaf;
    f.cert_serial = Some(leaf.serial_hex.clone());
    f.cert_fingerprint = Some(leaf.fingerprint.clone());
    f.key = Some(leaf.key.describe());
    f.key_type = crate::trust::key_type(leaf.key.kind);
    // Whether the certificate is free is read once, by the caller, under its reservation.
    let approval = judged.decision.outcome?;
    // The chain as accepted: what the client sent after the leaf, then the anchor reached.
    let mut accepted: Vec<Vec<u8>> = chain[1..].to_vec();
    if let Some(anchor) = &judged.anchor
        && !accepted.contains(anchor)
    {
        accepted.push(anchor.clone());
    }
    let record = CertRecord {
        // Third-party serials are unique only per issuer: the fingerprint keys them here.
        serial: format!("tp-{}", leaf.fingerprint),
        registration_id: String::new(),
        backend: THIRD_PARTY.into(),
        der: chain[0].clone(),
        fingerprint: leaf.fingerprint.clone(),
        not_before: leaf.not_before,
        not_after: leaf.not_after,
        revoked: None,
        chain: accepted,
    };
    Ok((approval, record))
}

/// One certificate authenticates one registration: a third-party certificate that is the
/// current certificate of an active registration cannot onboard another. (Ending a
/// registration revokes its certificates here, which frees the certificate again.)
pub(super) async fn third_party_cert_free(app: &App, fingerprint: &str) -> Result<(), ApiError> {
    match app
        .store
        .third_party_cert_by_fingerprint(fingerprint)
        .await?
    {
        Some(existing) if existing.revoked.is_none() => Err(ApiError::new(
            Cause::UntrustedClientCert,
            "this certificate is already the EES certificate of another active registration",
        )),
        _ => Ok(()),
    }
}

/// A third-party certificate authenticates only while the domain's policy in force still
/// accepts it: anchors, CRLs, `accept` and every other rule, checked again at each use. The
/// verdict is cached per certificate until the policy is reloaded or a CRL changes, so the
/// check costs a map lookup on the common path.
pub(super) async fn third_party_still_trusted(
    app: &App,
    reg: &RegistrationRecord,
    cert: &CertRecord,
    now: i64,
) -> Result<(), ApiError> {
    let policy = app.policy();
    let trust = policy.third_party.get(&reg.domain);
    let crl_epoch = match trust {
        Some(t) => t.refresh_crls().await,
        None => 0,
    };
    let generation = (policy.generation, crl_epoch);
    if let Some(v) = app
        .third_party_verdicts
        .get(&cert.fingerprint, generation, now)
    {
        return v;
    }
    let verdict = async {
        let (domain_name, domain) = domain_of(app, reg.prov_id.as_deref())?;
        let profile = body::parse_profile(&reg.profile)?;
        let chain: Vec<Vec<u8>> = std::iter::once(cert.der.clone())
            .chain(cert.chain.iter().cloned())
            .collect();
        let judged = judge_third_party(
            app,
            &chain,
            &domain_name,
            &domain,
            &reg.token_issuer,
            &profile,
            Some(reg.exp_time),
            false,
            now,
        )
        .await?;
        judged.decision.outcome.map(|_| ()).map_err(ApiError::from)
    }
    .await;
    app.third_party_verdicts
        .put(&cert.fingerprint, generation, now, verdict.clone());
    verdict
}
