//! The registration pipeline (`contract/api.md` §2): onboarding, read, update, re-key,
//! merge-patch, de-registration and implicit expiry.
//!
//! Each operation gathers facts, asks the policy, signs if approved, and hands the store one
//! [`Commit`] that holds every change and its audit record. A refusal changes nothing and
//! leaves only its audit record.

use crate::app::App;
use crate::audit::{Action, AuditEvent, Outcome};
use crate::backends::Backend;
use crate::clock::now;
use crate::config::DEFAULT_DOMAIN;
pub mod body;
mod third_party;

pub use third_party::THIRD_PARTY;
use third_party::{third_party_cert_free, third_party_decision, third_party_still_trusted};

use crate::clock::format_time;
use crate::problem::{ApiError, Cause};
use crate::store::{
    CertRecord, CertSource, ClaimsCheck, Commit, RegState, RegistrationRecord, Revocation,
    SpentToken, StoreError,
};
use crate::token::{TokenError, VerifiedToken, random_b64};
use body::{RegistrationBody, parse_object, parse_registration};
use ecs_ca_backends::{CertTemplate, RevocationReason, SanEntry, parse_csr, sha256_hex};
use ecs_policy::{DomainPolicy, OnboardingFacts, SanName};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Instant;

/// Who is asking, as the transport saw it.
#[derive(Debug, Clone, Default)]
pub struct RequestCtx {
    pub client_addr: String,
    /// DER of the TLS client certificate (end entity), when one was presented.
    pub client_cert: Option<Vec<u8>>,
    /// The whole chain the client presented, end entity first.
    pub client_chain: Arc<Vec<Vec<u8>>>,
    /// The `Authorization: Bearer` value, when present.
    pub bearer: Option<String>,
}

/// A successful answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub location: Option<String>,
    /// The JSON body.
    pub body: Option<Vec<u8>>,
}

/// Facts collected while a request is handled, written to the audit log at its end.
#[derive(Debug, Default)]
struct Facts {
    action: Action,
    token_iss: Option<String>,
    token_sub: Option<String>,
    token_jti: Option<String>,
    ees_id: Option<String>,
    prov_id: Option<String>,
    registration_id: Option<String>,
    cert_serial: Option<String>,
    cert_fingerprint: Option<String>,
    key: Option<String>,
    key_type: Option<ecs_policy::KeyType>,
}

/// A CSR's key as the audit record names it: its description and its policy type.
type KeyFacts = (String, Option<ecs_policy::KeyType>);

/// What the policy approved for a CSR, and the CSR's public key (SPKI DER).
type Approved = (ecs_policy::Approval, Vec<u8>);

impl Facts {
    fn note_key(&mut self, key: Option<KeyFacts>) {
        if let Some((description, key_type)) = key {
            self.key = Some(description);
            self.key_type = key_type;
        }
    }

    fn new(action: Action) -> Self {
        Facts {
            action,
            ..Default::default()
        }
    }

    fn event(
        &self,
        app: &App,
        ctx: &RequestCtx,
        status: u16,
        err: Option<&ApiError>,
    ) -> AuditEvent {
        AuditEvent {
            time: format_time(now()),
            client: ctx.client_addr.clone(),
            action: self.action,
            outcome: if err.is_some() {
                Outcome::Refused
            } else {
                Outcome::Accepted
            },
            status,
            cause: err.map(|e| e.cause.code().to_string()),
            rule: err.and_then(|e| e.rule.clone()),
            detail: err.map(|e| e.detail.clone()),
            token_iss: self.token_iss.clone(),
            token_sub: self.token_sub.clone(),
            token_jti: self.token_jti.clone(),
            ees_id: self.ees_id.clone(),
            prov_id: self.prov_id.clone(),
            registration_id: self.registration_id.clone(),
            cert_serial: self.cert_serial.clone(),
            cert_fingerprint: self.cert_fingerprint.clone(),
            key: self.key.clone(),
            key_type: self.key_type,
            policy_hash: app.policy().hash.clone(),
        }
    }
}

/// Runs an operation, then records its outcome: a refusal goes to the audit log (the
/// accepted path wrote its record in its own commit) and every outcome to the metrics.
async fn audited<F>(
    app: &Arc<App>,
    ctx: &RequestCtx,
    action: Action,
    op: F,
) -> Result<Reply, ApiError>
where
    F: AsyncFnOnce(&mut Facts) -> Result<Reply, ApiError>,
{
    let mut facts = Facts::new(action);
    let ip = client_ip(ctx);
    // An address that keeps failing authentication is answered 429, not checked again.
    let result = match app
        .limiters
        .failed_auth_per_address
        .as_ref()
        .and_then(|g| g.blocked(&ip, Instant::now()))
    {
        Some(wait) => Err(too_many(
            wait,
            "too many failed authentications from this address",
        )),
        None => op(&mut facts).await,
    };
    if let (Err(e), Some(g)) = (&result, &app.limiters.failed_auth_per_address)
        && e.status() == 401
    {
        let _ = g.check(&ip, Instant::now());
    }
    // Counted as what it turned out to be (a PUT with a CSR is a re-key, not an update).
    let action = facts.action;
    match &result {
        Ok(_) => {
            app.metrics
                .requests
                .with_label_values(&[action.name(), "accepted", ""])
                .inc();
        }
        Err(e) => {
            app.metrics
                .requests
                .with_label_values(&[action.name(), "refused", e.cause.code()])
                .inc();
            if app
                .refusals
                .admit(&ip, e.cause.code(), Instant::now(), now())
            {
                let event = facts.event(app, ctx, e.status(), Some(e));
                record(app, event).await;
            } else {
                app.metrics.audit_refusals_aggregated.inc();
            }
        }
    }
    result
}

