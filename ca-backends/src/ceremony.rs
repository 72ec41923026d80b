//! Key ceremonies: one reviewed file in, verified artefacts out (Boulder's `cmd/ceremony`
//! is the model). Everything that can be checked without the HSM is checked before it is
//! touched; nothing is overwritten; what is signed is linted first and verified after.

use crate::issuer::{PreparedCert, prepare_root, sign_prepared};
use crate::pkcs11::{find_private_key, find_token, login, module, public_key_spki, sign_with};
use crate::{
    CaParams, Error, KeySigner, LocalIssuer, RevocationReason, RevokedEntry, SigAlg, SoftwareKey,
    der_to_pem, generate_p256_pkcs8_pem, pem_chain_to_der, sha256_hex,
};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::types::AuthPin;
use der::{Decode, Encode};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, KeyUsage, KeyUsages, SubjectKeyIdentifier,
};

/// What a ceremony makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CeremonyType {
    Root,
    Intermediate,
    Key,
    Crl,
}

/// Key types a ceremony generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CeremonyKeyType {
    P256,
    P384,
    Rsa3072,
    Rsa4096,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmSection {
    pub module: PathBuf,
    /// Token label where keys are generated (root, intermediate, key).
    #[serde(default)]
    pub token: Option<String>,
    /// `env:NAME` or `file:PATH`.
    #[serde(default)]
    pub pin: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySection {
    pub label: String,
    /// CKA_ID in hex; absent: 8 bytes from the HSM's RNG.
    #[serde(default)]
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub key_type: CeremonyKeyType,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateSection {
    /// Most significant first: `C=FI, O=Example MNO, CN=Example ECS Root CA 2026`.
    pub subject: String,
    pub not_before: String,
    pub not_after: String,
    #[serde(default)]
    pub path_len: Option<u8>,
    #[serde(default)]
    pub crl_url: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerSection {
    pub token: String,
    pub pin: String,
    pub key_label: String,
    /// The issuer's certificate (PEM).
    pub cert: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokedSection {
    pub serial: String,
    pub revoked_at: String,
    /// An RFC 5280 reason name; anything else is refused when the file is read.
    pub reason: RevocationReason,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrlSection {
    pub number: u64,
    pub this_update: String,
    pub next_update: String,
    #[serde(default)]
    pub revoked: Vec<RevokedSection>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputsSection {
    #[serde(default)]
    pub public_key: Option<PathBuf>,
    #[serde(default)]
    pub certificate: Option<PathBuf>,
    #[serde(default)]
    pub crl: Option<PathBuf>,
    pub transcript: PathBuf,
}

/// The ceremony file as written; its keys are fixed because ceremony scripts are reviewed
/// and archived. Every section is optional here so that a missing or an extra one is named
/// in the file's own words ("type root needs [key]") when it becomes a [`CeremonyConfig`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CeremonyFile {
    #[serde(rename = "type")]
    kind: CeremonyType,
    hsm: HsmSection,
    #[serde(default)]
    key: Option<KeySection>,
    #[serde(default)]
    certificate: Option<CertificateSection>,
    #[serde(default)]
    issuer: Option<IssuerSection>,
    #[serde(default)]
    crl: Option<CrlSection>,
    outputs: OutputsSection,
}

/// A checked ceremony: each kind holds exactly the sections it uses.
#[derive(Debug, Clone)]
pub struct CeremonyConfig {
    /// The PKCS#11 module.
    pub module: PathBuf,
    pub transcript: PathBuf,
    pub ceremony: Ceremony,
}

#[derive(Debug, Clone)]
pub enum Ceremony {
    /// A self-signed root on a key generated for it.
    Root {
        generate: Generate,
        certificate: CertificateSection,
        certificate_out: PathBuf,
    },
    /// A CA certificate signed by `issuer` on a key generated for it.
    Intermediate {
        generate: Generate,
        certificate: CertificateSection,
        certificate_out: PathBuf,
        issuer: IssuerSection,
    },
    /// A key pair alone.
    Key { generate: Generate },
    /// A CRL signed by `issuer`.
    Crl {
        issuer: IssuerSection,
        crl: CrlSection,
        crl_out: PathBuf,
    },
}

/// A key pair generated on a token, and where its public key is written.
#[derive(Debug, Clone)]
pub struct Generate {
    pub token: String,
    /// `env:NAME` or `file:PATH`.
    pub pin: String,
    pub key: KeySection,
    pub public_key_out: PathBuf,
}

impl Ceremony {
    fn kind(&self) -> CeremonyType {
        match self {
            Ceremony::Root { .. } => CeremonyType::Root,
            Ceremony::Intermediate { .. } => CeremonyType::Intermediate,
            Ceremony::Key { .. } => CeremonyType::Key,
            Ceremony::Crl { .. } => CeremonyType::Crl,
        }
    }
}

/// PINs, resolved by the caller from the file's `env:`/`file:` references.
pub struct Pins {
    pub hsm: Option<AuthPin>,
    pub issuer: Option<AuthPin>,
}

/// One lint check and its result.
#[derive(Debug, Clone, Serialize)]
pub struct LintResult {
    pub check: String,
    pub passed: bool,
    pub detail: String,
}

/// What happened, for the archive.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Transcript {
    pub ceremony: String,
    pub config_sha256: String,
    pub started: String,
    pub finished: String,
    pub module: String,
    pub token_label: Option<String>,
    pub token_serial: Option<String>,
    pub key_label: Option<String>,
    pub key_id: Option<String>,
    pub key_type: Option<String>,
    /// Attributes of the generated private key as read back from the token.
    pub key_attributes: Vec<(String, bool)>,
    pub public_key_sha256: Option<String>,
    pub issuer_key_label: Option<String>,
    pub certificate_sha256: Option<String>,
    pub certificate_serial: Option<String>,
    pub crl_sha256: Option<String>,
    pub lint: Vec<LintResult>,
    pub outputs: Vec<String>,
}

impl Transcript {
    /// A few lines for the people in the room.
    pub fn summary(&self) -> String {
        let mut s = format!("ceremony {} finished {}\n", self.ceremony, self.finished);
        s += &format!("  config sha256      {}\n", self.config_sha256);
        if let Some(l) = &self.token_label {
            s += &format!(
                "  token              {l} (serial {})\n",
                self.token_serial.as_deref().unwrap_or("?")
            );
        }
        if let Some(l) = &self.key_label {
            s += &format!(
                "  key                {l} id {} {}\n",
                self.key_id.as_deref().unwrap_or("?"),
                self.key_type.as_deref().unwrap_or("")
            );
        }
        if let Some(p) = &self.public_key_sha256 {
            s += &format!("  public key sha256  {p}\n");
        }
        if let Some(c) = &self.certificate_sha256 {
            s += &format!(
                "  certificate sha256 {c} serial {}\n",
                self.certificate_serial.as_deref().unwrap_or("?")
            );
        }
        if let Some(c) = &self.crl_sha256 {
            s += &format!("  crl sha256         {c}\n");
        }
        let failed = self.lint.iter().filter(|l| !l.passed).count();
        if !self.lint.is_empty() {
            s += &format!(
                "  lint               {} checks, {failed} failed\n",
                self.lint.len()
            );
        }
        for o in &self.outputs {
            s += &format!("  wrote              {o}\n");
        }
        s
    }
}

fn config_err(m: impl Into<String>) -> Error {
    Error::Config(m.into())
}

fn parse_time(key: &str, s: &str) -> Result<i64, Error> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|_| config_err(format!("{key}: {s:?} is not an RFC 3339 time")))
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

impl CeremonyConfig {
    /// Parses and checks a ceremony file without touching the HSM. Paths are resolved
    /// against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, Error> {
        let mut f: CeremonyFile =
            toml::from_str(text).map_err(|e| config_err(e.to_string().replace('\n', " ")))?;
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut f.hsm.module);
        if let Some(i) = f.issuer.as_mut() {
            fix(&mut i.cert);
        }
        for p in [
            f.outputs.public_key.as_mut(),
            f.outputs.certificate.as_mut(),
            f.outputs.crl.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        fix(&mut f.outputs.transcript);
        let c = Self::from_file(f)?;
        c.check()?;
        Ok(c)
    }

    /// Each kind takes the sections it needs and refuses the others.
    fn from_file(f: CeremonyFile) -> Result<Self, Error> {
        let kind = f.kind;
        let need = |what: &str| config_err(format!("type {kind:?} needs {what}"));
        let refuse = |present: bool, what: &str| {
            if present {
                Err(config_err(format!("type {kind:?} takes no {what}")))
            } else {
                Ok(())
            }
        };
        let CeremonyFile {
            kind: _,
            hsm,
            key,
            certificate,
            issuer,
            crl,
            outputs,
        } = f;
        let generates = matches!(
            kind,
            CeremonyType::Root | CeremonyType::Intermediate | CeremonyType::Key
        );
        let generate = if generates {
            Some(Generate {
                token: hsm.token.clone().ok_or_else(|| need("hsm.token"))?,
                pin: hsm.pin.clone().ok_or_else(|| need("hsm.pin"))?,
                key: key.ok_or_else(|| need("[key]"))?,
                public_key_out: outputs
                    .public_key
                    .clone()
                    .ok_or_else(|| need("outputs.public_key"))?,
            })
        } else {
            refuse(key.is_some(), "[key]")?;
            None
        };
        let certifies = matches!(kind, CeremonyType::Root | CeremonyType::Intermediate);
        let certificate = if certifies {
            Some(certificate.ok_or_else(|| need("[certificate]"))?)
        } else {
            refuse(certificate.is_some(), "[certificate]")?;
            None
        };
        let issued = matches!(kind, CeremonyType::Intermediate | CeremonyType::Crl);
        let issuer = if issued {
            Some(issuer.ok_or_else(|| need("[issuer]"))?)
        } else {
            refuse(issuer.is_some(), "[issuer]")?;
            None
        };
        let crl = if kind == CeremonyType::Crl {
            Some(crl.ok_or_else(|| need("[crl]"))?)
        } else {
            refuse(crl.is_some(), "[crl]")?;
            None
        };
        let certificate_out = if certifies {
            Some(
                outputs
                    .certificate
                    .clone()
                    .ok_or_else(|| need("outputs.certificate"))?,
            )
        } else {
            refuse(outputs.certificate.is_some(), "outputs.certificate")?;
            None
        };
        let crl_out = if kind == CeremonyType::Crl {
            Some(outputs.crl.clone().ok_or_else(|| need("outputs.crl"))?)
        } else {
            refuse(outputs.crl.is_some(), "outputs.crl")?;
            None
        };
        if !generates {
            refuse(outputs.public_key.is_some(), "outputs.public_key")?;
        }
        // Every kind took what it needs above; the tuple below cannot miss.
        let ceremony = match (
            kind,
            generate,
            certificate,
            certificate_out,
            issuer,
            crl,
            crl_out,
        ) {
            (
                CeremonyType::Root,
                Some(generate),
                Some(certificate),
                Some(certificate_out),
                None,
                None,
                None,
            ) => Ceremony::Root {
                generate,
                certificate,
                certificate_out,
            },
            (
                CeremonyType::Intermediate,
                Some(generate),
                Some(certificate),
                Some(certificate_out),
                Some(issuer),
                None,
                None,
            ) => Ceremony::Intermediate {
                generate,
                certificate,
                certificate_out,
                issuer,
            },
            (CeremonyType::Key, Some(generate), None, None, None, None, None) => {
                Ceremony::Key { generate }
            }
            (CeremonyType::Crl, None, None, None, Some(issuer), Some(crl), Some(crl_out)) => {
                Ceremony::Crl {
                    issuer,
                    crl,
                    crl_out,
                }
            }
            _ => return Err(config_err(format!("type {kind:?}: inconsistent sections"))),
        };
        Ok(CeremonyConfig {
            module: hsm.module,
            transcript: outputs.transcript,
            ceremony,
        })
    }

    /// The values inside the sections.
    fn check(&self) -> Result<(), Error> {
        if let Some(g) = self.generate() {
            if g.key.label.is_empty() {
                return Err(config_err("key.label: empty"));
            }
            if let Some(id) = &g.key.id {
                hex::decode(id).map_err(|_| config_err("key.id: not hex"))?;
            }
        }
        if let Ceremony::Root { certificate: c, .. }
        | Ceremony::Intermediate { certificate: c, .. } = &self.ceremony
        {
            let nb = parse_time("certificate.not_before", &c.not_before)?;
            let na = parse_time("certificate.not_after", &c.not_after)?;
            if na <= nb {
                return Err(config_err("certificate.not_after: not after not_before"));
            }
            if c.subject.trim().is_empty() {
                return Err(config_err("certificate.subject: empty"));
            }
        }
        if let Ceremony::Crl { crl: c, .. } = &self.ceremony {
            let tu = parse_time("crl.this_update", &c.this_update)?;
            let nu = parse_time("crl.next_update", &c.next_update)?;
            if nu <= tu {
                return Err(config_err("crl.next_update: not after this_update"));
            }
            if c.number == 0 {
                return Err(config_err("crl.number: starts at 1"));
            }
            for (i, r) in c.revoked.iter().enumerate() {
                hex::decode(&r.serial)
                    .map_err(|_| config_err(format!("crl.revoked[{i}].serial: not hex")))?;
                parse_time(&format!("crl.revoked[{i}].revoked_at"), &r.revoked_at)?;
            }
        }
        Ok(())
    }

    /// The key this ceremony generates, if it generates one.
    pub fn generate(&self) -> Option<&Generate> {
        match &self.ceremony {
            Ceremony::Root { generate, .. }
            | Ceremony::Intermediate { generate, .. }
            | Ceremony::Key { generate } => Some(generate),
            Ceremony::Crl { .. } => None,
        }
    }

    /// The key that signs for this ceremony, if another key does.
    pub fn issuer(&self) -> Option<&IssuerSection> {
        match &self.ceremony {
            Ceremony::Intermediate { issuer, .. } | Ceremony::Crl { issuer, .. } => Some(issuer),
            Ceremony::Root { .. } | Ceremony::Key { .. } => None,
        }
    }

    fn outputs(&self) -> Vec<&PathBuf> {
        let mut out: Vec<&PathBuf> = self
            .generate()
            .map(|g| &g.public_key_out)
            .into_iter()
            .collect();
        match &self.ceremony {
            Ceremony::Root {
                certificate_out, ..
            }
            | Ceremony::Intermediate {
                certificate_out, ..
            } => out.push(certificate_out),
            Ceremony::Crl { crl_out, .. } => out.push(crl_out),
            Ceremony::Key { .. } => {}
        }
        out.push(&self.transcript);
        out
    }
}

/// A signer over one logged-in session and one key handle, for the length of a ceremony.
struct SessionSigner {
    session: Mutex<Session>,
    key: ObjectHandle,
    spki: Vec<u8>,
    alg: SigAlg,
}

impl KeySigner for SessionSigner {
    fn public_key_der(&self) -> &[u8] {
        &self.spki
    }
    fn algorithm(&self) -> SigAlg {
        self.alg
    }
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        let s = self.session.lock().unwrap_or_else(|e| e.into_inner());
        sign_with(&s, self.key, self.alg, message)
            .map_err(|e| Error::Signing(format!("PKCS#11: {e}")))
    }
}

fn alg_of(spki: &[u8]) -> Result<SigAlg, Error> {
    Ok(match crate::classify_spki(spki)?.kind {
        crate::KeyKind::P256 => SigAlg::EcdsaP256Sha256,
        crate::KeyKind::P384 => SigAlg::EcdsaP384Sha384,
        crate::KeyKind::Ed25519 => SigAlg::Ed25519,
        crate::KeyKind::Rsa(_) => SigAlg::RsaPkcs1Sha256,
    })
}

fn open_session(
    ctx: &cryptoki::context::Pkcs11,
    token: &str,
    pin: &AuthPin,
    rw: bool,
) -> Result<(Session, String), Error> {
    let uri = crate::pkcs11::Pkcs11Uri {
        token: Some(token.to_string()),
        ..Default::default()
    };
    let slot =
        find_token(ctx, &uri)?.ok_or_else(|| config_err(format!("no token labelled {token:?}")))?;
    let serial = ctx
        .get_token_info(slot)
        .map(|i| i.serial_number().trim_end().to_string())
        .unwrap_or_default();
    let session = if rw {
        ctx.open_rw_session(slot)
    } else {
        ctx.open_ro_session(slot)
    }
    .map_err(|e| Error::Unavailable(format!("PKCS#11: {e}")))?;
    login(&session, pin)?;
    Ok((session, serial))
}

fn ck(e: cryptoki::error::Error) -> Error {
    Error::Signing(format!("PKCS#11: {e}"))
}

/// Runs a ceremony. `config_sha256` is the hash of the file as reviewed.
pub fn run(cfg: &CeremonyConfig, pins: &Pins, config_sha256: &str) -> Result<Transcript, Error> {
    let mut t = Transcript {
        ceremony: format!("{:?}", cfg.ceremony.kind()).to_lowercase(),
        config_sha256: config_sha256.to_string(),
        started: now_rfc3339(),
        module: cfg.module.display().to_string(),
        ..Default::default()
    };
    // Nothing is overwritten: refuse before the HSM is touched.
    for p in cfg.outputs() {
        if p.exists() {
            return Err(config_err(format!(
                "output {} exists; nothing is overwritten",
                p.display()
            )));
        }
    }
    let ctx = module(&cfg.module)?;
    let mut written: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    let hsm_pin = || {
        pins.hsm
            .as_ref()
            .ok_or_else(|| config_err("hsm.pin: not resolved"))
    };
    let issuer_pin = || {
        pins.issuer
            .as_ref()
            .ok_or_else(|| config_err("issuer.pin: not resolved"))
    };

    match &cfg.ceremony {
        Ceremony::Root {
            generate,
            certificate,
            certificate_out,
        } => {
            prelint(certificate, None)?;
            let own = generate_key(&ctx, generate, hsm_pin()?, &mut t, &mut written)?;
            certify(
                certificate,
                certificate_out,
                &own,
                None,
                &mut t,
                &mut written,
            )?;
        }
        Ceremony::Intermediate {
            generate,
            certificate,
            certificate_out,
            issuer,
        } => {
            let issuer = load_issuer(&ctx, issuer, issuer_pin()?, &mut t)?;
            prelint(certificate, Some(&issuer))?;
            let own = generate_key(&ctx, generate, hsm_pin()?, &mut t, &mut written)?;
            certify(
                certificate,
                certificate_out,
                &own,
                Some(&issuer),
                &mut t,
                &mut written,
            )?;
        }
        Ceremony::Key { generate } => {
            generate_key(&ctx, generate, hsm_pin()?, &mut t, &mut written)?;
        }
        Ceremony::Crl {
            issuer,
            crl: c,
            crl_out,
        } => {
            let issuer = load_issuer(&ctx, issuer, issuer_pin()?, &mut t)?;
            let revoked: Vec<RevokedEntry> = c
                .revoked
                .iter()
                .map(|r| {
                    Ok(RevokedEntry {
                        serial_hex: r.serial.to_ascii_lowercase(),
                        revoked_at: parse_time("crl.revoked.revoked_at", &r.revoked_at)?,
                        reason: r.reason,
                    })
                })
                .collect::<Result<_, Error>>()?;
            let crl = issuer.sign_crl(
                c.number,
                parse_time("crl.this_update", &c.this_update)?,
                parse_time("crl.next_update", &c.next_update)?,
                &revoked,
            )?;
            t.crl_sha256 = Some(sha256_hex(&crl));
            written.push((crl_out.clone(), crl));
        }
    }

    for (path, data) in &written {
        write_new(path, data)?;
        t.outputs.push(path.display().to_string());
    }
    t.finished = now_rfc3339();
    t.outputs.push(cfg.transcript.display().to_string());
    let json = serde_json::to_vec_pretty(&t).map_err(|e| Error::Encoding(e.to_string()))?;
    write_new(&cfg.transcript, &json)?;
    Ok(t)
}

/// The issuer's key, found by label and checked against its certificate
/// (`LocalIssuer::new` refuses a mismatch).
fn load_issuer(
    ctx: &cryptoki::context::Pkcs11,
    i: &IssuerSection,
    pin: &AuthPin,
    t: &mut Transcript,
) -> Result<LocalIssuer, Error> {
    let (session, _) = open_session(ctx, &i.token, pin, false)?;
    let key = find_private_key(&session, Some(&i.key_label), None)?.ok_or_else(|| {
        config_err(format!(
            "issuer.key_label: no key {:?} in token {:?}",
            i.key_label, i.token
        ))
    })?;
    let public = session
        .find_objects(&[
            Attribute::Class(cryptoki::object::ObjectClass::PUBLIC_KEY),
            Attribute::Label(i.key_label.as_bytes().to_vec()),
        ])
        .map_err(ck)?;
    let spki = public_key_spki(&session, *public.first().unwrap_or(&key))?;
    let pem = std::fs::read_to_string(&i.cert)
        .map_err(|e| config_err(format!("issuer.cert: {}: {e}", i.cert.display())))?;
    let chain = pem_chain_to_der(&pem)?;
    let signer = Arc::new(SessionSigner {
        alg: alg_of(&spki)?,
        session: Mutex::new(session),
        key,
        spki,
    });
    t.issuer_key_label = Some(i.key_label.clone());
    LocalIssuer::new(signer, chain).map_err(|e| match e {
        Error::KeyMismatch(_) => {
            config_err("issuer: the key found by key_label does not belong to issuer.cert")
        }
        other => other,
    })
}

/// The certificate profile, linted before any key is generated: a throwaway subject key
/// stands in for the one the HSM will make.
fn prelint(c: &CertificateSection, issuer: Option<&LocalIssuer>) -> Result<(), Error> {
    let stand_in = SoftwareKey::from_pkcs8_pem(&generate_p256_pkcs8_pem()?)?;
    let params = ca_params(c, stand_in.public_key_der().to_vec(), vec![1; 20])?;
    let prepared = match issuer {
        None => prepare_root(&stand_in, &params)?,
        Some(iss) => iss.prepare_ca(&params)?,
    };
    let lint = lint_ca(&prepared, &params, issuer.map(|i| i.ca_certificate()))?;
    if let Some(bad) = lint.iter().find(|l| !l.passed) {
        return Err(config_err(format!(
            "lint {}: {}; no key was generated and nothing was signed",
            bad.check, bad.detail
        )));
    }
    Ok(())
}

/// Generates the key pair on the token, checks its attributes, and keeps a signer over it
/// for the rest of the ceremony.
fn generate_key(
    ctx: &cryptoki::context::Pkcs11,
    g: &Generate,
    pin: &AuthPin,
    t: &mut Transcript,
    written: &mut Vec<(PathBuf, Vec<u8>)>,
) -> Result<SessionSigner, Error> {
    let k = &g.key;
    let (session, serial) = open_session(ctx, &g.token, pin, true)?;
    t.token_label = Some(g.token.clone());
    t.token_serial = Some(serial);
    let existing = session
        .find_objects(&[Attribute::Label(k.label.as_bytes().to_vec())])
        .map_err(ck)?;
    if !existing.is_empty() {
        return Err(config_err(format!(
            "key.label: {:?} already exists in token {:?}; a ceremony never reuses a label",
            k.label, g.token
        )));
    }
    let id = match &k.id {
        Some(h) => hex::decode(h).map_err(|_| config_err("key.id: not hex"))?,
        None => session.generate_random_vec(8).map_err(ck)?,
    };
    let (private, public) = generate(&session, k, &id)?;
    t.key_attributes = check_private_attributes(&session, private)?;
    let spki = public_key_spki(&session, public)?;
    t.key_label = Some(k.label.clone());
    t.key_id = Some(hex::encode(&id));
    t.key_type = Some(format!("{:?}", k.key_type).to_lowercase());
    t.public_key_sha256 = Some(sha256_hex(&spki));
    written.push((
        g.public_key_out.clone(),
        der_to_pem(&spki, "PUBLIC KEY").into_bytes(),
    ));
    Ok(SessionSigner {
        alg: alg_of(&spki)?,
        session: Mutex::new(session),
        key: private,
        spki,
    })
}

/// The CA certificate for `own`'s key: self-signed without an issuer. Linted again with the
/// real key and serial before it is signed.
fn certify(
    c: &CertificateSection,
    out: &Path,
    own: &SessionSigner,
    issuer: Option<&LocalIssuer>,
    t: &mut Transcript,
    written: &mut Vec<(PathBuf, Vec<u8>)>,
) -> Result<(), Error> {
    let serial = own
        .session
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .generate_random_vec(20)
        .map_err(ck)?;
    let params = ca_params(c, own.spki.clone(), serial)?;
    let (prepared, signer, issuer_cert): (
        PreparedCert,
        &dyn KeySigner,
        Option<&x509_cert::Certificate>,
    ) = match issuer {
        None => (prepare_root(own, &params)?, own, None),
        Some(iss) => (
            iss.prepare_ca(&params)?,
            iss.signer(),
            Some(iss.ca_certificate()),
        ),
    };
    t.lint = lint_ca(&prepared, &params, issuer_cert)?;
    if let Some(bad) = t.lint.iter().find(|l| !l.passed) {
        return Err(config_err(format!(
            "lint {}: {}; nothing was signed",
            bad.check, bad.detail
        )));
    }
    let issuer_spki = signer.public_key_der().to_vec();
    let cert = sign_prepared(signer, &issuer_spki, prepared)?;
    t.certificate_sha256 = Some(sha256_hex(&cert.der));
    t.certificate_serial = Some(cert.serial_hex.clone());
    written.push((
        out.to_path_buf(),
        der_to_pem(&cert.der, "CERTIFICATE").into_bytes(),
    ));
    Ok(())
}

fn ca_params(
    c: &CertificateSection,
    spki_der: Vec<u8>,
    serial: Vec<u8>,
) -> Result<CaParams, Error> {
    Ok(CaParams {
        subject: c.subject.clone(),
        spki_der,
        not_before: parse_time("certificate.not_before", &c.not_before)?,
        not_after: parse_time("certificate.not_after", &c.not_after)?,
        path_len: c.path_len,
        crl_url: c.crl_url.clone(),
        serial: Some(serial),
    })
}

fn write_new(path: &Path, data: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| config_err(format!("{}: {e}", dir.display())))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| config_err(format!("{}: {e}", path.display())))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| config_err(format!("{}: {e}", path.display())))
}

