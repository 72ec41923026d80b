//! `ecsd bench`: a load generator that drives an ECS (or, with the same CSRs, a `cfssl serve`
//! `/api/v1/cfssl/sign` endpoint) with full registrations, and prints what an operator needs
//! to size a deployment. Everything is prepared before the clock starts.

use crate::client::{Connection, HttpVersion, HttpsClient};
use ecs_ca_backends::{SoftwareKey, build_csr, generate_p256_pkcs8_pem};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// What to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Ecs,
    Cfssl,
}

/// How connections are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connections {
    /// Keep-alive: each client sends all its requests on one connection.
    Reuse,
    /// A new TCP (and TLS) connection for every request.
    New,
}

pub struct BenchArgs {
    pub target: Target,
    /// `https://…` for the ECS; `http(s)://…` for cfssl.
    pub url: String,
    /// Trust roots (PEM) for https.
    pub roots_pem: Vec<u8>,
    /// Pre-minted onboarding tokens, one per request (ECS target).
    pub tokens: Vec<String>,
    pub ees_ids: Vec<String>,
    pub csrs: Vec<String>,
    pub concurrency: usize,
    pub connections: Connections,
    pub duration: Option<Duration>,
    pub cfssl_profile: Option<String>,
    pub server_pid: Option<u32>,
}

/// Prepares `n` distinct EES IDs and their CSRs (P-256).
pub fn prepare(n: usize, prefix: &str) -> Result<(Vec<String>, Vec<String>), String> {
    let mut ids = Vec::with_capacity(n);
    let mut csrs = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("{prefix}-{i}.bench.example");
        let key =
            SoftwareKey::from_pkcs8_pem(&generate_p256_pkcs8_pem().map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        csrs.push(build_csr(&key, &id).map_err(|e| e.to_string())?);
        ids.push(id);
    }
    Ok((ids, csrs))
}

struct Sample {
    latency: Duration,
    status: u16,
    cause: String,
}

/// The request for registration `i`: (path, headers, body).
fn request(args: &BenchArgs, i: usize) -> (&'static str, Vec<(&'static str, String)>, Vec<u8>) {
    let mut headers = vec![("content-type", "application/json".to_string())];
    let (path, body) = match args.target {
        Target::Ecs => {
            headers.push(("authorization", format!("Bearer {}", args.tokens[i])));
            let body = json!({
                "eesProf": { "eesId": args.ees_ids[i], "endPt": { "fqdn": args.ees_ids[i] }, "eecRegConf": false },
                "onboarding": { "csr": args.csrs[i] }
            });
            ("/eecs-eesregistration/v1/registrations", body)
        }
        Target::Cfssl => {
            let mut body = json!({
                "certificate_request": args.csrs[i],
                "hosts": [args.ees_ids[i]],
                "subject": { "CN": args.ees_ids[i] },
            });
            if let Some(p) = &args.cfssl_profile {
                body["profile"] = json!(p);
            }
            ("/api/v1/cfssl/sign", body)
        }
    };
    (path, headers, body.to_string().into_bytes())
}

