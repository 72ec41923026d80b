//! `ecsd`: process set-up (arguments, logging, hardening, runtime), then `cli::run`.

use clap::Parser;
use ecs_daemon::cli::{Cli, Command, Fail, LogFormat, run};
use std::io::IsTerminal;
use std::process::ExitCode;

// A registration allocates and frees a few hundred small buffers across threads (TLS
// records, JSON, DER, the audit event); glibc's malloc spent about 10 % of the daemon's CPU
// on them. Without transparent huge pages, mimalloc's peak RSS at 256 connections stays
// within the budget (51 MiB where glibc had 43; with them, 86).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve { .. });
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| if serving { "info" } else { "warn" }.into());
    // Colour only for a person at a terminal: never into files, pipes or journald.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_ansi(colour);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    // Before any key, PIN or token is read: none of them may reach a core dump.
    if let Err(e) = ecs_daemon::hardening::forbid_core_dumps() {
        eprintln!("ecsd: {e}");
        return ExitCode::from(1);
    }
    ecs_daemon::hardening::private_files();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ecsd: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            eprintln!("ecsd: {}", msg.replace('\n', " "));
            ExitCode::from(code)
        }
    }
}
