//! The store as an ECSP runs it: backup while serving, restore, moving from sled to SQLite,
//! a full disk and a damaged file, against a real `ecsd`.

mod common;

use common::*;
use std::path::Path;

fn run(args: &[&str], config: &Path) -> (bool, String) {
    output(ecsd().args(args).arg("--config").arg(config))
}

fn backup(config: &Path, out: &Path) -> (bool, String) {
    let mut args = vec!["store", "backup", "--out"];
    args.push(out.to_str().unwrap());
    run(&args, config)
}

fn restore(config: &Path, from: &Path) -> (bool, String) {
    let mut args = vec!["store", "restore", "--from"];
    args.push(from.to_str().unwrap());
    run(&args, config)
}

async fn served(ecs: &Ecs, all: &[Ees]) {
    for e in all {
        let r = ecs
            .client_as(e)
            .request("GET", &e.location, &[], None)
            .await
            .unwrap();
        assert_eq!(
            r.status,
            200,
            "{} not served: {}",
            e.id,
            String::from_utf8_lossy(&r.body)
        );
    }
}

fn remove_store(ecs: &Ecs, name: &str) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(ecs.dir.path().join(format!("data/{name}{suffix}")));
    }
}

#[tokio::test]
async fn a_backup_taken_while_registering_restores_into_a_fresh_store_that_serves_everything() {
    let mut ecs = Ecs::start();
    let mut first = Vec::new();
    for i in 0..5 {
        first.push(ecs.register(&format!("ees-bk-{i}.ecsp.example")).await);
    }
    // A backup through the running daemon (it holds the store) while registrations go on.
    let dir = tempfile::tempdir().unwrap();
    let during = dir.path().join("during.jsonl");
    let (config, during_path) = (ecs.config_path(), during.clone());
    let taking = tokio::task::spawn_blocking(move || backup(&config, &during_path));
    let mut more = Vec::new();
    for i in 0..10 {
        more.push(ecs.register(&format!("ees-bk-more-{i}.ecsp.example")).await);
    }
    let (ok, out) = taking.await.unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("registrations"), "{out}");

    let after = dir.path().join("after.jsonl");
    let (ok, out) = backup(&ecs.config_path(), &after);
    assert!(ok, "{out}");
    assert!(out.contains("15 registrations"), "{out}");
    // A backup never overwrites a file.
    let (ok, out) = backup(&ecs.config_path(), &after);
    assert!(!ok && out.contains("exists"), "{out}");

    assert!(ecs.terminate().success());
    // Into a store that holds something: refused.
    let (ok, out) = restore(&ecs.config_path(), &after);
    assert!(!ok && out.contains("not empty"), "{out}");

    // The disk is lost; the backup comes back.
    remove_store(&ecs, "ecs.db");
    // A tampered backup is refused and leaves no store.
    let tampered = dir.path().join("tampered.jsonl");
    let text = std::fs::read_to_string(&after).unwrap();
    std::fs::write(&tampered, text.replacen("ees-bk-3", "ees-bk-x", 1)).unwrap();
    let (ok, out) = restore(&ecs.config_path(), &tampered);
    assert!(!ok && out.contains("altered"), "{out}");
    assert!(!ecs.dir.path().join("data/ecs.db").exists());

    let (ok, out) = restore(&ecs.config_path(), &after);
    assert!(ok, "{out}");
    ecs.restart();
    served(&ecs, &first).await;
    served(&ecs, &more).await;
    let (intact, records) = ecs.audit();
    assert!(intact, "audit chain broken after restore");
    assert!(records.len() >= 15);
    // The restored store spent the tokens it had spent, and holds the EES IDs it held.
    let r = ecs
        .post(
            Some(&ecs.token("ees-bk-0.ecsp.example")),
            &registration_body(
                "ees-bk-0.ecsp.example",
                &Key::new().csr("ees-bk-0.ecsp.example"),
            ),
        )
        .await;
    assert_problem(&r, 403, "EES_ALREADY_REGISTERED");
}

/// A store made by the previous release (sled) moves to SQLite with the documented commands
/// and serves its registrations.
#[tokio::test]
async fn a_sled_store_moves_to_sqlite_by_backup_and_restore() {
    let mut ecs = Ecs::start_with(|text| {
        *text = text.replace(
            "kind = \"sqlite\"\npath = \"data/ecs.db\"",
            "kind = \"sled\"\npath = \"data/ecs.sled\"",
        );
    });
    let mut all = Vec::new();
    for i in 0..4 {
        all.push(ecs.register(&format!("ees-sled-{i}.ecsp.example")).await);
    }
    assert!(ecs.terminate().success());
    assert!(ecs.dir.path().join("data/ecs.sled").is_dir());

    // The upgrade: the old config without a kind now means SQLite, and says what to do.
    let cfg = ecs.config_path();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(
            "kind = \"sled\"\npath = \"data/ecs.sled\"",
            "path = \"data/ecs.sled\"",
        ),
    )
    .unwrap();
    let (ok, out) = run(&["audit", "verify"], &cfg);
    assert!(!ok && out.contains("storage.kind = \"sled\""), "{out}");

    std::fs::write(&cfg, &text).unwrap();
    let file = ecs.dir.path().join("sled-backup.jsonl");
    let (ok, out) = backup(&cfg, &file);
    assert!(ok, "{out}");
    std::fs::write(
        &cfg,
        text.replace(
            "kind = \"sled\"\npath = \"data/ecs.sled\"",
            "kind = \"sqlite\"\npath = \"data/ecs.db\"",
        ),
    )
    .unwrap();
    let (ok, out) = restore(&cfg, &file);
    assert!(ok, "{out}");
    assert!(out.contains("(sqlite)"), "{out}");
    ecs.restart();
    served(&ecs, &all).await;
    let (intact, _) = ecs.audit();
    assert!(intact);
}

