//! The PKCS#11 key backend: the issuing key stays in an HSM; the ECS asks it to sign digests.
//!
//! Like Krill's signer, the backend may start without its token: it is then *probing*, says
//! why, refuses to sign with [`Error::Unavailable`] (503 upstream), and becomes usable when a
//! probe finds the token, without a restart. A session that dies mid-run (token removed,
//! device error) fails that one signature, takes the backend back to probing, and the next
//! request reconnects. A wrong PIN is never retried on its own (tokens lock PINs).

use crate::{Error, KeyKind, KeySigner, SigAlg, classify_spki};
use aws_lc_rs::digest;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
pub use cryptoki::types::AuthPin;
use der::Encode;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How a token and a key are named: RFC 7512 `pkcs11:` URI attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    pub token: Option<String>,
    pub serial: Option<String>,
    pub slot_id: Option<u64>,
    pub object: Option<String>,
    pub id: Option<Vec<u8>>,
    pub module_path: Option<PathBuf>,
}

impl Pkcs11Uri {
    /// Parses `pkcs11:token=…;object=…;id=%01%02` (path attributes; a query such as
    /// `?pin-value=` is refused: PINs never travel in a URI here).
    pub fn parse(uri: &str) -> Result<Self, String> {
        let rest = uri
            .strip_prefix("pkcs11:")
            .ok_or_else(|| format!("{uri:?} is not a pkcs11: URI"))?;
        if rest.contains('?') {
            return Err("query attributes (such as pin-value) are not accepted; give the PIN as env:NAME or file:PATH".into());
        }
        let mut out = Pkcs11Uri::default();
        for part in rest.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not attribute=value"))?;
            let bytes = percent_decode(v).ok_or_else(|| format!("{k}: bad percent-encoding"))?;
            let text = || String::from_utf8(bytes.clone()).map_err(|_| format!("{k}: not UTF-8"));
            match k {
                "token" => out.token = Some(text()?),
                "serial" => out.serial = Some(text()?),
                "slot-id" => {
                    out.slot_id = Some(
                        text()?
                            .parse()
                            .map_err(|_| "slot-id: not a number".to_string())?,
                    )
                }
                "object" => out.object = Some(text()?),
                "id" => out.id = Some(bytes),
                "module-path" => out.module_path = Some(PathBuf::from(text()?)),
                "type"
                | "manufacturer"
                | "model"
                | "library-manufacturer"
                | "library-description"
                | "library-version"
                | "slot-description"
                | "slot-manufacturer" => {}
                other => return Err(format!("unknown attribute {other:?}")),
            }
        }
        if out.token.is_none() && out.serial.is_none() && out.slot_id.is_none() {
            return Err("name the token: token=, serial= or slot-id=".into());
        }
        if out.object.is_none() && out.id.is_none() {
            return Err("name the key: object= or id=".into());
        }
        Ok(out)
    }
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

struct Module {
    ctx: Pkcs11,
    /// How many backends use this module; a module used by one backend alone may be
    /// re-initialised to find a token inserted after start.
    users: usize,
}

fn modules() -> &'static Mutex<HashMap<PathBuf, Module>> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Module>>> = OnceLock::new();
    MODULES.get_or_init(Default::default)
}

fn init_args() -> CInitializeArgs {
    // SoftHSM (and most modules) enable their locking only with non-NULL init args.
    CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)
}

/// One `Pkcs11` context per module per process (a second `C_Initialize` fails).
pub fn module(path: &Path) -> Result<Pkcs11, Error> {
    let mut map = modules().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(m) = map.get_mut(path) {
        m.users += 1;
        return Ok(m.ctx.clone());
    }
    let ctx = Pkcs11::new(path)
        .map_err(|e| Error::Config(format!("module {}: cannot load: {e}", path.display())))?;
    match ctx.initialize(init_args()) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(Error::Config(format!(
                "module {}: C_Initialize failed: {e}",
                path.display()
            )));
        }
    }
    map.insert(
        path.to_path_buf(),
        Module {
            ctx: ctx.clone(),
            users: 1,
        },
    );
    Ok(ctx)
}