async fn record(app: &App, event: AuditEvent) {
    if let Err(e) = app.store.record(event).await {
        tracing::error!(error = %e, "could not write the audit record of a refusal");
    }
}

/// Writes one aggregate audit record for each flood of identical refusals whose window is
/// over (every one when `all`, at shutdown).
pub async fn record_aggregated_refusals(app: &App, all: bool) {
    for s in app.refusals.drain(Instant::now(), now(), all) {
        let event = AuditEvent {
            time: format_time(now()),
            client: s.client.clone(),
            action: Action::RefusalsAggregated,
            outcome: Outcome::Refused,
            status: 0,
            cause: Some(s.cause.clone()),
            detail: Some(format!(
                "{} more refusals with cause {} from {} between {} and {}, counted here instead of one record each",
                s.count,
                s.cause,
                s.client,
                format_time(s.from),
                format_time(s.to)
            )),
            policy_hash: app.policy().hash.clone(),
            ..Default::default()
        };
        record(app, event).await;
    }
}

/// 503 when more requests wait to be signed than `limits.signing_queue` allows.
fn busy() -> ApiError {
    ApiError {
        retry_after: Some(1),
        ..ApiError::new(
            Cause::BackendUnavailable,
            "the ECS is signing at capacity and its queue is full; retry later",
        )
    }
}

/// The client's address without its port: what rate limits count by.
fn client_ip(ctx: &RequestCtx) -> String {
    ctx.client_addr
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| ctx.client_addr.clone())
}

/// 429 with `Retry-After` (whole seconds, at least 1).
fn too_many(wait: std::time::Duration, why: &str) -> ApiError {
    ApiError {
        retry_after: Some(wait.as_secs() + 1),
        ..ApiError::new(Cause::TooManyRequests, why)
    }
}

/// Records a refusal decided before the pipeline ran (content type, body size) and
/// returns it, so that every refusal on the registration API is in the audit log.
pub async fn refuse(app: &Arc<App>, ctx: &RequestCtx, action: Action, e: ApiError) -> ApiError {
    let err = e.clone();
    match audited(app, ctx, action, async |_: &mut Facts| Err(e)).await {
        Err(e) => e,
        Ok(_) => err,
    }
}

/// The domain that governs a profile, from the policy in force now.
fn domain_of(app: &App, prov_id: Option<&str>) -> Result<(String, DomainPolicy), ApiError> {
    let name = prov_id.unwrap_or(DEFAULT_DOMAIN).to_string();
    match app.policy().domains.get(&name) {
        Some(d) => Ok((name, d.clone())),
        None => Err(ApiError {
            rule: Some(format!("domains.{name}")),
            ..ApiError::new(
                Cause::PolicyRejected,
                format!("no policy is configured for ECSP domain {name:?} (rule domains.{name})"),
            )
        }),
    }
}

/// A PUT cannot turn a registration into a third-party one: no policy rule decides that, so
/// the refusal names none (the audit record must not blame a rule that did not decide).
fn third_party_in_put() -> ApiError {
    ApiError {
        status_override: Some(403),
        ..ApiError::param(
            Cause::PolicyRejected,
            "/onboarding/thirdPartyCert",
            "a registration cannot switch to a third-party certificate: onboard anew with POST",
        )
    }
}

/// The name facts of a profile: what it asks for, and what this ECS never grants.
fn endpoint_facts<'a>(
    app: &'a App,
    profile: &body::Profile,
    requested: &'a [ecs_policy::RequestedName],
) -> ecs_policy::EndpointFacts<'a> {
    ecs_policy::EndpointFacts {
        requested,
        ees_id_is_fqdn: profile.ees_id_is_fqdn(),
        own: &app.own_names,
    }
}

/// Issues a certificate for `profile` with the key of `spki_der`, off the reactor. The
/// certificate carries exactly the names the policy approved.
async fn issue(
    app: &Arc<App>,
    backend: &Arc<Backend>,
    profile: &body::Profile,
    approval: &ecs_policy::Approval,
    csr: (&str, Vec<u8>),
) -> Result<CertRecord, ApiError> {
    let template = template(backend, profile, approval, csr);
    let (app, signer) = (app.clone(), backend.clone());
    backend
        .off_reactor(move || issue_here(&app, &signer, &template))
        .await?
}

