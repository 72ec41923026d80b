//! ECSP domain policy: what an ECSP security team writes under `[domains.*]`, checked and
//! decided without any I/O.
//!
//! This crate owns the policy as data (serde types that mirror `contract/operator.md` §1), its
//! validation (what `ecsd serve` refuses at start and `ecsd policy lint` reports), and the pure
//! decisions of the onboarding path: may this token issuer onboard this EES ID in this domain,
//! with this key, for how long, and with or without a Secret_token.
//!
//! It must not do I/O, read a clock (time is always an argument) or know about HTTP: the
//! daemon gathers the facts, this crate decides, and every refusal carries the stable
//! identifier of the rule that decided it (`domains.ecsp-a.key_types`) and a sentence for
//! the operator.
#![forbid(unsafe_code)]

mod decide;
mod diff;
mod duration;
mod glob;
mod lint;
mod names;
mod types;

pub use duration::PolicyDuration;
pub use glob::{glob_match, glob_overlap};
pub use ipnet::IpNet;
pub use names::{EndpointFacts, OwnNames, RequestedName, SanName, UriHost, is_fqdn, normalize_dns};

pub use decide::{
    Approval, Decision, OnboardingFacts, Refusal, RefusalKind, RuleResult, ThirdPartyFacts,
    UpdateFacts,
};
pub use diff::{ChangeKind, RuleChange, diff_domains};
pub use lint::{AnchorFacts, Finding, Known, Severity, lint_policy};
pub use types::{DomainPolicy, KeyType, MAX_CERT_VALIDITY_SECS, SecretTokenMode, ThirdPartyPolicy};
