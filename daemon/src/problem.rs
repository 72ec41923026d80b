//! Errors on the wire (`contract/api.md` §5): every refusal is one [`ApiError`] with exactly
//! one contract `cause`, rendered as TS 29.122 `ProblemDetails`.
//!
//! The `From` impls below are the one place where each crate's error becomes a cause, so the
//! contract's table can be read off this file.

use crate::store::StoreError;
use crate::token::TokenError;
use ecs_ca_backends::Error as BackendError;
use ecs_policy::{Refusal, RefusalKind};
use serde_json::json;

/// The contract's causes (and the two path-level errors HTTP needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    InvalidMsgFormat,
    MandatoryIeMissing,
    MandatoryIeIncorrect,
    InvalidCsr,
    WeakKey,
    InvalidToken,
    ClientCertRequired,
    TokenReplayed,
    EesIdMismatch,
    EesAlreadyRegistered,
    UntrustedClientCert,
    PolicyRejected,
    NotRegistrationOwner,
    RegistrationNotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    TooManyRequests,
    BackendUnavailable,
    /// The store cannot commit now (disk full, database down); nothing was half-written.
    StorageUnavailable,
    /// No such resource path (TS 29.500 `RESOURCE_URI_STRUCTURE_NOT_FOUND`).
    ResourceNotFound,
    /// The path exists, the method does not.
    MethodNotAllowed,
    /// A fault of the ECS itself; the detail never says more than that.
    SystemFailure,
}

impl Cause {
    /// Every cause, for the documentation check (a new variant is added here too).
    pub const ALL: [Cause; 22] = {
        use Cause::*;
        [
            InvalidMsgFormat,
            MandatoryIeMissing,
            MandatoryIeIncorrect,
            InvalidCsr,
            WeakKey,
            InvalidToken,
            ClientCertRequired,
            TokenReplayed,
            EesIdMismatch,
            EesAlreadyRegistered,
            UntrustedClientCert,
            PolicyRejected,
            NotRegistrationOwner,
            RegistrationNotFound,
            PayloadTooLarge,
            UnsupportedMediaType,
            TooManyRequests,
            BackendUnavailable,
            StorageUnavailable,
            ResourceNotFound,
            MethodNotAllowed,
            SystemFailure,
        ]
    };

    pub fn status(self) -> u16 {
        use Cause::*;
        match self {
            InvalidMsgFormat | MandatoryIeMissing | MandatoryIeIncorrect | InvalidCsr | WeakKey => {
                400
            }
            InvalidToken | ClientCertRequired => 401,
            TokenReplayed | EesIdMismatch | EesAlreadyRegistered | UntrustedClientCert
            | PolicyRejected | NotRegistrationOwner => 403,
            RegistrationNotFound | ResourceNotFound => 404,
            MethodNotAllowed => 405,
            PayloadTooLarge => 413,
            UnsupportedMediaType => 415,
            TooManyRequests => 429,
            SystemFailure => 500,
            BackendUnavailable | StorageUnavailable => 503,
        }
    }

    pub fn code(self) -> &'static str {
        use Cause::*;
        match self {
            InvalidMsgFormat => "INVALID_MSG_FORMAT",
            MandatoryIeMissing => "MANDATORY_IE_MISSING",
            MandatoryIeIncorrect => "MANDATORY_IE_INCORRECT",
            InvalidCsr => "INVALID_CSR",
            WeakKey => "WEAK_KEY",
            InvalidToken => "INVALID_TOKEN",
            ClientCertRequired => "CLIENT_CERT_REQUIRED",
            TokenReplayed => "TOKEN_REPLAYED",
            EesIdMismatch => "EES_ID_MISMATCH",
            EesAlreadyRegistered => "EES_ALREADY_REGISTERED",
            UntrustedClientCert => "UNTRUSTED_CLIENT_CERT",
            PolicyRejected => "POLICY_REJECTED",
            NotRegistrationOwner => "NOT_REGISTRATION_OWNER",
            RegistrationNotFound => "REGISTRATION_NOT_FOUND",
            PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            TooManyRequests => "TOO_MANY_REQUESTS",
            BackendUnavailable => "BACKEND_UNAVAILABLE",
            StorageUnavailable => "STORAGE_UNAVAILABLE",
            ResourceNotFound => "RESOURCE_URI_STRUCTURE_NOT_FOUND",
            MethodNotAllowed => "METHOD_NOT_ALLOWED",
            SystemFailure => "SYSTEM_FAILURE",
        }
    }

    fn title(self) -> &'static str {
        match self.status() {
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            415 => "Unsupported Media Type",
            429 => "Too Many Requests",
            503 => "Service Unavailable",
            _ => "Internal Server Error",
        }
    }
}

/// A refusal: the cause, a sentence for humans, and where relevant the field or the policy
/// rule at fault.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub cause: Cause,
    pub detail: String,
    /// (JSON pointer, reason).
    pub invalid_params: Vec<(String, String)>,
    /// The policy rule that decided a refusal, for the audit log.
    pub rule: Option<String>,
    pub retry_after: Option<u64>,
    /// Where the contract gives a cause another status than its usual one (a PUT that
    /// changes `eesId`: 403 `MANDATORY_IE_INCORRECT`).
    pub status_override: Option<u16>,
}

