//! Replays, through the fuzz targets' entry points, every input the fuzzers kept
//! (`fuzz/seeds/<target>/`) and every input that once crashed one (`fuzz/regressions/
//! <target>/`): a parser that panics again fails here, in every ./scripts/test run,
//! without a nightly toolchain.
//!
//! `cargo test -p ecs-daemon --test fuzz_regressions -- --ignored write_seeds` writes the
//! hand-made seeds (valid inputs of each kind) that `scripts/fuzz` starts from.

use ecs_ca_backends::fuzzing as ca;
use ecs_daemon::fuzzing as daemon;
use serde_json::json;
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Feeds every kept input of `target` to `entry`; returns how many there were.
fn replay(target: &str, entry: fn(&[u8])) -> usize {
    let mut n = 0;
    for kind in ["seeds", "regressions"] {
        let Ok(dir) = std::fs::read_dir(fuzz_dir().join(kind).join(target)) else {
            continue;
        };
        for f in dir {
            let path = f.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let shown = path.display().to_string();
            if std::panic::catch_unwind(|| entry(&data)).is_err() {
                panic!("{target} panics on {shown}");
            }
            n += 1;
        }
    }
    n
}

macro_rules! replays {
    ($($name:ident => $entry:path),* $(,)?) => {$(
        #[test]
        fn $name() {
            let n = replay(stringify!($name), $entry);
            assert!(n > 0, "no kept inputs for {}", stringify!($name));
        }
    )*};
}

replays! {
    registration_body => daemon::registration_body,
    merge_patch => daemon::merge_patch,
    token => daemon::token,
    config_file => daemon::config_file,
    csr => ca::csr,
    certificate_chain => ca::certificate_chain,
    cfssl_answer => ca::cfssl_answer,
    ceremony_file => ca::ceremony_file,
}

#[test]
#[ignore = "writes the seed corpus into fuzz/seeds; run by hand"]
fn write_seeds() {
    use ecs_ca_backends::{SoftwareKey, build_csr, generate_p256_pkcs8_pem};
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = fuzz_dir().join("seeds").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    };
    let key = SoftwareKey::from_pkcs8_pem(&generate_p256_pkcs8_pem().unwrap()).unwrap();
    let csr = build_csr(&key, "ees-1.ecsp.example").unwrap();

    write("csr", "pem", csr.as_bytes());
    write(
        "csr",
        "der",
        &ecs_ca_backends::pem_to_der(&csr, "CERTIFICATE REQUEST").unwrap(),
    );

    let body = json!({
        "eesProf": {
            "eesId": "ees-1.ecsp.example",
            "endPt": { "fqdn": "ees-1.ecsp.example", "ipv4Addrs": ["192.0.2.1"],
                       "ipv6Addrs": ["2001:db8::1"], "uri": "https://ees-1.ecsp.example/api" },
            "eecRegConf": false,
            "provId": "prov-1",
        },
        "expTime": "2026-12-27T00:00:00Z",
        "suppFeat": "0f",
        "onboarding": { "csr": csr, "thirdPartyCert": false, "secretToken": true },
    });
    write("registration_body", "full", body.to_string().as_bytes());
    let minimal = json!({
        "eesProf": { "eesId": "e", "endPt": { "fqdn": "e.example" }, "eecRegConf": true },
        "onboarding": { "thirdPartyCert": true },
    });
    write(
        "registration_body",
        "third-party",
        minimal.to_string().as_bytes(),
    );

    write(
        "merge_patch",
        "exp",
        br#"{"expTime":"2026-12-01T00:00:00Z"}"#,
    );
    write(
        "merge_patch",
        "endpoint",
        br#"{"eesProf":{"endPt":{"ipv4Addrs":null,"fqdn":"ees-2.ecsp.example"}}}"#,
    );

    for (i, seed) in daemon::token_seeds().iter().enumerate() {
        write("token", &format!("seed-{i}"), seed);
    }

    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    for name in ["ecs.toml", "ecs-proposed.toml"] {
        write(
            "config_file",
            name,
            &std::fs::read(docs.join("examples").join(name)).unwrap(),
        );
    }
    let init = tempfile::tempdir().unwrap();
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_ecsd"))
        .args(["init", "--dir"])
        .arg(init.path())
        .status()
        .unwrap();
    assert!(ok.success());
    write(
        "config_file",
        "init.toml",
        &std::fs::read(init.path().join("ecs.toml")).unwrap(),
    );

    let guide = std::fs::read_to_string(docs.join("key-ceremony.md")).unwrap();
    for (i, block) in guide.split("```toml\n").skip(1).enumerate() {
        let block = block.split("```").next().unwrap();
        write("ceremony_file", &format!("guide-{i}"), block.as_bytes());
    }

    write("certificate_chain", "leaf-and-ca", &ca::chain_seed());
    write("cfssl_answer", "ok", ca::cfssl_seed_answer().as_bytes());
    write(
        "cfssl_answer",
        "refused",
        br#"{"success":false,"result":null,"errors":[{"code":1000,"message":"bad"}],"messages":[]}"#,
    );
}