/// Generates the key pair on the token. The templates say what the key may not do, since
/// modules such as SoftHSM default the other usages to true.
fn generate(
    session: &Session,
    k: &KeySection,
    id: &[u8],
) -> Result<(ObjectHandle, ObjectHandle), Error> {
    let label = k.label.as_bytes().to_vec();
    let mut public = vec![
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Label(label.clone()),
        Attribute::Id(id.to_vec()),
    ];
    let private = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Label(label),
        Attribute::Id(id.to_vec()),
    ];
    let mechanism = match k.key_type {
        CeremonyKeyType::P256 | CeremonyKeyType::P384 => {
            let curve = if k.key_type == CeremonyKeyType::P256 {
                const_oid::db::rfc5912::SECP_256_R_1
            } else {
                const_oid::db::rfc5912::SECP_384_R_1
            };
            public.push(Attribute::EcParams(curve.to_der()?));
            Mechanism::EccKeyPairGen
        }
        CeremonyKeyType::Rsa3072 | CeremonyKeyType::Rsa4096 => {
            let bits = if k.key_type == CeremonyKeyType::Rsa3072 {
                3072
            } else {
                4096
            };
            public.push(Attribute::ModulusBits(cryptoki::types::Ulong::from(
                bits as u64,
            )));
            public.push(Attribute::PublicExponent(vec![1, 0, 1]));
            Mechanism::RsaPkcsKeyPairGen
        }
    };
    let (pubh, privh) = session
        .generate_key_pair(&mechanism, &public, &private)
        .map_err(ck)?;
    Ok((privh, pubh))
}

