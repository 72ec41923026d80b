//! The command line of `ecsd`: the clap types and the dispatch of every command.
//!
//! Exit status: 0 success, 2 usage or configuration error, 1 anything else; errors go to
//! stderr in one line naming the file, key or argument at fault.

use crate::audit::{AuditRecord, verify_chain};
use crate::config::Config;
use crate::store;
use clap::{Args, Parser, Subcommand};
mod bench;
mod ceiling;
mod diff;
mod ees;
mod explain;
mod init;
mod store_cmd;

use crate::{serve, token};
use ecs_policy::{PolicyDuration, Severity};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "ecsd",
    version,
    about = "ECS registration authority and CA for Edge Enabler Servers"
)]
pub struct Cli {
    /// How logs are written to stderr: `text` for people, `json` (one object per line) for
    /// journald and log pipelines.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Writes one line to stdout. A reader that went away (`ecsd audit export | head`) ends
/// the command quietly and successfully, as for any Unix filter; it is not a panic.
pub fn emit(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(line).and_then(|_| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("ecsd: stdout: {e}");
        std::process::exit(1);
    }
}

/// `println!` for command output, through [`emit`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::emit(format_args!($($arg)*))
    };
}
pub(crate) use out;

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon. Without --config: `init` ./ecs-data if it is empty, then serve from it.
    Serve {
        /// The configuration file (TOML); default: ./ecs-data/ecs.toml, made on first start.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write a complete, working configuration and its keys into DIR.
    Init {
        /// The folder to write into; refused if it holds an ecs.toml.
        #[arg(long)]
        dir: PathBuf,
        /// The EES-facing HTTPS listener (server.listen).
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: String,
        /// Defaults to https://LISTEN.
        #[arg(long)]
        public_url: Option<String>,
        /// The probes-and-metrics listener (server.admin_listen).
        #[arg(long, default_value = "127.0.0.1:9443")]
        admin_listen: String,
        /// The ECS's identifier: the audience onboarding tokens must name.
        #[arg(long, default_value = "ecs.mno.example")]
        ecs_id: String,
    },
    /// Onboarding tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// The reference EES client.
    #[command(subcommand)]
    Ees(EesCmd),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Static checks of a configuration's policy.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// The load generator: full registrations against an ECS, or the same CSRs against a
    /// `cfssl serve` `/api/v1/cfssl/sign` endpoint.
    Bench {
        /// The ECS configuration whose development token issuer mints the tokens.
        #[arg(long)]
        config: PathBuf,
        /// What to drive: the ECS's registration API, or cfssl's /api/v1/cfssl/sign.
        #[arg(long, default_value = "ecs")]
        target: BenchTarget,
        /// The ECS (https) or cfssl (http/https) base URL; default: the ECS's public_url.
        #[arg(long)]
        url: Option<String>,
        /// Trust roots for https; default: the configuration's root.pem.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// With --target cfssl: the signing profile to ask for.
        #[arg(long)]
        cfssl_profile: Option<String>,
        /// How many registrations (each with its own EES ID, key and token).
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        /// How many clients send at once.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// `reuse`: one keep-alive connection per client; `new`: a TLS handshake per request.
        #[arg(long, default_value = "reuse")]
        connections: BenchConnections,
        /// Stop after this long even if requests remain.
        #[arg(long)]
        duration: Option<PolicyDuration>,
        /// The server's pid, for its CPU seconds and peak RSS.
        #[arg(long)]
        pid: Option<u32>,
        /// `text` for people, `json` for scripts.
        #[arg(long, default_value = "text")]
        format: Format,
        /// Instead of driving a running ECS: store this many registrations directly in the
        /// configuration's store (the daemon stopped), for the scale scenarios.
        #[arg(long)]
        prefill: Option<usize>,
        /// With --prefill: how many of them are de-registered, their certificates revoked.
        #[arg(long, default_value_t = 0)]
        prefill_revoked: usize,
        /// Instead of driving an ECS: the rate, on every core, of exactly the cryptography
        /// one registration needs with the configured token issuer and default backend
        /// (token check, CSR check, signature, its check), for --duration (default 3s).
        #[arg(long, conflicts_with_all = ["prefill", "url", "target"])]
        ceiling: bool,
    },
    /// Backup and restore of the store.
    #[command(subcommand)]
    Store(store_cmd::StoreCmd),
    /// A PKCS#11 key ceremony: one reviewed file in, verified artefacts and a transcript out.
    Ceremony {
        /// The configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Print an onboarding token signed by a token issuer whose private key the
    /// configuration holds (the development issuer).
    Mint {
        /// The configuration whose development token issuer signs.
        #[arg(long)]
        config: PathBuf,
        /// The EES ID the token is for (its `sub`).
        #[arg(long)]
        ees_id: String,
        /// The ECSP domain (`provId`) the token names, if any.
        #[arg(long)]
        prov_id: Option<String>,
        /// How long the token is valid.
        #[arg(long, default_value = "10m")]
        ttl: PolicyDuration,
        /// The [token_issuers.NAME] to sign as; default: the only one with a private_key.
        #[arg(long)]
        issuer: Option<String>,
    },
}

#[derive(Args)]
pub struct EesDir {
    /// The folder `ees register --out` wrote.
    #[arg(long)]
    dir: PathBuf,
}

// Parsed once per process; the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum EesCmd {
    /// Make a key pair and CSR, register, save certificate, chain, ID and Secret_token.
    Register {
        /// The ECS's base URL.
        #[arg(long, default_value = "https://127.0.0.1:8443")]
        url: String,
        /// The root CA certificate to check the ECS's TLS certificate against.
        #[arg(long)]
        ca: PathBuf,
        /// The onboarding token (or --token-file).
        #[arg(long, conflicts_with = "token_file")]
        token: Option<String>,
        /// A file holding the onboarding token (kept out of `ps`, unlike --token).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The EES ID to register.
        #[arg(long)]
        ees_id: String,
        /// The ECSP domain (`eesProf.provId`), if any.
        #[arg(long)]
        prov_id: Option<String>,
        /// The EES endpoint: an FQDN (default: the EES ID when it is one) ...
        #[arg(long, group = "endpoint")]
        fqdn: Option<String>,
        /// ... or IPv4 addresses ...
        #[arg(long, group = "endpoint", num_args = 1..)]
        ipv4: Vec<String>,
        /// ... or IPv6 addresses ...
        #[arg(long, group = "endpoint", num_args = 1..)]
        ipv6: Vec<String>,
        /// ... or a URI.
        #[arg(long, group = "endpoint")]
        uri: Option<String>,
        /// Proposed expiry, RFC 3339.
        #[arg(long)]
        exp_time: Option<String>,
        /// Ask for a Secret_token.
        #[arg(long)]
        secret_token: bool,
        /// Where to save the EES's state.
        #[arg(long)]
        out: PathBuf,
        /// Register even though --out holds another EES's key (which is then replaced and
        /// lost).
        #[arg(long)]
        force: bool,
    },
    /// Show the registration as the ECS has it.
    Show(EesDir),
    /// Send the profile again (renews the registration), optionally with a new expTime.
    Update {
        #[command(flatten)]
        dir: EesDir,
        /// A new expTime to propose (RFC 3339).
        #[arg(long)]
        exp_time: Option<String>,
    },
    /// New key pair and certificate; the old certificate is revoked (superseded).
    Rekey {
        #[command(flatten)]
        dir: EesDir,
        /// Authenticate with the saved Secret_token instead of the certificate.
        #[arg(long)]
        with_secret_token: bool,
    },
    /// End the registration; its certificates are revoked.
    Deregister(EesDir),
}

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Recompute the hash chain; exit 1 naming the first broken record.
    Verify {
        /// The configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// `text` for people, `json` for scripts.
        #[arg(long, default_value = "text")]
        format: Format,
    },
    /// Print audit records.
    Export {
        /// The configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Only records at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// `text` for people, `json` for scripts.
        #[arg(long, default_value = "text")]
        format: Format,
    },
}

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Everything `serve` would refuse (errors) and what an auditor should look at (warnings).
    Lint {
        /// The configuration to audit.
        #[arg(long, value_name = "CONFIG", conflicts_with = "positional")]
        config: Option<PathBuf>,
        /// The configuration given without --config (the older form, kept).
        #[arg(value_name = "CONFIG", id = "positional", hide = true)]
        positional: Option<PathBuf>,
        /// `text` for people, `json` for scripts.
        #[arg(long, default_value = "text")]
        format: Format,
    },
    /// What a proposed policy changes: rules, and against CURRENT's store the registrations
    /// it would no longer admit and the recorded refusals it would now admit.
    Diff {
        /// The configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// The proposed configuration, compared with --config.
        #[arg(long)]
        proposed: PathBuf,
        /// `text` for people, `json` for scripts.
        #[arg(long, default_value = "text")]
        format: Format,
    },
    /// The decision for one case, with every rule evaluated in order.
    Explain {
        /// The configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// The ECSP domain whose policy decides.
        #[arg(long)]
        domain: String,
        /// The EES ID of the case.
        #[arg(long)]
        ees_id: Option<String>,
        /// An onboarding token (read for iss, sub and provId; not verified).
        #[arg(long)]
        token: Option<String>,
        /// The token issuer's configuration name, when no token is given.
        #[arg(long)]
        token_issuer: Option<String>,
        /// A third-party certificate chain (PEM, leaf first): explains the third-party path.
        #[arg(long)]
        cert: Option<PathBuf>,
        /// The CSR key type for the ECS-issued path.
        #[arg(long, default_value = "p256")]
        key_type: String,
        /// The endpoint the EES declares (an FQDN, an IP address or a URI); repeat for
        /// several addresses. Absent: the eesId alone.
        #[arg(long)]
        endpoint: Vec<String>,
        /// The decision time (RFC 3339); default now.
        #[arg(long)]
        at: Option<String>,
        /// `text` for people, `json` for scripts.
        #[arg(long, default_value = "text")]
        format: Format,
    },
}

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum BenchTarget {
    Ecs,
    Cfssl,
}

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum BenchConnections {
    Reuse,
    New,
}

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// A failure with its exit status.
pub struct Fail(pub u8, pub String);