/// Finalizes and initializes the module again, so that it enumerates its tokens anew
/// (SoftHSM, like many modules, only finds tokens at `C_Initialize`). Only done when one
/// backend alone uses the module: it would close every other backend's sessions.
fn reinitialize(path: &Path) -> bool {
    let map = modules().lock().unwrap_or_else(|e| e.into_inner());
    let Some(m) = map.get(path) else { return false };
    if m.users != 1 {
        return false;
    }
    let _ = m.ctx.clone().finalize();
    m.ctx.initialize(init_args()).is_ok()
}

/// Finds the slot whose token matches the URI's token label, serial or slot id.
pub fn find_token(ctx: &Pkcs11, uri: &Pkcs11Uri) -> Result<Option<Slot>, Error> {
    let slots = ctx.get_slots_with_token().map_err(device)?;
    for slot in slots {
        if let Some(id) = uri.slot_id
            && slot.id() != id
        {
            continue;
        }
        let info = match ctx.get_token_info(slot) {
            Ok(i) => i,
            Err(_) => continue,
        };
        if let Some(l) = &uri.token
            && info.label().trim_end() != l
        {
            continue;
        }
        if let Some(s) = &uri.serial
            && info.serial_number().trim_end() != s
        {
            continue;
        }
        return Ok(Some(slot));
    }
    Ok(None)
}

/// Logs the application in on `session`; "already logged in" is success (login is per
/// application, not per session).
pub fn login(session: &Session, pin: &AuthPin) -> Result<(), Error> {
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => Err(Error::Config(
            "the token refused the PIN (CKR_PIN_INCORRECT); not retried".into(),
        )),
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
            Err(Error::Config("the token's user PIN is locked".into()))
        }
        Err(e) => Err(device(e)),
    }
}

fn device(e: CkError) -> Error {
    Error::Unavailable(format!("PKCS#11: {e}"))
}

/// Whether a PKCS#11 error means the session or token is gone (reconnect), as opposed to a
/// fault of this one operation.
fn is_connection_fault(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::DeviceMemory
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::UserNotLoggedIn
                | RvError::ObjectHandleInvalid
                | RvError::KeyHandleInvalid
                | RvError::GeneralError
                | RvError::CryptokiNotInitialized,
            _
        )
    )
}

/// The SubjectPublicKeyInfo (DER) of the key pair whose private half is `private` or whose
/// public object shares its `CKA_ID`/label, read from the token.
pub fn public_key_spki(session: &Session, handle: ObjectHandle) -> Result<Vec<u8>, Error> {
    let attrs = session
        .get_attributes(
            handle,
            &[
                AttributeType::KeyType,
                AttributeType::EcParams,
                AttributeType::EcPoint,
                AttributeType::Modulus,
                AttributeType::PublicExponent,
            ],
        )
        .map_err(device)?;
    let mut kt = None;
    let (mut params, mut point, mut modulus, mut exponent) = (None, None, None, None);
    for a in attrs {
        match a {
            Attribute::KeyType(t) => kt = Some(t),
            Attribute::EcParams(p) => params = Some(p),
            Attribute::EcPoint(p) => point = Some(p),
            Attribute::Modulus(m) => modulus = Some(m),
            Attribute::PublicExponent(e) => exponent = Some(e),
            _ => {}
        }
    }
    let bad = |m: &str| Error::Encoding(format!("public key on the token: {m}"));
    match kt {
        Some(t) if t == KeyType::EC || t == KeyType::EC_EDWARDS => {
            let params = params.ok_or_else(|| bad("no CKA_EC_PARAMS"))?;
            let point = point.ok_or_else(|| bad("no CKA_EC_POINT"))?;
            // CKA_EC_POINT is a DER OCTET STRING; some modules give the bare point.
            let raw = <der::asn1::OctetString as der::Decode>::from_der(&point)
                .map(|o| o.as_bytes().to_vec())
                .unwrap_or(point);
            let oid: const_oid::ObjectIdentifier = der::Decode::from_der(&params)
                .map_err(|_| bad("CKA_EC_PARAMS is not a named curve"))?;
            let (alg, parameters) =
                if t == KeyType::EC_EDWARDS || oid == const_oid::db::rfc8410::ID_ED_25519 {
                    (const_oid::db::rfc8410::ID_ED_25519, None)
                } else {
                    (
                        const_oid::db::rfc5912::ID_EC_PUBLIC_KEY,
                        Some(der::Any::from(oid)),
                    )
                };
            spki(alg, parameters, &raw)
        }
        Some(t) if t == KeyType::RSA => {
            let n = modulus.ok_or_else(|| bad("no CKA_MODULUS"))?;
            let e = exponent.ok_or_else(|| bad("no CKA_PUBLIC_EXPONENT"))?;
            let pkcs1 = rsa_public_key_der(&n, &e)?;
            spki(
                const_oid::db::rfc5912::RSA_ENCRYPTION,
                Some(der::asn1::Null.into()),
                &pkcs1,
            )
        }
        _ => Err(bad("not an EC, EdDSA or RSA key")),
    }
}