/// The certificate `issue` asks for.
fn template(
    backend: &Backend,
    profile: &body::Profile,
    approval: &ecs_policy::Approval,
    csr: (&str, Vec<u8>),
) -> CertTemplate {
    let (csr_pem, spki_der) = csr;
    CertTemplate {
        common_name: profile.ees_id.clone(),
        organization: profile.prov_id.clone(),
        sans: approval
            .names
            .iter()
            .map(|n| match n {
                SanName::Dns(d) => SanEntry::Dns(d.clone()),
                SanName::Ip(ip) => SanEntry::Ip(*ip),
                SanName::Uri(u) => SanEntry::Uri(u.clone()),
            })
            .collect(),
        spki_der,
        now: now(),
        validity_secs: approval.cert_validity_secs,
        client_auth: true,
        server_auth: true,
        crl_url: backend.crl_url.clone(),
        csr_pem: Some(csr_pem.to_string()),
    }
}

/// Signs `template` with `backend` on this thread, which may block.
fn issue_here(
    app: &App,
    backend: &Backend,
    template: &CertTemplate,
) -> Result<CertRecord, ApiError> {
    let started = Instant::now();
    let issued = match backend.issuer.issue(template) {
        Ok(c) => c,
        Err(e) => {
            app.metrics
                .backend_errors
                .with_label_values(&[&backend.name])
                .inc();
            return Err(e.into());
        }
    };
    app.metrics
        .issuance_seconds
        .with_label_values(&[&backend.name])
        .observe(started.elapsed().as_secs_f64());
    Ok(CertRecord {
        serial: issued.serial_hex,
        registration_id: String::new(),
        backend: backend.name.clone(),
        der: issued.der,
        fingerprint: issued.fingerprint,
        not_before: issued.not_before,
        not_after: issued.not_after,
        revoked: None,
        chain: Vec::new(),
    })
}

/// Steps 6 to 8 of an onboarding with a CSR, in the order of the API reference: the claims
/// (`claims`, an embedded store read on this thread; `None` when they were checked before),
/// the CSR, the domain's policy, and then a twin request holding the token or the EES ID
/// (`twin`), refused once this body has been judged. The key's description comes back even
/// when the policy refuses, for the audit record.
#[allow(clippy::too_many_arguments)]
fn judge_onboarding(
    app: &App,
    claims: Option<&dyn ClaimsCheck>,
    token: &VerifiedToken,
    req: &RegistrationBody,
    domain_name: &str,
    domain: &DomainPolicy,
    twin: Option<ApiError>,
    now: i64,
) -> (Option<KeyFacts>, Result<Approved, ApiError>) {
    let profile = &req.profile;
    if let Some(store) = claims
        && let Err(e) = store.check_claims(&token.iss, &token.jti, &profile.ees_id)
    {
        return (None, Err(e.into()));
    }
    let onboarding = req.onboarding.as_ref();
    let csr_pem = onboarding
        .and_then(|o| o.csr.as_deref())
        .unwrap_or_default();
    let csr = match parse_csr(csr_pem) {
        Ok(c) => c,
        Err(e) => return (None, Err(e.into())),
    };
    let description = csr.key.describe();
    let key_type = crate::trust::key_type(csr.key.kind);
    let requested = profile.requested_names();
    let decision = domain.decide_onboarding(
        domain_name,
        &OnboardingFacts {
            token_issuer: &token.issuer_name,
            ees_id: &profile.ees_id,
            endpoint: endpoint_facts(app, profile, &requested),
            key_type,
            key_description: &description,
            requested_expiry: req.exp_time,
            secret_token_requested: onboarding.is_some_and(|o| o.secret_token),
            now,
        },
    );
    // The CSR checked here is the one issued for: parsed and verified once.
    let judged = match (decision.outcome, twin) {
        (Err(refusal), _) => Err(refusal.into()),
        (Ok(_), Some(twin)) => Err(twin),
        (Ok(approval), None) => Ok((approval, csr.spki_der)),
    };
    (Some((description, key_type)), judged)
}

/// Step 6: a spent token, or an EES ID another registration holds, refused before any work
/// by the store, which shows every commit made before the reservation was taken (a holder
/// before us released it only after its commit): one read is enough.
async fn check_claims(
    app: &App,
    token: &VerifiedToken,
    profile: &body::Profile,
) -> Result<(), ApiError> {
    app.store
        .check_claims(&token.iss, &token.jti, &profile.ees_id)
        .await?;
    Ok(())
}

async fn commit(app: &App, c: Commit) -> Result<(), ApiError> {
    app.store.commit(c).await?;
    Ok(())
}

fn secret_hash(ees_id: &str, token: &str) -> String {
    sha256_hex(format!("{ees_id}\n{token}").as_bytes())
}

