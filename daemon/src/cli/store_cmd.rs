//! `ecsd store backup` and `ecsd store restore`.

use super::out;
use super::{Fail, StoreAccess, load, other, usage};
use crate::store::backup;
use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum StoreCmd {
    /// Write a consistent copy of the whole store (registrations, certificates, spent token
    /// IDs, CRL numbers, audit log) to a new file, whether the daemon runs or not.
    Backup {
        /// The configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// The backup file to write; it must not exist yet.
        #[arg(long)]
        out: PathBuf,
    },
    /// Load a backup into the empty store of CONFIG, of any kind (also the way from one
    /// engine to another); refuses a store that holds anything, and a damaged backup.
    Restore {
        /// The configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// The backup file, as `store backup` wrote it.
        #[arg(long)]
        from: PathBuf,
    },
}

pub async fn run(cmd: StoreCmd) -> Result<(), Fail> {
    match cmd {
        StoreCmd::Backup { config, out } => {
            let cfg = load(&config)?;
            if out.exists() {
                return Err(usage(format!(
                    "--out {}: the file exists; a backup never overwrites one",
                    out.display()
                )));
            }
            let partial = partial_path(&out);
            let written = write_backup(&cfg, &partial).await;
            let checked = written.and_then(|()| backup::verify(&partial).map_err(other));
            match checked {
                Ok((counts, _)) => {
                    std::fs::rename(&partial, &out)
                        .map_err(|e| other(format!("{}: {e}", out.display())))?;
                    out!("backup {}: {counts}", out.display());
                    Ok(())
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&partial);
                    Err(e)
                }
            }
        }
        StoreCmd::Restore { config, from } => {
            let cfg = load(&config)?;
            if !from.is_file() {
                return Err(usage(format!("--from {}: no such file", from.display())));
            }
            let counts = crate::store::restore_into(&cfg.storage, &from)
                .await
                .map_err(other)?;
            out!(
                "restored into {} ({}): {counts}",
                cfg.storage.location(),
                cfg.storage.kind.name()
            );
            Ok(())
        }
    }
}

/// Where the backup is written until it is complete and checked.
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

async fn write_backup(cfg: &crate::config::Config, to: &Path) -> Result<(), Fail> {
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .await
        .map_err(|e| other(format!("{}: {e}", to.display())))?;
    match StoreAccess::open(cfg).await? {
        StoreAccess::Direct(store) => {
            backup::write(store.as_ref(), cfg.storage.kind.name(), &mut file)
                .await
                .map_err(other)?;
            file.sync_all().await.map_err(|e| other(e.to_string()))
        }
        StoreAccess::Daemon { socket, open_err } => {
            super::control_download(&socket, "/admin/v1/store/backup", &mut file)
                .await
                .map_err(|e| {
                    other(format!(
                        "storage.path: {open_err}; control socket {}: {e}",
                        socket.display()
                    ))
                })?;
            file.sync_all().await.map_err(|e| other(e.to_string()))
        }
    }
}