fn spki(
    oid: const_oid::ObjectIdentifier,
    parameters: Option<der::Any>,
    key: &[u8],
) -> Result<Vec<u8>, Error> {
    Ok(spki::SubjectPublicKeyInfoOwned {
        algorithm: spki::AlgorithmIdentifierOwned { oid, parameters },
        subject_public_key: der::asn1::BitString::from_bytes(key)?,
    }
    .to_der()?)
}

fn rsa_public_key_der(n: &[u8], e: &[u8]) -> Result<Vec<u8>, Error> {
    use der::asn1::UintRef;
    #[derive(der::Sequence)]
    struct RsaPublicKey<'a> {
        n: UintRef<'a>,
        e: UintRef<'a>,
    }
    Ok(RsaPublicKey {
        n: UintRef::new(n)?,
        e: UintRef::new(e)?,
    }
    .to_der()?)
}

/// Finds the private key named by label and/or id.
pub fn find_private_key(
    session: &Session,
    label: Option<&str>,
    id: Option<&[u8]>,
) -> Result<Option<ObjectHandle>, Error> {
    let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
    if let Some(l) = label {
        template.push(Attribute::Label(l.as_bytes().to_vec()));
    }
    if let Some(i) = id {
        template.push(Attribute::Id(i.to_vec()));
    }
    let found = session.find_objects(&template).map_err(device)?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(Error::Config(format!(
            "{} private keys match; name the key by id",
            found.len()
        ))),
    }
}

/// Signs `message` with `key` on `session` for `alg`: the hash is computed here (SoftHSM
/// has no CKM_ECDSA_SHA256) and ECDSA's raw r‖s is returned as DER.
pub fn sign_with(
    session: &Session,
    key: ObjectHandle,
    alg: SigAlg,
    message: &[u8],
) -> Result<Vec<u8>, CkError> {
    match alg {
        SigAlg::EcdsaP256Sha256 | SigAlg::EcdsaP384Sha384 => {
            let d = if alg == SigAlg::EcdsaP256Sha256 {
                digest::digest(&digest::SHA256, message)
            } else {
                digest::digest(&digest::SHA384, message)
            };
            let raw = session.sign(&Mechanism::Ecdsa, key, d.as_ref())?;
            Ok(ecdsa_raw_to_der(&raw))
        }
        SigAlg::RsaPkcs1Sha256 => session.sign(&Mechanism::Sha256RsaPkcs, key, message),
        SigAlg::RsaPssSha256 => session.sign(
            &Mechanism::Sha256RsaPkcsPss(cryptoki::mechanism::rsa::PkcsPssParams {
                hash_alg: cryptoki::mechanism::MechanismType::SHA256,
                mgf: cryptoki::mechanism::rsa::PkcsMgfType::MGF1_SHA256,
                s_len: 32u64.into(),
            }),
            key,
            message,
        ),
        SigAlg::Ed25519 => session.sign(
            &Mechanism::Eddsa(cryptoki::mechanism::eddsa::EddsaParams::new(
                cryptoki::mechanism::eddsa::EddsaSignatureScheme::Pure,
            )),
            key,
            message,
        ),
    }
}