/// An `EESRegistration` as the API answers it (fields in the order they always had).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Rendered<'a> {
    ees_prof: &'a Value,
    exp_time: String,
    onboarding: RenderedOnboarding<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    supp_feat: Option<&'a str>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct RenderedOnboarding<'a> {
    auth_info: AuthInfo<'a>,
    cert_chain: std::borrow::Cow<'a, [String]>,
    cert_exp_time: String,
    cert_source: CertSource,
    ees_cert: String,
    registration_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret_token: Option<&'a str>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct AuthInfo<'a> {
    auth_method: &'static str,
    cert_fingerprint: &'a str,
}

/// The stored registration as the API shows it, with `onboarding` (never the Secret_token,
/// except `secret_token` when just issued), as the JSON body.
fn render(
    app: &App,
    reg: &RegistrationRecord,
    cert: &CertRecord,
    secret_token: Option<&str>,
) -> Result<Vec<u8>, ApiError> {
    // An ECS-issued certificate comes with its backend's chain, encoded once at load.
    let backend = app.backend(&cert.backend);
    let cert_chain = match &backend {
        Some(b) if cert.chain.is_empty() => std::borrow::Cow::Borrowed(b.chain_pem()),
        _ => cert
            .chain
            .iter()
            .map(|d| ecs_ca_backends::der_to_pem(d, "CERTIFICATE"))
            .collect(),
    };
    let rendered = Rendered {
        ees_prof: &reg.profile,
        exp_time: format_time(reg.exp_time),
        onboarding: RenderedOnboarding {
            auth_info: AuthInfo {
                auth_method: "TLS_CLIENT_CERT",
                cert_fingerprint: &cert.fingerprint,
            },
            cert_chain,
            cert_exp_time: format_time(cert.not_after),
            cert_source: reg.cert_source,
            ees_cert: ecs_ca_backends::der_to_pem(&cert.der, "CERTIFICATE"),
            registration_id: &reg.id,
            secret_token,
        },
        supp_feat: reg.supp_feat.as_deref(),
    };
    serde_json::to_vec(&rendered).map_err(ApiError::internal)
}

fn location(app: &App, id: &str) -> String {
    format!(
        "{}/eecs-eesregistration/v1/registrations/{id}",
        app.cfg.public_base()
    )
}

/// `POST /registrations`: onboard an EES (solution #12 steps 3–5).
pub async fn create(app: &Arc<App>, ctx: &RequestCtx, body: &[u8]) -> Result<Reply, ApiError> {
    audited(app, ctx, Action::Register, async |f: &mut Facts| {
        create_inner(app, ctx, body, f).await
    })
    .await
}

async fn create_inner(
    app: &Arc<App>,
    ctx: &RequestCtx,
    body: &[u8],
    f: &mut Facts,
) -> Result<Reply, ApiError> {
    let now = now();
    if let Some(g) = &app.limiters.registrations_per_address {
        g.check(&client_ip(ctx), Instant::now())
            .map_err(|w| too_many(w, "too many registration requests from this address"))?;
    }
    let bearer = ctx.bearer.as_deref().ok_or(TokenError::Missing)?;
    let token = Arc::new(app.tokens.verify(bearer, now).await?);
    if let Some(g) = &app.limiters.registrations_per_issuer {
        g.check(&token.issuer_name, Instant::now())
            .map_err(|w| too_many(w, "too many registrations from this token issuer"))?;
    }
    f.token_iss = Some(token.iss.clone());
    f.token_sub = Some(token.sub.clone());
    f.token_jti = Some(token.jti.clone());

    let obj = parse_object(body)?;
    let req: Arc<RegistrationBody> = Arc::new(parse_registration(&obj, now)?);
    let profile = &req.profile;
    f.ees_id = Some(profile.ees_id.clone());
    f.prov_id = profile.prov_id.clone();
    let onboarding = req
        .onboarding
        .clone()
        .ok_or_else(|| ApiError::param(Cause::MandatoryIeMissing, "/onboarding", "is missing"))?;
    match (&onboarding.csr, onboarding.third_party_cert) {
        (Some(_), true) => {
            return Err(ApiError::param(
                Cause::MandatoryIeIncorrect,
                "/onboarding",
                "give exactly one of csr and thirdPartyCert: true",
            ));
        }
        (None, false) => {
            return Err(ApiError::param(
                Cause::MandatoryIeMissing,
                "/onboarding/csr",
                "is missing (or set thirdPartyCert: true)",
            ));
        }
        _ => {}
    }

    if token.sub != profile.ees_id {
        return Err(ApiError::new(
            Cause::EesIdMismatch,
            "the token's sub does not equal eesProf.eesId",
        ));
    }
    if let Some(p) = &token.prov_id
        && profile.prov_id.as_deref() != Some(p.as_str())
    {
        return Err(ApiError::new(
            Cause::EesIdMismatch,
            "the token's provId does not equal eesProf.provId",
        ));
    }
    let (domain_name, domain) = domain_of(app, profile.prov_id.as_deref())?;
    // Two requests with one token, or for one EES, never both reach the signer or the
    // store: the first holds a reservation, and the second is refused once its own body
    // has been judged (a broken CSR is answered as such, whoever else holds the token).
    let jti_key = format!("jti:{}\0{}", token.iss, token.jti);
    let ees_key = format!("ees:{}", profile.ees_id.to_ascii_lowercase());
    let reservation = app.reserve(vec![jti_key.clone(), ees_key]).map_err(|k| {
        if k == jti_key {
            ApiError::from(StoreError::TokenReplayed)
        } else {
            ApiError::from(StoreError::EesAlreadyRegistered)
        }
    });
    let backend_name = app.cfg.domain_backend(&domain).to_string();
    // What becomes the EES certificate: a third-party chain from this handshake, or a
    // certificate issued for the CSR's key. Held until the commit: the reservations, and the
    // signing slot (signing and storing are one unit of back-pressure).
    let (approval, mut cert, _held) = if onboarding.third_party_cert {
        check_claims(app, &token, profile).await?;
        let (approval, cert) =
            third_party_decision(app, ctx, &token, &req, &domain_name, &domain, now, f).await?;
        let reserved = reservation?;
        // One third-party certificate never serves two registrations: held the same way.
        let certificate = app
            .reserve(vec![format!("tp:{}", cert.fingerprint)])
            .map_err(|_| {
                ApiError::new(
                    Cause::UntrustedClientCert,
                    "this certificate is being registered by another request",
                )
            })?;
        third_party_cert_free(app, &cert.fingerprint).await?;
        let slot = app.signing.enter().await.ok_or_else(busy)?;
        (approval, cert, (reserved, Some(certificate), slot))
    } else {
        let Some(slot) = app.signing.enter().await else {
            // No slot and no room to wait for one: the request is judged all the same, so
            // that its answer is the first failing step's, and only then refused as busy.
            check_claims(app, &token, profile).await?;
            let twin = reservation.err();
            let (key, judged) =
                judge_onboarding(app, None, &token, &req, &domain_name, &domain, twin, now);
            f.note_key(key);
            judged?;
            return Err(busy());
        };
        // Steps 6 to 9 in one job where the backend signs: an onboarding leaves the reactor
        // once before its commit. The checks run in their documented order all the same; a
        // store that reads over the network is asked first, on the reactor.
        let backend = app
            .backend(&backend_name)
            .ok_or_else(|| ApiError::internal(format!("backend {backend_name} vanished")))?;
        let claims_here = app.store.blocking_claims();
        if claims_here.is_none() {
            check_claims(app, &token, profile).await?;
        }
        let twin = reservation.as_ref().err().cloned();
        let (job_app, job_token, job_req) = (app.clone(), token.clone(), req.clone());
        let (job_domain, job_backend) = (domain_name.clone(), backend.clone());
        let (key, outcome) = backend
            .off_reactor(move || {
                let (app, token, req) = (&*job_app, &*job_token, &*job_req);
                let claims = claims_here.as_deref();
                let (key, judged) =
                    judge_onboarding(app, claims, token, req, &job_domain, &domain, twin, now);
                let issued = judged.and_then(|(approval, spki)| {
                    let csr_pem = req.onboarding.as_ref().and_then(|o| o.csr.as_deref());
                    let csr = (csr_pem.unwrap_or_default(), spki);
                    let template = template(&job_backend, &req.profile, &approval, csr);
                    Ok((approval, issue_here(app, &job_backend, &template)?))
                });
                (key, issued)
            })
            .await?;
        f.note_key(key);
        let (approval, cert) = outcome?;
        (approval, cert, (reservation?, None, slot))
    };
    let cert_source = if cert.chain.is_empty() {
        CertSource::EcsIssued
    } else {
        CertSource::ThirdParty
    };
    let id = crate::token::registration_id();
    cert.registration_id = id.clone();
    if cert_source == CertSource::ThirdParty {
        // Third-party serials are unique only per issuer, and one certificate may serve
        // again after its registration ended: the record is keyed per registration.
        cert.serial = format!("{}-{id}", cert.serial);
    }
    f.registration_id = Some(id.clone());
    f.cert_serial = Some(cert.serial.clone());
    f.cert_fingerprint = Some(cert.fingerprint.clone());
    let secret_token = approval.issue_secret_token.then(|| random_b64(32));
    let reg = RegistrationRecord {
        id: id.clone(),
        state: RegState::Active,
        ees_id: profile.ees_id.clone(),
        prov_id: profile.prov_id.clone(),
        domain: domain_name,
        backend: backend_name,
        profile: profile.json.clone(),
        exp_time: approval.registration_expiry,
        supp_feat: req.supp_feat.clone(),
        created_at: now,
        updated_at: now,
        cert_source,
        current_cert: cert.serial.clone(),
        certs: vec![cert.serial.clone()],
        secret_token_hash: secret_token
            .as_deref()
            .map(|t| secret_hash(&profile.ees_id, t)),
        token_issuer: token.issuer_name.clone(),
    };
    let event = f.event(app, ctx, 201, None);
    commit(
        app,
        Commit {
            registration: Some(reg.clone()),
            claim_ees_id: true,
            new_certs: vec![cert.clone()],
            spend_token: Some(SpentToken {
                iss: token.iss.clone(),
                jti: token.jti.clone(),
                exp: token.exp,
            }),
            audit: Some(event),
            ..Default::default()
        },
    )
    .await?;
    tracing::info!(registration = %id, ees_id = %reg.ees_id, serial = %cert.serial, "EES registered");
    Ok(Reply {
        status: 201,
        location: Some(location(app, &id)),
        body: Some(render(app, &reg, &cert, secret_token.as_deref())?),
    })
}

/// How a request on an individual registration was authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthBy {
    ClientCert,
    SecretToken,
}

