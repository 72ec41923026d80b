//! `ecsd`: the ECS registration authority daemon and its command line.
//!
//! This crate owns what connects the other two to the world: configuration, TLS and HTTP,
//! onboarding-token validation, client-certificate binding, the registration pipeline, the
//! store, the audit log, the admin endpoints and the CLI. Certificate and key logic lives in
//! `ecs-ca-backends`, policy decisions in `ecs-policy`; this crate gathers facts, asks them,
//! and records the outcome.
//!
//! The module map, one registration room by room (each imports only rooms listed after it;
//! `docs/architecture.md` has the table): `cli` → `serve` → `http` (listeners, TLS) →
//! `registration` (the pipeline, no HTTP types) → `app` (shared state) → `backends` (signing)
//! → `problem` (contract causes) → `store` (records, the trait, one file per engine) →
//! `token` → `audit` (chain, checkpoints) → `config` → `trust` → small utilities.
#![forbid(unsafe_code)]

pub mod app;
pub mod audit;
pub mod backends;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod files;
/// The fuzz targets' entry points, with a published test key: not in a production build.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod hardening;
pub mod http;
pub mod lane;
pub mod metrics;
pub mod problem;
pub mod ratelimit;
pub mod registration;
pub mod secrets;
pub mod serve;
pub mod store;
/// The harness that starts a real `ecsd` for tests: not in a production build.
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;
pub mod token;
pub mod trust;
