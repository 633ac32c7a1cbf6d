//! Writing certificates, keys and PKCS#12 files to disk, and reading them back.
//!
//! Invariant: private material (keys, PKCS#12 files) is created with mode 0600 and never
//! overwrites an existing file; public certificates are written 0644. Nothing else in this
//! crate touches the file system, except [`FileSerialRegistry`](crate::FileSerialRegistry).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::CertError;

/// Writes private material (a key PEM, a PKCS#12 file) to a new file readable by its owner
/// only; refused if the file exists, so a key is never replaced by accident.
pub fn write_private(path: impl AsRef<Path>, bytes: &[u8]) -> Result<(), CertError> {
    write_new(path.as_ref(), bytes, 0o600)
}

/// Writes a certificate (PEM or DER) to a new file readable by everyone; refused if the file
/// exists.
pub fn write_public(path: impl AsRef<Path>, bytes: &[u8]) -> Result<(), CertError> {
    write_new(path.as_ref(), bytes, 0o644)
}

/// Writes a private key readable only by its owner (mode 0600), replacing `path` atomically if
/// it exists: a reader sees the old file or the new one, never a part (a temporary file in
/// the same directory, then a rename).
pub fn replace_private(path: impl AsRef<Path>, bytes: &[u8]) -> Result<(), CertError> {
    replace(path.as_ref(), bytes, 0o600)
}

/// Writes a certificate readable by everyone, replacing `path` atomically if it exists.
pub fn replace_public(path: impl AsRef<Path>, bytes: &[u8]) -> Result<(), CertError> {
    replace(path.as_ref(), bytes, 0o644)
}

fn replace(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let name = path
        .file_name()
        .ok_or_else(|| io(std::io::Error::other("not a file name")))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    // A leftover of an interrupted run of this process id: ours to remove.
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, bytes, mode)?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io(e)
    })
}

/// Reads a whole file (a PKCS#12 file to import, a PEM).
pub fn read(path: impl AsRef<Path>) -> Result<Vec<u8>, CertError> {
    let path = path.as_ref();
    fs::read(path).map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replacing_swaps_the_whole_file_and_keeps_the_mode() {
        let dir = tempfile::tempdir().expect("dir");
        let key = dir.path().join("server.key");
        super::write_private(&key, b"old").expect("first write");
        super::replace_private(&key, b"new key").expect("replace");
        assert_eq!(std::fs::read(&key).expect("read"), b"new key");
        let mode = std::fs::metadata(&key).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Nothing left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("server.key")]);
        let cert = dir.path().join("new.pem");
        super::replace_public(&cert, b"cert").expect("replace a missing file");
        let mode = std::fs::metadata(&cert).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }

    use super::*;

    #[test]
    fn private_files_are_0600_and_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("relay-cert-files-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("dir");
        let key = dir.join("key.pem");
        write_private(&key, b"secret").expect("write");
        let mode = fs::metadata(&key).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        assert!(matches!(
            write_private(&key, b"other"),
            Err(CertError::Io { .. })
        ));
        assert_eq!(read(&key).expect("read"), b"secret");
        let cert = dir.join("cert.pem");
        write_public(&cert, b"cert").expect("write");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