/// Authenticates a request on `/registrations/{id}` and loads the registration, expiring it
/// first when its time has passed.
async fn authorize(
    app: &App,
    ctx: &RequestCtx,
    id: &str,
    allow_secret_token: bool,
    f: &mut Facts,
) -> Result<(RegistrationRecord, CertRecord, AuthBy), ApiError> {
    f.registration_id = Some(id.to_string());
    let by = match (&ctx.client_cert, &ctx.bearer) {
        (Some(_), _) => AuthBy::ClientCert,
        (None, Some(_)) if allow_secret_token => AuthBy::SecretToken,
        _ => {
            return Err(ApiError::new(
                Cause::ClientCertRequired,
                "this resource needs the TLS client certificate bound to the registration",
            ));
        }
    };
    let not_found = || {
        ApiError::new(
            Cause::RegistrationNotFound,
            "no active registration with this ID",
        )
    };
    let reg = app.store.registration(id).await?.ok_or_else(not_found)?;
    f.ees_id = Some(reg.ees_id.clone());
    f.prov_id = reg.prov_id.clone();
    if reg.state != RegState::Active {
        return Err(not_found());
    }
    let now = now();
    if reg.exp_time <= now {
        expire(app, &ctx.client_addr, reg).await?;
        return Err(not_found());
    }
    let current = app
        .store
        .cert(&reg.current_cert)
        .await?
        .ok_or_else(|| ApiError::internal(format!("registration {id} lost its certificate")))?;
    match by {
        AuthBy::ClientCert => {
            let der = ctx.client_cert.as_deref().unwrap_or_default();
            let fp = sha256_hex(der);
            f.cert_fingerprint = Some(fp.clone());
            let owner = |detail: &str| ApiError::new(Cause::NotRegistrationOwner, detail);
            let cert = presented_cert(app, &current, der, &fp)
                .await?
                .ok_or_else(|| owner("the client certificate is not bound to this registration"))?;
            f.cert_serial = Some(cert.serial.clone());
            if cert.registration_id != id {
                return Err(owner(
                    "the client certificate is bound to another registration",
                ));
            }
            if let Some(r) = &cert.revoked {
                return Err(owner(&format!(
                    "the client certificate was revoked ({})",
                    r.reason.name()
                )));
            }
            if cert.serial != reg.current_cert {
                return Err(owner(
                    "the client certificate is not the registration's current one",
                ));
            }
            if now > cert.not_after || now < cert.not_before {
                return Err(owner("the client certificate is outside its validity"));
            }
            if cert.backend == THIRD_PARTY {
                third_party_still_trusted(app, &reg, &cert, now).await?;
            }
        }
        AuthBy::SecretToken => {
            let given = ctx.bearer.as_deref().unwrap_or_default();
            let ok = reg.secret_token_hash.as_deref().is_some_and(|h| {
                // Compare digests, so the time taken says nothing about the token.
                let mine = secret_hash(&reg.ees_id, given);
                aws_lc_rs::constant_time::verify_slices_are_equal(h.as_bytes(), mine.as_bytes())
                    .is_ok()
            });
            if !ok {
                return Err(ApiError::new(
                    Cause::InvalidToken,
                    "the Secret_token does not match this registration",
                ));
            }
        }
    }
    Ok((reg, current, by))
}