/// Reads the private key's attributes back and refuses anything but a token-resident,
/// private, sensitive, never-extractable signing-only key.
fn check_private_attributes(
    session: &Session,
    key: ObjectHandle,
) -> Result<Vec<(String, bool)>, Error> {
    let wanted = [
        (AttributeType::Token, true),
        (AttributeType::Private, true),
        (AttributeType::Sensitive, true),
        (AttributeType::Sign, true),
        (AttributeType::Extractable, false),
        (AttributeType::NeverExtractable, true),
        (AttributeType::AlwaysSensitive, true),
        (AttributeType::Local, true),
        (AttributeType::Decrypt, false),
        (AttributeType::Unwrap, false),
        (AttributeType::Derive, false),
    ];
    let types: Vec<AttributeType> = wanted.iter().map(|(t, _)| *t).collect();
    let attrs = session.get_attributes(key, &types).map_err(ck)?;
    let mut out = Vec::new();
    for (ty, expected) in wanted {
        let value = attrs.iter().find_map(|a| match (a, ty) {
            (Attribute::Token(v), AttributeType::Token)
            | (Attribute::Private(v), AttributeType::Private)
            | (Attribute::Sensitive(v), AttributeType::Sensitive)
            | (Attribute::Sign(v), AttributeType::Sign)
            | (Attribute::Extractable(v), AttributeType::Extractable)
            | (Attribute::NeverExtractable(v), AttributeType::NeverExtractable)
            | (Attribute::AlwaysSensitive(v), AttributeType::AlwaysSensitive)
            | (Attribute::Local(v), AttributeType::Local)
            | (Attribute::Decrypt(v), AttributeType::Decrypt)
            | (Attribute::Unwrap(v), AttributeType::Unwrap)
            | (Attribute::Derive(v), AttributeType::Derive) => Some(*v),
            _ => None,
        });
        let name = format!("{ty:?}");
        match value {
            Some(v) if v == expected => out.push((name, v)),
            Some(v) => {
                return Err(Error::Config(format!(
                    "the generated key has {name} = {v}, expected {expected}; destroy it and check the HSM"
                )));
            }
            None => {
                return Err(Error::Config(format!(
                    "the token does not report {name} of the generated key"
                )));
            }
        }
    }
    Ok(out)
}

