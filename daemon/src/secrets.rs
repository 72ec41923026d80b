//! Secrets named in configuration files: `env:NAME` or `file:PATH`, never the value itself.

use std::path::Path;
use zeroize::Zeroizing;

/// Resolves `spec` for configuration key `key`. A file must not be readable by group or
/// others. The value never appears in an error, and is wiped from memory when dropped.
pub fn resolve(spec: &str, key: &str, base: &Path) -> Result<Zeroizing<String>, String> {
    if let Some(name) = spec.strip_prefix("env:") {
        return std::env::var(name)
            .map(Zeroizing::new)
            .map_err(|_| format!("{key}: environment variable {name} is not set"));
    }
    if let Some(path) = spec.strip_prefix("file:") {
        let p = base.join(path);
        check_private(&p, key)?;
        let text = Zeroizing::new(
            crate::files::read_to_string(&p).map_err(|e| format!("{key}: {}: {e}", p.display()))?,
        );
        return Ok(Zeroizing::new(
            text.trim_end_matches(['\n', '\r']).to_string(),
        ));
    }
    Err(format!(
        "{key}: give env:NAME or file:PATH, never the secret itself"
    ))
}

/// Refuses a private-key file that group or others may read.
pub fn check_private(path: &Path, key: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{key}: {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "{key}: {} is readable by group or others; chmod 600 it",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn files_must_be_private_and_literals_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pin");
        std::fs::write(&f, "1234\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = resolve("file:pin", "backends.hsm.pin", dir.path()).unwrap_err();
        assert!(
            err.contains("readable by group or others") && !err.contains("1234"),
            "{err}"
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            resolve("file:pin", "k", dir.path()).unwrap().as_str(),
            "1234"
        );
        let err = resolve("1234", "backends.hsm.pin", dir.path()).unwrap_err();
        assert!(!err.contains("1234"), "{err}");
        assert!(resolve("env:ECS_TEST_SURELY_UNSET_VAR", "k", dir.path()).is_err());
    }
}