/// The stored record of the certificate a client presented, if there is one: the
/// registration's current certificate (the common case, already loaded), else an ECS-issued
/// certificate found by its serial, else a third-party one found by its fingerprint. A record
/// is the presented certificate only if their fingerprints are equal.
async fn presented_cert(
    app: &App,
    current: &CertRecord,
    der: &[u8],
    fingerprint: &str,
) -> Result<Option<CertRecord>, ApiError> {
    if current.fingerprint == fingerprint {
        return Ok(Some(current.clone()));
    }
    if let Some(serial) = ecs_ca_backends::cert_serial_hex(der)
        && let Some(issued) = app.store.cert(&serial).await?
        && issued.fingerprint == fingerprint
    {
        return Ok(Some(issued));
    }
    Ok(app
        .store
        .third_party_cert_by_fingerprint(fingerprint)
        .await?)
}

/// `GET /registrations/{id}`.
pub async fn get(app: &Arc<App>, ctx: &RequestCtx, id: &str) -> Result<Reply, ApiError> {
    audited(app, ctx, Action::Get, async |f: &mut Facts| {
        let _lock = app.lock_registration(id).await;
        let (reg, cert, _) = authorize(app, ctx, id, false, f).await?;
        Ok(Reply {
            status: 200,
            location: None,
            body: Some(render(app, &reg, &cert, None)?),
        })
    })
    .await
}

/// `PUT /registrations/{id}`: full replacement of `eesProf`/`expTime`, re-key with
/// `onboarding.csr` (by certificate, or by Secret_token when the key is lost).
pub async fn put(
    app: &Arc<App>,
    ctx: &RequestCtx,
    id: &str,
    body: &[u8],
) -> Result<Reply, ApiError> {
    audited(app, ctx, Action::Update, async |f: &mut Facts| {
        let _lock = app.lock_registration(id).await;
        let (reg, current, by) = authorize(app, ctx, id, true, f).await?;
        let now = now();
        let obj = parse_object(body)?;
        let req = parse_registration(&obj, now)?;
        let onboarding = req.onboarding.clone().unwrap_or_default();
        if by == AuthBy::SecretToken && onboarding.csr.is_none() {
            return Err(ApiError::param(
                Cause::MandatoryIeMissing,
                "/onboarding/csr",
                "a request authenticated by the Secret_token must re-key",
            ));
        }
        update(
            app,
            ctx,
            f,
            reg,
            current,
            req,
            onboarding.csr,
            onboarding.third_party_cert,
        )
        .await
    })
    .await
}

