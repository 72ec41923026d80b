//! Prometheus metrics served on the admin listener.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// The ECS's metrics. Labels carry causes and backend names, never identities or secrets.
pub struct Metrics {
    registry: Registry,
    /// Requests on the registration API by action, outcome and cause.
    pub requests: IntCounterVec,
    /// Time to issue (sign and verify) one certificate, by backend.
    pub issuance_seconds: HistogramVec,
    /// Signing failures, by backend.
    pub backend_errors: IntCounterVec,
    pub active_registrations: IntGauge,
    /// What the store takes on disk (or in the database), bytes.
    pub store_bytes: IntGauge,
    /// Refusals counted into an aggregate audit record instead of one record each.
    pub audit_refusals_aggregated: prometheus::IntCounter,
    /// 1 when a backend can sign, 0 while it is probing or failed.
    pub backend_ready: IntGaugeVec,
    /// Always 1; its label says which build runs.
    pub build_info: IntGaugeVec,
    /// When each backend's issuing CA certificate expires (Unix seconds).
    pub ca_not_after: IntGaugeVec,
    /// When each published CRL's nextUpdate falls (Unix seconds): alert well before it.
    pub crl_next_update: IntGaugeVec,
    /// When the server certificate in use expires (Unix seconds).
    pub server_cert_not_after: IntGauge,
    /// Completed TLS handshakes on the registration API, full or resumed with a ticket.
    pub tls_handshakes: IntCounterVec,
}

/// The `kind` label of `ecs_tls_handshakes_total`.
fn handshake_kind(resumed: bool) -> &'static str {
    if resumed { "resumed" } else { "full" }
}

impl Metrics {
    /// Counts a completed TLS handshake on the registration API.
    pub fn tls_handshake(&self, resumed: bool) {
        self.tls_handshakes
            .with_label_values(&[handshake_kind(resumed)])
            .inc();
    }

    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "ecs_registration_requests_total",
                "Registration API requests by action, outcome and cause",
            ),
            &["action", "outcome", "cause"],
        )
        .expect("valid metric");
        let issuance_seconds = HistogramVec::new(
            HistogramOpts::new("ecs_issuance_seconds", "Time to issue one certificate").buckets(
                vec![
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0,
                ],
            ),
            &["backend"],
        )
        .expect("valid metric");
        let backend_errors = IntCounterVec::new(
            Opts::new("ecs_backend_errors_total", "Signing backend failures"),
            &["backend"],
        )
        .expect("valid metric");
        let active_registrations =
            IntGauge::new("ecs_active_registrations", "Active EES registrations")
                .expect("valid metric");
        let store_bytes = IntGauge::new(
            "ecs_store_bytes",
            "Bytes the store takes (SQLite pages, sled files, the PostgreSQL database)",
        )
        .expect("valid metric");
        let audit_refusals_aggregated = prometheus::IntCounter::new(
            "ecs_audit_refusals_aggregated_total",
            "Refusals counted into an aggregate audit record (a flood of identical refusals)",
        )
        .expect("valid metric");
        let backend_ready = IntGaugeVec::new(
            Opts::new("ecs_backend_ready", "1 when the signing backend can sign"),
            &["backend"],
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "ecs_build_info",
                "Always 1; the labels name the running build",
            ),
            &["version"],
        )
        .expect("valid metric");
        let ca_not_after = IntGaugeVec::new(
            Opts::new(
                "ecs_issuing_ca_not_after_seconds",
                "When the backend's issuing CA certificate expires (Unix time)",
            ),
            &["backend"],
        )
        .expect("valid metric");
        let crl_next_update = IntGaugeVec::new(
            Opts::new(
                "ecs_crl_next_update_seconds",
                "The nextUpdate of the backend's published CRL (Unix time)",
            ),
            &["backend"],
        )
        .expect("valid metric");
        let server_cert_not_after = IntGauge::new(
            "ecs_server_certificate_not_after_seconds",
            "When the TLS server certificate in use expires (Unix time)",
        )
        .expect("valid metric");
        let tls_handshakes = IntCounterVec::new(
            Opts::new(
                "ecs_tls_handshakes_total",
                "Completed TLS handshakes on the registration API, by kind (full or resumed)",
            ),
            &["kind"],
        )
        .expect("valid metric");
        for c in [
            Box::new(backend_ready.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(tls_handshakes.clone()),
            Box::new(build_info.clone()),
            Box::new(ca_not_after.clone()),
            Box::new(crl_next_update.clone()),
            Box::new(server_cert_not_after.clone()),
            Box::new(requests.clone()),
            Box::new(issuance_seconds.clone()),
            Box::new(backend_errors.clone()),
            Box::new(active_registrations.clone()),
            Box::new(store_bytes.clone()),
            Box::new(audit_refusals_aggregated.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Metrics {
            registry,
            requests,
            issuance_seconds,
            backend_errors,
            active_registrations,
            store_bytes,
            audit_refusals_aggregated,
            backend_ready,
            build_info,
            ca_not_after,
            crl_next_update,
            server_cert_not_after,
            tls_handshakes,
        }
    }

    /// Gives every series with known labels its zero at start, so that `rate()` and
    /// `absent()` alerts see the series before the first event: the build, each backend's
    /// errors, issuance times and readiness, and each operation's accepted requests.
    pub fn prime(&self, backends: &[&str]) {
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for b in backends {
            self.backend_errors.with_label_values(&[b]);
            self.issuance_seconds.with_label_values(&[b]);
            self.backend_ready.with_label_values(&[b]);
        }
        for resumed in [false, true] {
            self.tls_handshakes
                .with_label_values(&[handshake_kind(resumed)]);
        }
        use crate::audit::Action;
        for a in [
            Action::Register,
            Action::Get,
            Action::Update,
            Action::Rekey,
            Action::Patch,
            Action::Deregister,
        ] {
            self.requests.with_label_values(&[a.name(), "accepted", ""]);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of metrics");
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