/// Runs the load and returns the report.
pub async fn run(args: BenchArgs) -> Result<Value, String> {
    let args = Arc::new(args);
    let total = args.csrs.len();
    let next = Arc::new(AtomicUsize::new(0));
    // Each worker is one client with its own TLS session cache, as each EES has: with a new
    // connection per request it resumes with the ticket its last one received. Made before
    // the clock starts, like everything else the load needs.
    let clients = (0..args.concurrency)
        .map(|_| HttpsClient::new(&args.roots_pem, None, HttpVersion::Http1))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let cpu_before = args.server_pid.and_then(cpu_seconds);
    // The load generator shares the machine's cores with the server: its own CPU is part of
    // what bounds a rate measured on one machine, so it is reported beside the server's.
    let own_before = cpu_seconds(std::process::id());
    let started = Instant::now();
    let deadline = args.duration.map(|d| started + d);
    let mut workers = Vec::new();
    for client in clients {
        let (args, next) = (args.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let (mut connections, mut resumed) = (0usize, 0usize);
            let mut conn: Option<Connection> = None;
            loop {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let t0 = Instant::now();
                if conn.is_none() || args.connections == Connections::New {
                    conn = match client.connect(&args.url).await {
                        Ok((c, _)) => {
                            connections += 1;
                            resumed += usize::from(c.resumed());
                            Some(c)
                        }
                        Err(e) => {
                            samples.push(Sample {
                                latency: t0.elapsed(),
                                status: 0,
                                cause: format!("connect: {e}"),
                            });
                            continue;
                        }
                    };
                }
                let Some(c) = conn.as_mut() else {
                    continue;
                };
                let (path, headers, body) = request(&args, i);
                let headers: Vec<(&str, &str)> =
                    headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let result = c
                    .send("POST", path, &headers, Some(body))
                    .await
                    .map(|r| (r.status, r.body))
                    .map_err(|e| e.to_string());
                match result {
                    Ok((status, body)) => {
                        let cause = if (200..300).contains(&status) {
                            String::new()
                        } else {
                            serde_json::from_slice::<Value>(&body)
                                .ok()
                                .and_then(|v| v["cause"].as_str().map(String::from))
                                .unwrap_or_default()
                        };
                        samples.push(Sample {
                            latency: t0.elapsed(),
                            status,
                            cause,
                        });
                    }
                    Err(e) => {
                        samples.push(Sample {
                            latency: t0.elapsed(),
                            status: 0,
                            cause: e,
                        });
                        conn = None;
                    }
                }
            }
            (samples, connections, resumed)
        }));
    }
    let (mut samples, mut connections, mut resumed) = (Vec::new(), 0, 0);
    for w in workers {
        let (s, c, r) = w.await.map_err(|e| e.to_string())?;
        samples.extend(s);
        (connections, resumed) = (connections + c, resumed + r);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = args.server_pid.and_then(cpu_seconds);
    let own_after = cpu_seconds(std::process::id());
    let ok: Vec<&Sample> = samples
        .iter()
        .filter(|s| (200..300).contains(&s.status))
        .collect();
    let mut lat: Vec<f64> = ok
        .iter()
        .map(|s| s.latency.as_secs_f64() * 1000.0)
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        lat[((lat.len() as f64 - 1.0) * p).round() as usize]
    };
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for s in samples.iter().filter(|s| !(200..300).contains(&s.status)) {
        *errors
            .entry(format!("{} {}", s.status, s.cause))
            .or_default() += 1;
    }
    Ok(json!({
        "target": format!("{:?}", args.target).to_lowercase(),
        "connections": format!("{:?}", args.connections).to_lowercase(),
        "concurrency": args.concurrency,
        "requests": samples.len(),
        "ok": ok.len(),
        "seconds": elapsed,
        "rps": ok.len() as f64 / elapsed,
        "latency_ms": { "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": lat.last().copied().unwrap_or(0.0) },
        "errors": errors,
        "tls": { "connections": connections, "resumed": resumed },
        "server_cpu_seconds": match (cpu_before, cpu_after) { (Some(a), Some(b)) => json!(b - a), _ => Value::Null },
        "client_cpu_seconds": match (own_before, own_after) { (Some(a), Some(b)) => json!(b - a), _ => Value::Null },
        "server_peak_rss_mib": args.server_pid.and_then(peak_rss_mib),
    }))
}

