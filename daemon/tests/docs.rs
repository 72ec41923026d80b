//! The documentation stands alone and is complete: every cause the API can answer with is
//! in docs/api.md, every configuration key in docs/operations.md, and no link of README.md
//! or docs/ leads outside the repository (or to a file that is not there).

mod common;

use common::*;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap()
}

#[test]
fn every_cause_is_in_the_api_reference() {
    let api = read("docs/api.md");
    for cause in ecs_daemon::problem::Cause::ALL {
        assert!(
            api.contains(&format!("`{}`", cause.code())),
            "docs/api.md does not name {}",
            cause.code()
        );
    }
}

#[test]
fn every_configuration_key_is_in_the_operations_guide() {
    let d = initialised();
    let cfg = serde_json::to_value(d.config()).unwrap();
    let ops = read("docs/operations.md");
    let mut checked = 0;
    for section in ["server", "storage", "limits", "audit"] {
        for key in cfg[section].as_object().unwrap().keys() {
            let name = format!("`{section}.{key}`");
            assert!(
                ops.contains(&name) || ops.contains(&format!("`{section}.{key},")),
                "docs/operations.md does not describe {name}"
            );
            checked += 1;
        }
    }
    for key in ["url", "password", "tls_ca", "pool_size"] {
        assert!(ops.contains(&format!("`storage.{key}`")), "storage.{key}");
    }
    assert!(checked > 30, "{checked}");
}

#[test]
fn no_link_leaves_the_repository() {
    let mut files = vec![repo().join("README.md")];
    for e in std::fs::read_dir(repo().join("docs")).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "md") {
            files.push(e.path());
        }
    }
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains("../shared") && !text.contains("contract/"),
            "{} points at the project workspace",
            file.display()
        );
        // Markdown links: ](target)
        for (i, _) in text.match_indices("](") {
            let target: String = text[i + 2..].chars().take_while(|c| *c != ')').collect();
            if target.starts_with("http")
                || target.starts_with('#')
                || target.starts_with("mailto:")
            {
                continue;
            }
            let path = target.split('#').next().unwrap();
            let resolved = file.parent().unwrap().join(path);
            assert!(
                resolved.exists(),
                "{}: link to {target}, which is not in the repository",
                file.display()
            );
            let canonical = resolved.canonicalize().unwrap();
            assert!(
                canonical.starts_with(repo().canonicalize().unwrap()),
                "{}: link to {target} leaves the repository",
                file.display()
            );
        }
    }
}