/// `r‖s` (each half the length) as a DER `Ecdsa-Sig-Value`. An odd length or an empty
/// answer yields something that will not verify, which the issuer then refuses.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Vec<u8> {
    #[derive(der::Sequence)]
    struct Sig<'a> {
        r: der::asn1::UintRef<'a>,
        s: der::asn1::UintRef<'a>,
    }
    let half = raw.len() / 2;
    let (r, s) = raw.split_at(half);
    match (der::asn1::UintRef::new(r), der::asn1::UintRef::new(s)) {
        (Ok(r), Ok(s)) if half > 0 => Sig { r, s }.to_der().unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Configuration of a PKCS#11 backend.
#[derive(Clone)]
pub struct Pkcs11Config {
    /// The backend's name, for messages.
    pub name: String,
    pub module: PathBuf,
    pub uri: Pkcs11Uri,
    pub pin: AuthPin,
    pub max_sessions: usize,
    /// Sign with RSASSA-PSS rather than PKCS#1 v1.5 (RSA keys).
    pub rsa_pss: bool,
    /// The SubjectPublicKeyInfo of the issuing certificate: the key on the token must be
    /// this one.
    pub expected_spki: Vec<u8>,
}

/// A connected token: the logged-in anchor session (which keeps the login alive) and the
/// pool of signing sessions.
struct Connected {
    slot: Slot,
    key: ObjectHandle,
    anchor: Mutex<Session>,
    idle: Mutex<Vec<Session>>,
    open: Mutex<usize>,
    returned: Condvar,
}

enum State {
    /// No usable token yet: why, and when to look again.
    Probing {
        reason: String,
        next: Instant,
        backoff: Duration,
    },
    Ready(Arc<Connected>),
    /// A fault that a probe must not retry (wrong PIN, wrong key): needs the operator.
    Failed(String),
}

/// Health as `/readyz` and metrics show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ready,
    Probing(String),
    Failed(String),
}

