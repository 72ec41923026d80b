//! The daemon's one wall clock. Everything it calls (the policy, configuration validation,
//! token checks, the issuer) takes the time as an argument, so that a request is decided at
//! one instant and tests can pass any.

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    ecs_ca_backends::now_unix()
}

/// RFC 3339 in UTC, as the ECS writes times.
pub fn format_time(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