impl ApiError {
    pub fn new(cause: Cause, detail: impl Into<String>) -> Self {
        ApiError {
            cause,
            detail: detail.into(),
            invalid_params: Vec::new(),
            rule: None,
            retry_after: None,
            status_override: None,
        }
    }

    /// An error about one field, named by its JSON pointer.
    pub fn param(cause: Cause, pointer: &str, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        ApiError {
            detail: format!("{pointer}: {reason}"),
            invalid_params: vec![(pointer.to_string(), reason)],
            ..ApiError::new(cause, "")
        }
    }

    pub fn internal(what: impl std::fmt::Display) -> Self {
        tracing::error!(error = %what, "internal failure");
        ApiError::new(Cause::SystemFailure, "internal failure; see the ECS log")
    }

    pub fn status(&self) -> u16 {
        self.status_override.unwrap_or(self.cause.status())
    }

    /// The `application/problem+json` body.
    pub fn body(&self) -> Vec<u8> {
        let mut v = json!({
            "status": self.status(),
            "title": self.cause.title(),
            "detail": self.detail,
            "cause": self.cause.code(),
        });
        if !self.invalid_params.is_empty() {
            v["invalidParams"] = self
                .invalid_params
                .iter()
                .map(|(p, r)| json!({"param": p, "reason": r}))
                .collect();
        }
        serde_json::to_vec(&v).expect("problem serialises")
    }

    /// Extra headers: `WWW-Authenticate` for token faults, `Retry-After` when given.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = Vec::new();
        match self.cause {
            Cause::InvalidToken => h.push((
                "www-authenticate",
                format!(
                    "Bearer error=\"invalid_token\", error_description=\"{}\"",
                    // A header value is visible ASCII: anything else (a quote, a
                    // non-ASCII letter of a name) would drop the whole header.
                    self.detail
                        .chars()
                        .map(|c| match c {
                            '"' | '\\' => '\'',
                            c if c == ' ' || c.is_ascii_graphic() => c,
                            _ => '?',
                        })
                        .collect::<String>()
                ),
            )),
            Cause::ClientCertRequired => h.push(("www-authenticate", "Bearer".to_string())),
            _ => {}
        }
        if let Some(s) = self.retry_after {
            h.push(("retry-after", s.to_string()));
        }
        h
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        ApiError::new(Cause::InvalidToken, e.to_string())
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::InvalidCsr(m) => ApiError::param(Cause::InvalidCsr, "/onboarding/csr", m),
            BackendError::UnsupportedKey(m) => {
                ApiError::param(Cause::WeakKey, "/onboarding/csr", m)
            }
            BackendError::Unavailable(m) => ApiError {
                retry_after: Some(5),
                ..ApiError::new(
                    Cause::BackendUnavailable,
                    format!("the signing backend cannot sign now: {m}"),
                )
            },
            BackendError::BadCertificate(m) => ApiError {
                retry_after: Some(5),
                ..ApiError::new(
                    Cause::BackendUnavailable,
                    format!("the signing backend did not return a usable certificate: {m}"),
                )
            },
            other => ApiError::internal(other),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TokenReplayed => {
                ApiError::new(Cause::TokenReplayed, "the token's jti was already used")
            }
            StoreError::EesAlreadyRegistered => ApiError::new(
                Cause::EesAlreadyRegistered,
                "an active registration exists for this eesId",
            ),
            // What a request a moment later would have been told: its certificate is no
            // longer the registration's current one (or the registration ended).
            StoreError::Changed => ApiError::new(
                Cause::NotRegistrationOwner,
                "the registration changed meanwhile (re-keyed or ended through another \
                 request): the client certificate is no longer its current one",
            ),
            // The transaction did not commit: retrying later is safe, and nothing was kept.
            StoreError::Io(m) => {
                tracing::error!(error = %m, "the store cannot commit");
                ApiError {
                    retry_after: Some(5),
                    ..ApiError::new(
                        Cause::StorageUnavailable,
                        "the store cannot commit now; nothing was stored",
                    )
                }
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        let cause = match r.kind {
            RefusalKind::WeakKey => Cause::WeakKey,
            RefusalKind::Rejected => Cause::PolicyRejected,
            RefusalKind::UntrustedCertificate => Cause::UntrustedClientCert,
        };
        ApiError {
            rule: Some(r.rule.clone()),
            ..ApiError::new(cause, format!("{} (rule {})", r.reason, r.rule))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_that_cannot_commit_answers_503_storage_unavailable_with_retry_after() {
        let e = ApiError::from(StoreError::Io("No space left on device".into()));
        assert_eq!(e.status(), 503);
        assert_eq!(e.cause.code(), "STORAGE_UNAVAILABLE");
        assert!(e.headers().contains(&("retry-after", "5".to_string())));
        assert!(
            !e.detail.contains("No space"),
            "the detail says no more than needed"
        );
    }
}
