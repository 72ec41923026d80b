//! Process hardening applied before any key, PIN or token is read.

use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};

/// Makes every file and folder this process creates private to its user (umask 077): the
/// store, its backups, and everything `ecsd init` writes (keys, configuration, certificates)
/// are never readable by group or others, whatever umask the process was started with.
pub fn private_files() {
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o077));
}

/// Keeps secrets out of core dumps and away from same-user debuggers: the core-file limit
/// is set to zero, so that even with `fs.suid_dumpable = 2` the kernel writes no core, and
/// the process is made non-dumpable (`PR_SET_DUMPABLE` 0), which also makes
/// `/proc/<pid>/mem` and ptrace attach root-only.
pub fn forbid_core_dumps() -> Result<(), String> {
    let none = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    setrlimit(Resource::Core, none)
        .map_err(|e| format!("cannot set the core-file limit to 0: {e}"))?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable)
        .map_err(|e| format!("cannot make the process non-dumpable: {e}"))
}

#[cfg(test)]
mod tests {
    use rustix::process::{DumpableBehavior, Resource, dumpable_behavior, getrlimit};

    #[test]
    fn the_process_becomes_non_dumpable_with_no_core_limit() {
        super::forbid_core_dumps().unwrap();
        assert_eq!(dumpable_behavior().unwrap(), DumpableBehavior::NotDumpable);
        let lim = getrlimit(Resource::Core);
        assert_eq!((lim.current, lim.maximum), (Some(0), Some(0)));
    }
}