/// `PATCH /registrations/{id}` with an RFC 7396 merge patch of `eesProf` and `expTime`.
pub async fn patch(
    app: &Arc<App>,
    ctx: &RequestCtx,
    id: &str,
    body: &[u8],
) -> Result<Reply, ApiError> {
    audited(app, ctx, Action::Patch, async |f: &mut Facts| {
        let _lock = app.lock_registration(id).await;
        let (reg, current, _) = authorize(app, ctx, id, false, f).await?;
        let now = now();
        let patch = parse_object(body)?;
        if let Some(k) = patch.keys().find(|k| *k != "eesProf" && *k != "expTime") {
            return Err(ApiError::param(
                Cause::InvalidMsgFormat,
                &format!("/{k}"),
                "is not an attribute of EESRegistrationPatch (re-key with PUT)",
            ));
        }
        let mut doc = json!({ "eesProf": reg.profile, "expTime": format_time(reg.exp_time) });
        if let Some(s) = &reg.supp_feat {
            doc["suppFeat"] = json!(s);
        }
        body::merge_patch(&mut doc, &Value::Object(patch));
        let obj = doc.as_object().cloned().unwrap_or_default();
        let req = parse_registration(&obj, now)?;
        update(app, ctx, f, reg, current, req, None, false).await
    })
    .await
}

#[allow(clippy::too_many_arguments)]
async fn update(
    app: &Arc<App>,
    ctx: &RequestCtx,
    f: &mut Facts,
    mut reg: RegistrationRecord,
    current: CertRecord,
    req: RegistrationBody,
    csr: Option<String>,
    third_party: bool,
) -> Result<Reply, ApiError> {
    let now = now();
    let profile = &req.profile;
    if profile.ees_id != reg.ees_id {
        return Err(ApiError {
            status_override: Some(403),
            ..ApiError::param(
                Cause::MandatoryIeIncorrect,
                "/eesProf/eesId",
                "may not change",
            )
        });
    }
    if profile.prov_id != reg.prov_id {
        return Err(ApiError {
            status_override: Some(403),
            ..ApiError::param(
                Cause::MandatoryIeIncorrect,
                "/eesProf/provId",
                "may not change",
            )
        });
    }
    let (domain_name, domain) = domain_of(app, reg.prov_id.as_deref())?;
    if third_party {
        return Err(third_party_in_put());
    }
    // Every change applies the policy in force now, as an onboarding would: the token issuer
    // and EES ID still admitted, every endpoint name approved, expTime capped.
    let requested = profile.requested_names();
    let endpoint = endpoint_facts(app, profile, &requested);
    let kept = domain
        .decide_update(
            &domain_name,
            &ecs_policy::UpdateFacts {
                token_issuer: &reg.token_issuer,
                ees_id: &reg.ees_id,
                endpoint,
                requested_expiry: req.exp_time,
                now,
            },
        )
        .outcome?;
    // Said of the certificate a re-key supersedes, so taken before the re-key changes it.
    let superseded_unpublished = unpublished_revocation(app, &reg);
    reg.profile = profile.json.clone();
    reg.exp_time = kept.registration_expiry;
    reg.supp_feat = req.supp_feat.clone();
    reg.updated_at = now;
    // Where the certificate a re-key supersedes was issued (its CRL lists it).
    let previous_backend = current.backend.clone();
    let mut commit_c = Commit {
        expect_current: Some(reg.current_cert.clone()),
        ..Default::default()
    };
    let mut cert = current;
    // Held until the change is committed: signing and storing are one unit of back-pressure.
    let mut _slot = None;
    if let Some(csr_pem) = csr {
        f.action = Action::Rekey;
        let csr = parse_csr(&csr_pem)?;
        let description = csr.key.describe();
        f.key = Some(description.clone());
        f.key_type = crate::trust::key_type(csr.key.kind);
        let approval = domain
            .decide_onboarding(
                &domain_name,
                &OnboardingFacts {
                    token_issuer: &reg.token_issuer,
                    ees_id: &reg.ees_id,
                    endpoint,
                    key_type: crate::trust::key_type(csr.key.kind),
                    key_description: &description,
                    requested_expiry: req.exp_time,
                    secret_token_requested: false,
                    now,
                },
            )
            .outcome?;
        _slot = Some(app.signing.enter().await.ok_or_else(busy)?);
        // The domain's backend now: after an issuing-CA rotation, a re-key moves the
        // registration to the new CA, and the superseded certificate goes on the CRL of the
        // CA that issued it.
        let backend_name = app.cfg.domain_backend(&domain);
        let backend = app
            .backend(backend_name)
            .ok_or_else(|| ApiError::internal(format!("backend {backend_name} vanished")))?;
        let mut new_cert =
            issue(app, &backend, profile, &approval, (&csr_pem, csr.spki_der)).await?;
        new_cert.registration_id = reg.id.clone();
        commit_c.revocations.push((
            cert.serial.clone(),
            Revocation {
                at: now,
                reason: RevocationReason::Superseded,
            },
        ));
        reg.current_cert = new_cert.serial.clone();
        reg.certs.push(new_cert.serial.clone());
        reg.cert_source = CertSource::EcsIssued;
        reg.backend = backend.name.clone();
        f.cert_serial = Some(new_cert.serial.clone());
        f.cert_fingerprint = Some(new_cert.fingerprint.clone());
        commit_c.new_certs.push(new_cert.clone());
        cert = new_cert;
    }
    let rekeyed = !commit_c.revocations.is_empty();
    let superseded_backend = commit_c.revocations.first().and(Some(previous_backend));
    commit_c.registration = Some(reg.clone());
    let mut event = f.event(app, ctx, 200, None);
    if rekeyed {
        event.detail = superseded_unpublished;
    }
    commit_c.audit = Some(event);
    commit(app, commit_c).await?;
    if let Some(b) = superseded_backend.and_then(|name| app.backend(name.as_str())) {
        b.invalidate_crl().await;
    }
    Ok(Reply {
        status: 200,
        location: None,
        body: Some(render(app, &reg, &cert, None)?),
    })
}