fn usage(m: impl Into<String>) -> Fail {
    Fail(2, m.into())
}

fn other(m: impl Into<String>) -> Fail {
    Fail(1, m.into())
}

fn load(path: &Path) -> Result<Config, Fail> {
    let (cfg, warnings) = Config::load(path).map_err(|e| usage(e.0))?;
    for w in warnings {
        tracing::warn!("{}: {w}", path.display());
    }
    Ok(cfg)
}

pub async fn run(cmd: Command) -> Result<(), Fail> {
    match cmd {
        Command::Serve { config } => {
            let path = match config {
                Some(p) => p,
                None => {
                    let dir = PathBuf::from("ecs-data");
                    let empty = std::fs::read_dir(&dir)
                        .map(|mut d| d.next().is_none())
                        .unwrap_or(true);
                    if empty {
                        init::init(&dir, &init::InitOptions::default())?;
                        tracing::info!("initialised ./ecs-data (root CA: ecs-data/root.pem)");
                    }
                    dir.join("ecs.toml")
                }
            };
            let cfg = load(&path)?;
            serve::serve(cfg).await.map_err(|e| match e {
                serve::StartError::Config(m) => usage(m),
                serve::StartError::Other(m) => other(m),
            })
        }
        Command::Init {
            dir,
            listen,
            public_url,
            admin_listen,
            ecs_id,
        } => {
            let public_url = public_url.unwrap_or_else(|| format!("https://{listen}"));
            init::init(
                &dir,
                &init::InitOptions {
                    listen,
                    public_url,
                    admin_listen,
                    ecs_id,
                },
            )?;
            out!("wrote {}", dir.join("ecs.toml").display());
            Ok(())
        }
        Command::Token(TokenCmd::Mint {
            config,
            ees_id,
            prov_id,
            ttl,
            issuer,
        }) => {
            let cfg = load(&config)?;
            let name = token::minting_issuer(&cfg, issuer.as_deref()).map_err(usage)?;
            let t = token::mint(
                &cfg,
                &name,
                &token::MintRequest {
                    ees_id: &ees_id,
                    prov_id: prov_id.as_deref(),
                    ttl_secs: ttl.as_secs(),
                    now: crate::clock::now(),
                },
            )
            .map_err(usage)?;
            out!("{t}");
            Ok(())
        }
        Command::Ees(cmd) => run_ees(cmd).await,
        Command::Ceremony { config } => ceremony(&config),
        Command::Bench {
            config,
            target,
            url,
            ca,
            cfssl_profile,
            requests,
            concurrency,
            connections,
            duration,
            pid,
            format,
            prefill,
            prefill_revoked,
            ceiling,
        } => {
            let cfg = load(&config)?;
            if ceiling {
                let seconds = duration.map(|d| d.as_secs()).unwrap_or(3).max(1);
                let report = ceiling::run(&cfg, std::time::Duration::from_secs(seconds))
                    .await
                    .map_err(other)?;
                if format == Format::Json {
                    out!("{report}");
                } else {
                    out!("{}", ceiling::render_text(&report));
                }
                return Ok(());
            }
            if let Some(n) = prefill {
                let report = bench::prefill(&cfg, n, prefill_revoked)
                    .await
                    .map_err(other)?;
                out!("{report}");
                return Ok(());
            }
            let prefix = format!(
                "bench-{}",
                token::random_b64(6).to_lowercase().replace(['-', '_'], "x")
            );
            let (ees_ids, csrs) = bench::prepare(requests, &prefix).map_err(other)?;
            let tokens = if target == BenchTarget::Ecs {
                let name = token::minting_issuer(&cfg, None).map_err(usage)?;
                let now = crate::clock::now();
                ees_ids
                    .iter()
                    .map(|id| {
                        token::mint(
                            &cfg,
                            &name,
                            &token::MintRequest {
                                ees_id: id,
                                prov_id: None,
                                ttl_secs: 3600,
                                now,
                            },
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(other)?
            } else {
                Vec::new()
            };
            let ca =
                ca.unwrap_or_else(|| config.parent().unwrap_or(Path::new(".")).join("root.pem"));
            let roots_pem = std::fs::read(&ca).unwrap_or_default();
            let report = bench::run(bench::BenchArgs {
                target: if target == BenchTarget::Ecs {
                    bench::Target::Ecs
                } else {
                    bench::Target::Cfssl
                },
                url: url.unwrap_or_else(|| cfg.public_base().to_string()),
                roots_pem,
                tokens,
                ees_ids,
                csrs,
                concurrency: concurrency.max(1),
                connections: if connections == BenchConnections::Reuse {
                    bench::Connections::Reuse
                } else {
                    bench::Connections::New
                },
                duration: duration.map(|d| std::time::Duration::from_secs(d.as_secs())),
                cfssl_profile,
                server_pid: pid,
            })
            .await
            .map_err(other)?;
            if format == Format::Json {
                out!("{report}");
            } else {
                out!("{}", bench::render_text(&report).trim_end());
            }
            Ok(())
        }
        Command::Audit(cmd) => run_audit(cmd).await,
        Command::Store(cmd) => store_cmd::run(cmd).await,
        Command::Policy(PolicyCmd::Diff {
            config,
            proposed,
            format,
        }) => {
            let current = load(&config)?;
            let (new, _) = Config::load(&proposed).map_err(|e| usage(e.0))?;
            let own = diff::proposed_own_names(&new).map_err(usage)?;
            let (audit, _) = audit_log(&current).await?;
            let registrations = active_registrations(&current).await?;
            let now = crate::clock::now();
            let d = diff::diff(&current, &new, &own, &registrations, &audit, now).map_err(usage)?;
            if format == Format::Json {
                out!("{}", serde_json::to_string(&d).unwrap_or_default());
            } else {
                out!("{}", diff::render_text(&d).trim_end());
            }
            Ok(())
        }
        Command::Policy(PolicyCmd::Explain {
            config,
            domain,
            ees_id,
            token,
            token_issuer,
            cert,
            key_type,
            endpoint,
            at,
            format,
        }) => {
            let cfg = load(&config)?;
            let at = match at {
                Some(s) => {
                    time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
                        .map_err(|_| usage(format!("--at: {s:?} is not an RFC 3339 time")))?
                        .unix_timestamp()
                }
                None => crate::clock::now(),
            };
            let key_type: ecs_policy::KeyType =
                serde_json::from_value(json!(key_type)).map_err(|_| {
                    usage("--key-type: one of p256, p384, ed25519, rsa2048, rsa3072, rsa4096")
                })?;
            let chain_pem = match cert {
                Some(p) => Some(
                    std::fs::read_to_string(&p)
                        .map_err(|e| usage(format!("--cert: {}: {e}", p.display())))?,
                ),
                None => None,
            };
            let (_, v) = explain::explain(
                &cfg,
                &explain::Case {
                    domain,
                    ees_id,
                    token,
                    token_issuer,
                    chain_pem,
                    key_type,
                    endpoint,
                    at,
                },
            )
            .map_err(usage)?;
            if format == Format::Json {
                out!("{v}");
            } else {
                out!("{}", explain::render_text(&v).trim_end());
            }
            Ok(())
        }
        Command::Policy(PolicyCmd::Lint {
            config,
            positional,
            format,
        }) => {
            let config = config
                .or(positional)
                .ok_or_else(|| usage("policy lint: give --config CONFIG"))?;
            let (cfg_result, findings) = match Config::parse(&config) {
                Ok(cfg) => (Ok(()), cfg.validate(crate::clock::now())),
                Err(e) => (Err(e.0), Vec::new()),
            };
            let errors =
                findings.iter().any(|f| f.severity == Severity::Error) || cfg_result.is_err();
            if format == Format::Json {
                let mut items: Vec<Value> = findings
                    .iter()
                    .map(|f| json!({"severity": f.severity, "key": f.key, "message": f.message}))
                    .collect();
                if let Err(e) = &cfg_result {
                    items.push(json!({"severity": "error", "key": null, "message": e}));
                }
                out!("{}", json!({"findings": items}));
            } else {
                if let Err(e) = &cfg_result {
                    out!("error: {e}");
                }
                for f in &findings {
                    out!("{f}");
                }
                if findings.is_empty() && cfg_result.is_ok() {
                    out!("clean");
                }
            }
            if errors {
                Err(Fail(1, "the configuration has errors".into()))
            } else {
                Ok(())
            }
        }
    }
}

fn ceremony(path: &Path) -> Result<(), Fail> {
    use ecs_ca_backends::ceremony::{self, CeremonyConfig, Pins};
    let text = std::fs::read(path).map_err(|e| usage(format!("{}: {e}", path.display())))?;
    let hash = ecs_ca_backends::sha256_hex(&text);
    let text =
        String::from_utf8(text).map_err(|_| usage(format!("{}: not UTF-8", path.display())))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let cfg = CeremonyConfig::parse(&text, base)
        .map_err(|e| usage(format!("{}: {e}", path.display())))?;
    let resolve = |spec: &Option<String>,
                   key: &str|
     -> Result<Option<ecs_ca_backends::pkcs11::AuthPin>, Fail> {
        match spec {
            Some(s) => crate::secrets::resolve(s, key, base)
                .map(|p| Some(p.as_str().into()))
                .map_err(|e| usage(format!("{}: {e}", path.display()))),
            None => Ok(None),
        }
    };
    let pins = Pins {
        hsm: resolve(&cfg.generate().map(|g| g.pin.clone()), "hsm.pin")?,
        issuer: resolve(&cfg.issuer().map(|i| i.pin.clone()), "issuer.pin")?,
    };
    match ceremony::run(&cfg, &pins, &hash) {
        Ok(t) => {
            out!("{}", t.summary().trim_end());
            Ok(())
        }
        Err(ecs_ca_backends::Error::Config(m)) => Err(usage(format!("{}: {m}", path.display()))),
        Err(e) => Err(other(format!("{}: {e}", path.display()))),
    }
}

async fn run_ees(cmd: EesCmd) -> Result<(), Fail> {
    let print = |v: &Value| out!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    match cmd {
        EesCmd::Register {
            url,
            ca,
            token,
            token_file,
            ees_id,
            prov_id,
            fqdn,
            ipv4,
            ipv6,
            uri,
            exp_time,
            secret_token,
            out,
            force,
        } => {
            // A live registration's key is never overwritten by accident.
            if !force && out.join("key.pem").exists() {
                return Err(usage(format!(
                    "--out {}: holds an EES key (key.pem); choose another folder, or --force \
                     to replace it",
                    out.display()
                )));
            }
            let token = match (token, token_file) {
                (Some(t), _) => t,
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .map_err(|e| usage(format!("--token-file: {}: {e}", f.display())))?
                    .trim()
                    .to_string(),
                (None, None) => return Err(usage("--token or --token-file is required")),
            };
            let endpoint = if let Some(f) = fqdn {
                json!({"fqdn": f})
            } else if !ipv4.is_empty() {
                json!({"ipv4Addrs": ipv4})
            } else if !ipv6.is_empty() {
                json!({"ipv6Addrs": ipv6})
            } else if let Some(u) = uri {
                json!({"uri": u})
            } else if ecs_policy::is_fqdn(&ees_id) {
                json!({"fqdn": ees_id})
            } else {
                return Err(usage(
                    "the EES ID is not an FQDN: give --fqdn, --ipv4, --ipv6 or --uri",
                ));
            };
            let state = ees::register(ees::RegisterArgs {
                url,
                ca,
                token,
                ees_id,
                prov_id,
                endpoint,
                exp_time,
                secret_token,
                out: out.clone(),
            })
            .await
            .map_err(other)?;
            out!(
                "registered {}",
                state["registrationId"].as_str().unwrap_or("")
            );
            out!("location   {}", state["location"].as_str().unwrap_or(""));
            out!("expires    {}", state["expTime"].as_str().unwrap_or(""));
            out!(
                "saved      {}/{{key,cert,chain,ca}}.pem, registration.json",
                out.display()
            );
            Ok(())
        }
        EesCmd::Show(d) => ees::show(&d.dir).await.map(|v| print(&v)).map_err(other),
        EesCmd::Update { dir, exp_time } => ees::update(&dir.dir, exp_time)
            .await
            .map(|v| print(&json!({"expTime": v["expTime"]})))
            .map_err(other),
        EesCmd::Rekey {
            dir,
            with_secret_token,
        } => ees::rekey(&dir.dir, with_secret_token)
            .await
            .map(|v| {
                print(&json!({
                    "certExpTime": v["onboarding"]["certExpTime"],
                    "certFingerprint": v["onboarding"]["authInfo"]["certFingerprint"],
                }))
            })
            .map_err(other),
        EesCmd::Deregister(d) => ees::deregister(&d.dir)
            .await
            .map(|_| out!("deregistered"))
            .map_err(other),
    }
}

/// Where a command reads the store: the store itself when no daemon holds it, the running
/// daemon's control socket when one does (an embedded store admits one process). A store
/// that does not exist is refused.
enum StoreAccess {
    Direct(std::sync::Arc<dyn crate::store::Store>),
    Daemon {
        socket: PathBuf,
        /// Why the store could not be opened, for the error should the socket fail too.
        open_err: String,
    },
}

impl StoreAccess {
    async fn open(cfg: &Config) -> Result<Self, Fail> {
        // A wrong storage.path is not an empty store: saying "0 records, intact" there
        // would vouch for nothing. (A database server is read directly, while replicas run.)
        let key = cfg.storage.location_key();
        if cfg.storage.kind.embedded() && !cfg.storage.path.exists() {
            return Err(usage(format!(
                "storage.path {}: no store there; give the daemon's configuration (a new ECS \
                 has its store once it has started)",
                cfg.storage.path.display()
            )));
        }
        match store::open(&cfg.storage).await {
            Ok(s) => Ok(StoreAccess::Direct(s)),
            Err(e @ store::StoreError::Locked(_)) => Ok(StoreAccess::Daemon {
                socket: cfg.admin_socket_path(),
                open_err: e.to_string(),
            }),
            // A damaged store, or another engine's: asking a daemon would not help.
            Err(e) => Err(other(format!("{key}: {e}"))),
        }
    }

    /// Every page of a dump of the control socket: `path(cursor)` for each page, `next` the
    /// cursor of the next one from an answer (none: the last page).
    async fn pages(
        socket: &Path,
        open_err: &str,
        path: impl Fn(Option<&Value>) -> String,
        mut each: impl FnMut(&Value) -> Result<(), String>,
        next: impl Fn(&Value) -> Option<Value>,
    ) -> Result<(), Fail> {
        let fail = |e: String| {
            other(format!(
                "storage.path: {open_err}; control socket {}: {e}",
                socket.display()
            ))
        };
        let mut cursor: Option<Value> = None;
        loop {
            let v = control_get(socket, &path(cursor.as_ref()))
                .await
                .map_err(fail)?;
            each(&v).map_err(fail)?;
            match next(&v) {
                Some(c) => cursor = Some(c),
                None => return Ok(()),
            }
        }
    }

    /// The audit log and its head.
    async fn audit_log(&self) -> Result<(Vec<AuditRecord>, (u64, String)), Fail> {
        match self {
            StoreAccess::Direct(s) => {
                let records = store::all_audit_records(s.as_ref())
                    .await
                    .map_err(|e| other(e.to_string()))?;
                let head = s.audit_head().await.map_err(|e| other(e.to_string()))?;
                Ok((records, head))
            }
            StoreAccess::Daemon { socket, open_err } => {
                let mut records: Vec<AuditRecord> = Vec::new();
                let mut head = (0, String::new());
                Self::pages(
                    socket,
                    open_err,
                    |from| {
                        let from = from.and_then(Value::as_u64).unwrap_or(1);
                        format!("/admin/v1/audit/records?from={from}")
                    },
                    |v| {
                        let page: Vec<AuditRecord> = serde_json::from_value(v["records"].clone())
                            .map_err(|e| e.to_string())?;
                        records.extend(page);
                        head = (
                            v["head"]["seq"].as_u64().unwrap_or(0),
                            v["head"]["hash"].as_str().unwrap_or_default().to_string(),
                        );
                        Ok(())
                    },
                    |v| v["next"].as_u64().map(Value::from),
                )
                .await?;
                Ok((records, head))
            }
        }
    }

    /// Active registrations with their certificates.
    async fn active_registrations(
        &self,
    ) -> Result<Vec<(crate::store::RegistrationRecord, crate::store::CertRecord)>, Fail> {
        match self {
            StoreAccess::Direct(s) => store::all_active_registrations(s.as_ref())
                .await
                .map_err(|e| other(e.to_string())),
            StoreAccess::Daemon { socket, open_err } => {
                let mut out = Vec::new();
                Self::pages(
                    socket,
                    open_err,
                    |after| match after.and_then(Value::as_str) {
                        Some(a) => format!("/admin/v1/registrations?after={a}"),
                        None => "/admin/v1/registrations".to_string(),
                    },
                    |v| {
                        for item in v["registrations"].as_array().into_iter().flatten() {
                            out.push((
                                serde_json::from_value(item["registration"].clone())
                                    .map_err(|e| e.to_string())?,
                                serde_json::from_value(item["cert"].clone())
                                    .map_err(|e| e.to_string())?,
                            ));
                        }
                        Ok(())
                    },
                    |v| v["next"].as_str().map(Value::from),
                )
                .await?;
                Ok(out)
            }
        }
    }
}

/// Reads the audit log, wherever it is.
async fn audit_log(cfg: &Config) -> Result<(Vec<AuditRecord>, (u64, String)), Fail> {
    StoreAccess::open(cfg).await?.audit_log().await
}

/// Active registrations with their certificates, wherever they are.
async fn active_registrations(
    cfg: &Config,
) -> Result<Vec<(crate::store::RegistrationRecord, crate::store::CertRecord)>, Fail> {
    StoreAccess::open(cfg).await?.active_registrations().await
}

/// A GET on the daemon's control socket: the response, its body still to be read.
async fn control_request(
    socket: &Path,
    path: &str,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| e.to_string())?;
    let mut conn = crate::client::Connection::over(
        stream,
        crate::client::HttpVersion::Http1,
        "ecsd".into(),
        None,
    )
    .await
    .map_err(|e| e.0)?;
    let resp = conn
        .send_streamed("GET", path, &[], None)
        .await
        .map_err(|e| e.0)?;
    if !resp.status().is_success() {
        return Err(format!("{path}: HTTP {}", resp.status()));
    }
    Ok(resp)
}

/// A GET on the daemon's control socket, answered as JSON.
async fn control_get(socket: &Path, path: &str) -> Result<Value, String> {
    use http_body_util::BodyExt;
    let body = control_request(socket, path)
        .await?
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

/// A GET on the daemon's control socket whose body is streamed into `out`.
async fn control_download(
    socket: &Path,
    path: &str,
    out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
) -> Result<(), String> {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    let mut body = control_request(socket, path).await?.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Some(data) = frame.data_ref() {
            out.write_all(data).await.map_err(|e| e.to_string())?;
        }
    }
    out.flush().await.map_err(|e| e.to_string())
}

async fn run_audit(cmd: AuditCmd) -> Result<(), Fail> {
    match cmd {
        AuditCmd::Verify { config, format } => {
            let cfg = load(&config)?;
            let (records, head) = audit_log(&cfg).await?;
            let n = verify_chain(&records, (head.0, &head.1)).map_err(|b| {
                other(format!(
                    "audit log broken at record {}: {}",
                    b.seq, b.reason
                ))
            })?;
            // The chain in the store must extend every signed checkpoint kept outside it.
            let checkpoints = match &cfg.audit.checkpoint_key {
                Some(key) => {
                    use crate::audit::checkpoint;
                    let spki = checkpoint::verifying_key(key).map_err(usage)?;
                    let log = checkpoint::read_log(&cfg.audit.checkpoint_log).map_err(other)?;
                    let k = checkpoint::verify(&records, &log, &spki)
                        .map_err(|e| other(format!("audit log broken at {e}")))?;
                    Some(k)
                }
                None => None,
            };
            if format == Format::Json {
                out!(
                    "{}",
                    json!({"intact": true, "records": n, "head": head.1, "checkpoints": checkpoints})
                );
            } else {
                let checkpoints = match checkpoints {
                    Some(k) => format!(", extends {k} signed checkpoints"),
                    None => ", no checkpoints configured (audit.checkpoint_key)".into(),
                };
                out!(
                    "audit log intact: {n} records, head {}{checkpoints}",
                    head.1
                );
            }
            Ok(())
        }
        AuditCmd::Export {
            config,
            since,
            format,
        } => {
            let cfg = load(&config)?;
            let since = match since {
                Some(s) => Some(
                    time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
                        .map_err(|_| usage(format!("--since: {s:?} is not an RFC 3339 time")))?,
                ),
                None => None,
            };
            let (records, _) = audit_log(&cfg).await?;
            for r in records {
                if let Some(s) = since {
                    let t = time::OffsetDateTime::parse(
                        &r.event.time,
                        &time::format_description::well_known::Rfc3339,
                    );
                    if t.is_ok_and(|t| t < s) {
                        continue;
                    }
                }
                if format == Format::Json {
                    out!("{}", serde_json::to_string(&r).unwrap_or_default());
                } else {
                    let e = &r.event;
                    out!(
                        "{:>6} {} {:<10} {:<8} {:>3} {:<24} ees={} reg={} client={}",
                        r.seq,
                        e.time,
                        e.action,
                        e.outcome,
                        e.status,
                        e.cause.as_deref().unwrap_or("-"),
                        e.ees_id.as_deref().unwrap_or("-"),
                        e.registration_id.as_deref().unwrap_or("-"),
                        e.client,
                    );
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod help_tests {
    use super::*;
    use clap::CommandFactory;

    fn missing(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if id == "help" || id == "version" || a.is_hide_set() {
                continue;
            }
            if a.get_help().is_none() && a.get_long_help().is_none() {
                out.push(format!("{path} --{id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            missing(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_flag_has_help_text() {
        let mut out = Vec::new();
        missing(&Cli::command(), "ecsd", &mut out);
        assert!(
            out.is_empty(),
            "flags without --help text:\n{}",
            out.join("\n")
        );
    }
}