/// A store file that is not a database stops the start with one line naming the file and
/// what to do.
#[tokio::test]
async fn a_damaged_store_file_stops_the_start_with_one_line_saying_what_to_do() {
    let mut ecs = Ecs::start();
    ecs.register("ees-damaged.ecsp.example").await;
    assert!(ecs.terminate().success());
    remove_store(&ecs, "ecs.db");
    std::fs::write(ecs.dir.path().join("data/ecs.db"), vec![0x5a; 8192]).unwrap();
    let out = ecsd()
        .args(["serve", "--config"])
        .arg(ecs.config_path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().last().unwrap_or_default();
    assert!(
        line.contains("data/ecs.db") && line.contains("ecsd store restore"),
        "{err}"
    );
}

/// A small tmpfs, unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }

    fn free_bytes(&self) -> u64 {
        let st = rustix::fs::statvfs(self.0.path()).unwrap();
        st.f_bavail * st.f_frsize
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// A full disk: 503 STORAGE_UNAVAILABLE with Retry-After, nothing half-written, and serving
/// again once space is freed, without a restart.
#[tokio::test]
async fn a_full_disk_answers_503_and_recovers_when_space_is_freed() {
    if !running_as_root() {
        eprintln!("skipped: mounting a small file system needs root");
        return;
    }
    let Some(disk) = Tmpfs::mount("16m") else {
        eprintln!("skipped: this machine does not let the test mount a tmpfs");
        return;
    };
    let db = disk.0.path().join("ecs.db");
    let db_text = db.display().to_string();
    let mut ecs = Ecs::start_with(|text| {
        *text = text.replace("path = \"data/ecs.db\"", &format!("path = \"{db_text}\""));
    });
    let mut acked = vec![ecs.register("ees-disk-0.ecsp.example").await];
    // Leave the store about 64 KiB.
    let filler = disk.0.path().join("filler");
    let room = disk.free_bytes().saturating_sub(64 << 10);
    std::fs::write(&filler, vec![0u8; room as usize]).unwrap();

    let mut refused = None;
    for i in 1..200 {
        let ees_id = format!("ees-disk-{i}.ecsp.example");
        let key = Key::new();
        let r = ecs
            .post(
                Some(&ecs.token(&ees_id)),
                &registration_body(&ees_id, &key.csr(&ees_id)),
            )
            .await;
        if r.status == 201 {
            acked.push(Ees::from_response(&r, key));
            continue;
        }
        assert_problem(&r, 503, "STORAGE_UNAVAILABLE");
        assert!(r.header("retry-after").is_some(), "no Retry-After");
        refused = Some(ees_id);
        break;
    }
    let refused = refused.expect("the disk never filled");

    // Space comes back; the same daemon serves again.
    std::fs::remove_file(&filler).unwrap();
    let mut again = None;
    for _ in 0..20 {
        let key = Key::new();
        let r = ecs
            .post(
                Some(&ecs.token(&refused)),
                &registration_body(&refused, &key.csr(&refused)),
            )
            .await;
        if r.status == 201 {
            again = Some(Ees::from_response(&r, key));
            break;
        }
        assert_problem(&r, 503, "STORAGE_UNAVAILABLE");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    acked.push(again.expect("no recovery after space was freed"));
    served(&ecs, &acked).await;
    let (intact, records) = ecs.audit();
    assert!(intact, "audit chain broken by the full disk");
    let registered = records
        .iter()
        .filter(|r| r["action"] == "register" && r["outcome"] == "accepted")
        .count();
    assert_eq!(
        registered,
        acked.len(),
        "a refused registration left a record"
    );
    assert!(ecs.terminate().success());
}

/// A backup whose reader goes away mid-way gives its snapshot back. With sled the snapshot
/// holds the commit lock, so a backup left hanging would stop every registration.
#[tokio::test]
async fn a_backup_reader_that_goes_away_releases_the_store() {
    let mut ecs = Ecs::start_with(|text| {
        *text = text.replace(
            "kind = \"sqlite\"\npath = \"data/ecs.db\"",
            "kind = \"sled\"\npath = \"data/ecs.sled\"",
        );
    });
    assert!(ecs.terminate().success());
    // Enough registrations that the backup outgrows every buffer between store and socket.
    let (ok, out) = run(&["bench", "--prefill", "1500"], &ecs.config_path());
    assert!(ok, "{out}");
    ecs.restart();
    {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(ecs.control_socket()).unwrap();
        s.write_all(b"GET /admin/v1/store/backup HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let mut first = [0u8; 4096];
        let n = s.read(&mut first).unwrap();
        assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    }
    let registered = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        ecs.register("ees-after-backup.ecsp.example"),
    )
    .await;
    assert!(
        registered.is_ok(),
        "registrations wait on a backup that nobody reads"
    );
}