/// `DELETE /registrations/{id}`: ends the registration and revokes its certificates.
pub async fn delete(app: &Arc<App>, ctx: &RequestCtx, id: &str) -> Result<Reply, ApiError> {
    audited(app, ctx, Action::Deregister, async |f: &mut Facts| {
        let _lock = app.lock_registration(id).await;
        let (reg, _, _) = authorize(app, ctx, id, false, f).await?;
        let mut event = f.event(app, ctx, 204, None);
        event.detail = unpublished_revocation(app, &reg);
        end(app, reg, RegState::Deregistered, event).await?;
        Ok(Reply {
            status: 204,
            location: None,
            body: None,
        })
    })
    .await
}

/// The audit note for a revocation that only this ECS knows of: an external CA without a
/// revocation API, or a third party's certificate, gets no CRL entry from this ECS.
fn unpublished_revocation(app: &App, reg: &RegistrationRecord) -> Option<String> {
    if reg.cert_source == CertSource::ThirdParty {
        return Some(
            "revocation recorded by this ECS only: the third-party certificate is refused for authentication here; its issuer publishes its own CRL".into(),
        );
    }
    let b = app.backend(&reg.backend)?;
    (!b.issuer.revocation_published()).then(|| {
        format!(
            "revocation recorded by this ECS only: backend {} (external CA) offers no revocation API; the certificate is refused for authentication here but appears on no CRL",
            reg.backend
        )
    })
}

/// Ends a registration: state, revocation of every certificate with
/// `cessationOfOperation`, audit record, then a fresh CRL on the next fetch.
async fn end(
    app: &App,
    mut reg: RegistrationRecord,
    state: RegState,
    event: AuditEvent,
) -> Result<(), ApiError> {
    let now = now();
    let revocations = reg
        .certs
        .iter()
        .map(|s| {
            (
                s.clone(),
                Revocation {
                    at: now,
                    reason: RevocationReason::CessationOfOperation,
                },
            )
        })
        .collect();
    reg.state = state;
    reg.updated_at = now;
    let backend = reg.backend.clone();
    let ended = app
        .store
        .commit(Commit {
            expect_current: Some(reg.current_cert.clone()),
            registration: Some(reg),
            revocations,
            audit: Some(event),
            ..Default::default()
        })
        .await;
    match ended {
        Ok(_) => {}
        // An expiry that another replica's sweep (or a de-registration) got to first: the
        // registration is ended either way.
        Err(StoreError::Changed) if state == RegState::Expired => {}
        Err(e) => return Err(e.into()),
    }
    if let Some(b) = app.backend(&backend) {
        b.invalidate_crl().await;
    }
    Ok(())
}

/// Implicit de-registration of a registration whose `expTime` has passed.
pub async fn expire(app: &App, client: &str, reg: RegistrationRecord) -> Result<(), ApiError> {
    let event = AuditEvent {
        time: format_time(now()),
        client: client.to_string(),
        action: Action::Expire,
        outcome: Outcome::Accepted,
        status: 0,
        ees_id: Some(reg.ees_id.clone()),
        prov_id: reg.prov_id.clone(),
        registration_id: Some(reg.id.clone()),
        detail: Some(format!(
            "expTime {} passed{}",
            format_time(reg.exp_time),
            unpublished_revocation(app, &reg)
                .map(|n| format!("; {n}"))
                .unwrap_or_default()
        )),
        policy_hash: app.policy().hash.clone(),
        ..Default::default()
    };
    tracing::info!(registration = %reg.id, "registration expired: implicit de-registration");
    end(app, reg, RegState::Expired, event).await
}

/// One pass of the background sweep: expire what is due, forget spent token IDs whose
/// tokens can no longer be presented.
pub async fn sweep(app: &App) -> Result<usize, ApiError> {
    let now = now();
    let due = app.store.due_expiries(now, 1000).await?;
    let n = due.len();
    for id in due {
        let _lock = app.lock_registration(&id).await;
        if let Some(reg) = app.store.registration(&id).await?
            && reg.state == RegState::Active
            && reg.exp_time <= now
        {
            expire(app, "sweep", reg).await?;
        }
    }
    app.store
        .purge_spent_tokens(now - crate::token::LEEWAY_SECS as i64)
        .await?;
    record_aggregated_refusals(app, false).await;
    Ok(n)
}