/// utime + stime of a process, in seconds (Linux `/proc`).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Peak resident set size of a process, MiB (`VmHWM`).
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// One line for people.
pub fn render_text(v: &Value) -> String {
    format!(
        "{} {} c={}: {} ok of {} in {:.1} s = {:.0} req/s; latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}; errors {}; server cpu {} s, load generator cpu {} s, peak rss {} MiB\n",
        v["target"].as_str().unwrap_or(""),
        v["connections"].as_str().unwrap_or(""),
        v["concurrency"],
        v["ok"],
        v["requests"],
        v["seconds"].as_f64().unwrap_or(0.0),
        v["rps"].as_f64().unwrap_or(0.0),
        v["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
        v["latency_ms"]["p90"].as_f64().unwrap_or(0.0),
        v["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
        v["latency_ms"]["max"].as_f64().unwrap_or(0.0),
        v["errors"],
        v["server_cpu_seconds"],
        v["client_cpu_seconds"],
        v["server_peak_rss_mib"],
    )
}

/// `ecsd bench --prefill N`: stores `count` registrations, as the API would have (a real
/// certificate from the default backend, the registration, its spent token and its audit
/// record), `revoked` of them de-registered with their certificate revoked, so that the
/// scale scenarios run against a full store. The daemon must be stopped (the store is
/// locked by whoever has it open).
pub async fn prefill(
    cfg: &crate::config::Config,
    count: usize,
    revoked: usize,
) -> Result<Value, String> {
    use crate::audit::AuditEvent;
    use crate::store::{CertRecord, Commit, RegState, RegistrationRecord, Revocation, SpentToken};
    use ecs_ca_backends::{CertTemplate, KeySigner, SanEntry};

    let started = Instant::now();
    let base = cfg
        .source
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let backend = cfg.default_backend().to_string();
    let backend_cfg = cfg
        .backends
        .get(&backend)
        .ok_or_else(|| format!("--prefill: no backend {backend:?} in the configuration"))?;
    let (issuer, _) = crate::backends::load_backend(&backend, backend_cfg, &base)?;
    // Recorded as governed by the first domain whose certificates this backend issues.
    let domain = cfg
        .domains
        .iter()
        .find(|(_, d)| cfg.domain_backend(d) == backend)
        .map(|(n, _)| n.clone())
        .unwrap_or_else(|| "default".into());
    let store = crate::store::open(&cfg.storage)
        .await
        .map_err(|e| e.to_string())?;
    // One EES key for all: the key does not change what is stored.
    let ees_key =
        SoftwareKey::from_pkcs8_pem(&generate_p256_pkcs8_pem().map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let spki = ees_key.public_key_der().to_vec();
    let now = crate::clock::now();
    let policy_hash = cfg.policy_hash();
    let run = crate::token::random_b64(6)
        .to_lowercase()
        .replace(['-', '_'], "x");

    let make = |i: usize| -> Result<Commit, String> {
        let ees_id = format!("prefill-{run}-{i}.bench.example");
        let id = crate::token::registration_id();
        let issued = issuer
            .issue(&CertTemplate {
                common_name: ees_id.clone(),
                organization: None,
                sans: vec![SanEntry::Dns(ees_id.clone())],
                spki_der: spki.clone(),
                now,
                validity_secs: 30 * 86_400,
                client_auth: true,
                server_auth: true,
                crl_url: None,
                csr_pem: None,
            })
            .map_err(|e| e.to_string())?;
        let gone = i < revoked;
        let cert = CertRecord {
            serial: issued.serial_hex.clone(),
            registration_id: id.clone(),
            backend: backend.clone(),
            der: issued.der.clone(),
            fingerprint: issued.fingerprint.clone(),
            not_before: issued.not_before,
            not_after: issued.not_after,
            revoked: None,
            chain: Vec::new(),
        };
        let reg = RegistrationRecord {
            id: id.clone(),
            state: if gone {
                RegState::Deregistered
            } else {
                RegState::Active
            },
            ees_id: ees_id.clone(),
            prov_id: None,
            domain: domain.clone(),
            backend: backend.clone(),
            profile: json!({ "eesId": ees_id, "endPt": { "fqdn": ees_id }, "eecRegConf": false }),
            exp_time: now + 30 * 86_400,
            supp_feat: None,
            created_at: now,
            updated_at: now,
            cert_source: crate::store::CertSource::EcsIssued,
            current_cert: cert.serial.clone(),
            certs: vec![cert.serial.clone()],
            secret_token_hash: None,
            token_issuer: "bench-prefill".into(),
        };
        Ok(Commit {
            registration: Some(reg),
            claim_ees_id: !gone,
            expect_current: None,
            revocations: if gone {
                vec![(
                    cert.serial.clone(),
                    Revocation {
                        at: now,
                        reason: ecs_ca_backends::RevocationReason::CessationOfOperation,
                    },
                )]
            } else {
                Vec::new()
            },
            new_certs: vec![cert],
            spend_token: Some(SpentToken {
                iss: "bench-prefill".into(),
                jti: id.clone(),
                exp: now + 600,
            }),
            raise_crl_numbers: Vec::new(),
            audit: Some(AuditEvent {
                time: crate::clock::format_time(now),
                client: "ecsd bench --prefill".into(),
                action: crate::audit::Action::Register,
                outcome: crate::audit::Outcome::Accepted,
                status: 201,
                ees_id: Some(ees_id),
                registration_id: Some(id),
                cert_serial: Some(issued.serial_hex),
                cert_fingerprint: Some(issued.fingerprint),
                key: Some("ECDSA P-256".into()),
                policy_hash: policy_hash.clone(),
                ..Default::default()
            }),
        })
    };

    // Certificates are signed on every core; commits are applied in batches, one flush each.
    const BATCH: usize = 1000;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let rt = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        std::thread::scope(|s| -> Result<(), String> {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| -> Result<(), String> {
                        loop {
                            let from = next.fetch_add(BATCH, Ordering::Relaxed);
                            if from >= count {
                                return Ok(());
                            }
                            let batch = (from..(from + BATCH).min(count))
                                .map(make)
                                .collect::<Result<Vec<_>, _>>()?;
                            let n = batch.len();
                            rt.block_on(store.commit_all(batch))
                                .map_err(|e| e.to_string())?;
                            let total = done.fetch_add(n, Ordering::Relaxed) + n;
                            if total % 100_000 < n {
                                eprintln!(
                                    "prefill: {total} of {count} in {:.0} s",
                                    started.elapsed().as_secs_f64()
                                );
                            }
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join()
                    .map_err(|_| "a prefill thread panicked".to_string())??;
            }
            Ok(())
        })
    })?;
    store.flush().await.map_err(|e| e.to_string())?;
    let counts = store.counts().await.map_err(|e| e.to_string())?;
    Ok(json!({
        "prefilled": count,
        "revoked": revoked.min(count),
        "active_registrations": counts.active_registrations,
        "audit_records": counts.audit_records,
        "seconds": started.elapsed().as_secs_f64(),
    }))
}