/// Lints a CA TBS before the real key signs it: it is signed with a throwaway key, parsed
/// back, and checked against the CA profile.
fn lint_ca(
    prepared: &PreparedCert,
    params: &CaParams,
    issuer: Option<&x509_cert::Certificate>,
) -> Result<Vec<LintResult>, Error> {
    let throwaway = SoftwareKey::from_pkcs8_pem(&generate_p256_pkcs8_pem()?)?;
    let sig = throwaway.sign(&prepared.tbs_der)?;
    let der = crate::issuer::assemble(&prepared.tbs_der, &prepared.algorithm, &sig)?;
    let cert = x509_cert::Certificate::from_der(&der)?;
    let tbs = cert.tbs_certificate();
    let mut out = Vec::new();
    let mut check = |check: &str, passed: bool, detail: String| {
        out.push(LintResult {
            check: check.into(),
            passed,
            detail,
        })
    };
    check(
        "version",
        tbs.version() == x509_cert::Version::V3,
        format!("{:?}", tbs.version()),
    );
    let serial = tbs.serial_number().as_bytes();
    check(
        "serial",
        (8..=20).contains(&serial.len()) && serial[0] & 0x80 == 0,
        format!("{} octets, positive", serial.len()),
    );
    let bc = tbs.get_extension::<BasicConstraints>().ok().flatten();
    check(
        "basicConstraints",
        bc.as_ref()
            .is_some_and(|(crit, b)| *crit && b.ca && b.path_len_constraint == params.path_len),
        format!("{:?}", bc.map(|(c, b)| (c, b.ca, b.path_len_constraint))),
    );
    let ku = tbs.get_extension::<KeyUsage>().ok().flatten();
    let ku_ok = ku
        .as_ref()
        .is_some_and(|(crit, k)| *crit && k.0 == (KeyUsages::KeyCertSign | KeyUsages::CRLSign));
    check(
        "keyUsage",
        ku_ok,
        "critical keyCertSign + cRLSign only".into(),
    );
    let ski = tbs.get_extension::<SubjectKeyIdentifier>().ok().flatten();
    check("subjectKeyIdentifier", ski.is_some(), "present".into());
    let aki = tbs.get_extension::<AuthorityKeyIdentifier>().ok().flatten();
    let expected_aki = match issuer {
        Some(i) => i
            .tbs_certificate()
            .get_extension::<SubjectKeyIdentifier>()
            .ok()
            .flatten()
            .map(|(_, s)| s.0.as_bytes().to_vec()),
        None => ski.as_ref().map(|(_, s)| s.0.as_bytes().to_vec()),
    };
    check(
        "authorityKeyIdentifier",
        aki.as_ref()
            .and_then(|(_, a)| a.key_identifier.as_ref().map(|k| k.as_bytes().to_vec()))
            == expected_aki,
        "equals the issuer's subjectKeyIdentifier".into(),
    );
    check(
        "validity",
        params.not_before < params.not_after,
        format!("{} .. {}", params.not_before, params.not_after),
    );
    if let Some(i) = issuer {
        let iv = i.tbs_certificate().validity();
        let (inb, ina) = (
            iv.not_before.to_unix_duration().as_secs() as i64,
            iv.not_after.to_unix_duration().as_secs() as i64,
        );
        check(
            "validity within issuer",
            params.not_before >= inb && params.not_after <= ina,
            format!("issuer valid {inb} .. {ina}"),
        );
        let issuer_path = i
            .tbs_certificate()
            .get_extension::<BasicConstraints>()
            .ok()
            .flatten()
            .and_then(|(_, b)| b.path_len_constraint);
        check(
            "path length",
            match (issuer_path, params.path_len) {
                (Some(ip), Some(p)) => p < ip,
                (Some(_), None) => false,
                (None, _) => true,
            },
            format!("issuer {issuer_path:?}, this {:?}", params.path_len),
        );
        check(
            "issuer name",
            tbs.issuer() == i.tbs_certificate().subject(),
            tbs.issuer().to_string(),
        );
    } else {
        check(
            "self-issued",
            tbs.issuer() == tbs.subject(),
            tbs.subject().to_string(),
        );
    }
    check(
        "subject",
        !tbs.subject().is_empty(),
        tbs.subject().to_string(),
    );
    Ok(out)
}