/// The issuing key in a PKCS#11 token.
pub struct Pkcs11Key {
    cfg: Pkcs11Config,
    ctx: Pkcs11,
    alg: SigAlg,
    state: Mutex<State>,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const SESSION_WAIT: Duration = Duration::from_secs(10);

impl Pkcs11Key {
    /// Loads the module and connects if the token is there. Errors only for what the
    /// operator must fix: module, PIN, key missing or not the certificate's.
    pub fn open(cfg: Pkcs11Config) -> Result<Self, Error> {
        let ctx = module(&cfg.module)?;
        let alg = match classify_spki(&cfg.expected_spki)?.kind {
            KeyKind::P256 => SigAlg::EcdsaP256Sha256,
            KeyKind::P384 => SigAlg::EcdsaP384Sha384,
            KeyKind::Ed25519 => SigAlg::Ed25519,
            KeyKind::Rsa(_) if cfg.rsa_pss => SigAlg::RsaPssSha256,
            KeyKind::Rsa(_) => SigAlg::RsaPkcs1Sha256,
        };
        if cfg.rsa_pss && alg != SigAlg::RsaPssSha256 {
            return Err(Error::Config(
                "rsa_signature = \"pss\" needs an RSA key".into(),
            ));
        }
        let key = Pkcs11Key {
            cfg,
            ctx,
            alg,
            state: Mutex::new(State::Probing {
                reason: "not probed yet".into(),
                next: Instant::now(),
                backoff: FIRST_BACKOFF,
            }),
        };
        match key.connect() {
            Ok(c) => *key.lock() = State::Ready(Arc::new(c)),
            Err(Error::Unavailable(reason)) => {
                tracing::warn!(backend = %key.cfg.name, %reason, "PKCS#11 token not usable yet; probing");
                *key.lock() = State::Probing {
                    reason,
                    next: Instant::now() + FIRST_BACKOFF,
                    backoff: FIRST_BACKOFF,
                };
            }
            Err(e) => return Err(e),
        }
        Ok(key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Finds the token, logs in, finds the key and checks it against the certificate.
    fn connect(&self) -> Result<Connected, Error> {
        let mut slot = find_token(&self.ctx, &self.cfg.uri)?;
        if slot.is_none() && reinitialize(&self.cfg.module) {
            slot = find_token(&self.ctx, &self.cfg.uri)?;
        }
        let slot = slot.ok_or_else(|| {
            Error::Unavailable(format!(
                "token {} not present",
                self.cfg
                    .uri
                    .token
                    .as_deref()
                    .or(self.cfg.uri.serial.as_deref())
                    .unwrap_or("?")
            ))
        })?;
        let anchor = self.ctx.open_ro_session(slot).map_err(device)?;
        login(&anchor, &self.cfg.pin)?;
        let key = find_private_key(
            &anchor,
            self.cfg.uri.object.as_deref(),
            self.cfg.uri.id.as_deref(),
        )?
        .ok_or_else(|| Error::Config("no such private key on the token".into()))?;
        // The public half: the public key object with the same label/id, or the private
        // key object itself where the module exposes the public attributes on it.
        let mut template = vec![Attribute::Class(ObjectClass::PUBLIC_KEY)];
        if let Some(l) = &self.cfg.uri.object {
            template.push(Attribute::Label(l.as_bytes().to_vec()));
        }
        if let Some(i) = &self.cfg.uri.id {
            template.push(Attribute::Id(i.clone()));
        }
        let public = anchor.find_objects(&template).map_err(device)?;
        let spki = match public.first() {
            Some(h) => public_key_spki(&anchor, *h)?,
            None => public_key_spki(&anchor, key)?,
        };
        if spki != self.cfg.expected_spki {
            return Err(Error::KeyMismatch(
                "the key on the token is not the issuing certificate's".into(),
            ));
        }
        tracing::info!(backend = %self.cfg.name, slot = slot.id(), "PKCS#11 token connected");
        Ok(Connected {
            slot,
            key,
            anchor: Mutex::new(anchor),
            idle: Mutex::new(Vec::new()),
            open: Mutex::new(0),
            returned: Condvar::new(),
        })
    }

    /// The current health; a due probe runs first, and a connected token is checked to
    /// still hold the key (a token pulled while idle is noticed here, not at the next
    /// signature).
    pub fn health(&self) -> Health {
        if let Ok(c) = self.connected() {
            let still_there = {
                let anchor = c.anchor.lock().unwrap_or_else(|e| e.into_inner());
                find_private_key(
                    &anchor,
                    self.cfg.uri.object.as_deref(),
                    self.cfg.uri.id.as_deref(),
                )
            };
            match still_there {
                Ok(Some(h)) if h == c.key => {}
                Ok(_) => self.disconnect("the key is no longer on the token".into()),
                Err(e) => self.disconnect(e.to_string()),
            }
        }
        match &*self.lock() {
            State::Ready(_) => Health::Ready,
            State::Probing { reason, .. } => Health::Probing(reason.clone()),
            State::Failed(r) => Health::Failed(r.clone()),
        }
    }

    /// The connection, probing first when a probe is due.
    fn connected(&self) -> Result<Arc<Connected>, Error> {
        let mut state = self.lock();
        match &*state {
            State::Ready(c) => return Ok(c.clone()),
            State::Failed(r) => return Err(Error::Unavailable(r.clone())),
            State::Probing { reason, next, .. } if Instant::now() < *next => {
                return Err(Error::Unavailable(reason.clone()));
            }
            State::Probing { .. } => {}
        }
        let backoff = match &*state {
            State::Probing { backoff, .. } => *backoff,
            _ => FIRST_BACKOFF,
        };
        match self.connect() {
            Ok(c) => {
                let c = Arc::new(c);
                *state = State::Ready(c.clone());
                Ok(c)
            }
            Err(Error::Unavailable(reason)) => {
                let next_backoff = (backoff * 2).min(MAX_BACKOFF);
                *state = State::Probing {
                    reason: reason.clone(),
                    next: Instant::now() + backoff,
                    backoff: next_backoff,
                };
                Err(Error::Unavailable(reason))
            }
            Err(e) => {
                let reason = format!("{e}; fix the configuration or token and restart");
                tracing::error!(backend = %self.cfg.name, %reason, "PKCS#11 backend failed");
                *state = State::Failed(reason.clone());
                Err(Error::Unavailable(reason))
            }
        }
    }

    /// Drops the connection after a connection fault; the next request reconnects.
    fn disconnect(&self, reason: String) {
        tracing::warn!(backend = %self.cfg.name, %reason, "PKCS#11 connection lost; reconnecting on the next request");
        let mut state = self.lock();
        if matches!(&*state, State::Ready(_)) {
            *state = State::Probing {
                reason,
                next: Instant::now(),
                backoff: FIRST_BACKOFF,
            };
        }
    }

    fn checkout(&self, c: &Connected) -> Result<Session, Error> {
        let deadline = Instant::now() + SESSION_WAIT;
        let mut idle = c.idle.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(s) = idle.pop() {
                return Ok(s);
            }
            {
                let mut open = c.open.lock().unwrap_or_else(|e| e.into_inner());
                if *open < self.cfg.max_sessions.max(1) {
                    *open += 1;
                    drop(open);
                    drop(idle);
                    return self.ctx.open_ro_session(c.slot).map_err(|e| {
                        *c.open.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
                        device(e)
                    });
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Unavailable("all PKCS#11 sessions are busy".into()));
            }
            idle = c
                .returned
                .wait_timeout(idle, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn checkin(&self, c: &Connected, s: Session) {
        c.idle.lock().unwrap_or_else(|e| e.into_inner()).push(s);
        c.returned.notify_one();
    }

    fn forget(&self, c: &Connected, s: Session) {
        drop(s);
        *c.open.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        c.returned.notify_one();
    }
}

impl KeySigner for Pkcs11Key {
    fn public_key_der(&self) -> &[u8] {
        &self.cfg.expected_spki
    }

    fn algorithm(&self) -> SigAlg {
        self.alg
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        let c = self.connected()?;
        let session = self.checkout(&c)?;
        match sign_with(&session, c.key, self.alg, message) {
            Ok(sig) => {
                self.checkin(&c, session);
                Ok(sig)
            }
            Err(e) if is_connection_fault(&e) => {
                self.forget(&c, session);
                self.disconnect(format!("PKCS#11: {e}"));
                Err(Error::Unavailable(format!("PKCS#11: {e}")))
            }
            Err(e) => {
                self.checkin(&c, session);
                Err(Error::Signing(format!("PKCS#11: {e}")))
            }
        }
    }

    fn ready(&self) -> Result<(), String> {
        match self.health() {
            Health::Ready => Ok(()),
            Health::Probing(r) | Health::Failed(r) => Err(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_follow_rfc7512() {
        let u = Pkcs11Uri::parse("pkcs11:token=ecs-ca;object=issuing-key;id=%0a%1B").unwrap();
        assert_eq!(u.token.as_deref(), Some("ecs-ca"));
        assert_eq!(u.object.as_deref(), Some("issuing-key"));
        assert_eq!(u.id, Some(vec![0x0a, 0x1b]));
        let u = Pkcs11Uri::parse("pkcs11:serial=abc;slot-id=7;object=k%20ey").unwrap();
        assert_eq!(
            (u.serial.as_deref(), u.slot_id, u.object.as_deref()),
            (Some("abc"), Some(7), Some("k ey"))
        );
        for bad in [
            "token=x;object=y",
            "pkcs11:object=y",
            "pkcs11:token=x",
            "pkcs11:token=x;object=y?pin-value=1234",
            "pkcs11:token=x;object=y;colour=red",
            "pkcs11:token=x;id=%zz",
        ] {
            assert!(Pkcs11Uri::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn raw_ecdsa_becomes_der() {
        // r with its top bit set needs a leading zero; s with leading zeros loses them.
        let mut raw = vec![0x80; 32];
        raw.extend(std::iter::repeat_n(0, 31));
        raw.push(1);
        let der = ecdsa_raw_to_der(&raw);
        assert_eq!(&der[..4], &[0x30, 0x26, 0x02, 0x21]);
        assert_eq!(der[4], 0x00);
        assert_eq!(&der[der.len() - 3..], &[0x02, 0x01, 0x01]);
        assert!(ecdsa_raw_to_der(&[]).is_empty());
    }
}
