//! Reading the files a configuration names (keys, certificates, anchors, CRLs, JWKS).
//!
//! A path is the operator's input like any other: one that names `/dev/zero`, a FIFO or a
//! huge file by mistake must fail with a clear error, not exhaust memory or hang the start.

use std::io::{self, Read};
use std::path::Path;

/// The largest file read (a CRL of a million entries is about 40 MiB).
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// [`std::fs::read`] refusing anything but a regular file of at most [`MAX_FILE_BYTES`].
pub fn read(path: impl AsRef<Path>) -> io::Result<Vec<u8>> {
    let path = path.as_ref();
    let file = std::fs::File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut out = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut out)?;
    if out.len() as u64 > MAX_FILE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {} MiB", MAX_FILE_BYTES >> 20),
        ));
    }
    Ok(out)
}

/// [`read`] as UTF-8 text.
pub fn read_to_string(path: impl AsRef<Path>) -> io::Result<String> {
    String::from_utf8(read(path)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn devices_and_directories_are_refused() {
        for p in ["/dev/zero", "/dev/urandom", "/"] {
            let e = super::read(p).unwrap_err();
            assert!(
                e.to_string().contains("regular file")
                    || e.kind() == std::io::ErrorKind::IsADirectory,
                "{p}: {e}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ok.pem");
        std::fs::write(&f, "text").unwrap();
        assert_eq!(super::read_to_string(&f).unwrap(), "text");
    }
}
