//! The exclusive advisory lock: `flock(LOCK_EX | LOCK_NB)` on `<database>.lock`.
//!
//! flock locks belong to the open file description, so the kernel releases the lock when
//! the holder's file is closed or the process dies (even by `kill -9`), and a second open in
//! the same process conflicts just like one in another process. The holder writes its pid
//! into the file so a refused opener can name it. The file is never removed: unlinking a
//! lock file races with a process that has it open and is about to lock it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::StoreError;

/// A held lock; dropping it closes the file, which releases the lock.
#[derive(Debug)]
pub(crate) struct LockFile {
    _file: File,
}

/// `<db>.lock`, next to the database.
pub(crate) fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

impl LockFile {
    /// Takes the lock for database `db` or fails at once with [`StoreError::InUse`].
    pub(crate) fn acquire(db: &Path) -> Result<LockFile, StoreError> {
        let path = lock_path(db);
        let io_err = |what, source| StoreError::Io {
            what,
            path: path.clone(),
            source,
        };
        // std opens with O_CLOEXEC: a child process never inherits the lock.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_err("cannot open lock file", e))?;
        // SAFETY: flock has no memory effects; the descriptor is valid while `file` lives.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(StoreError::InUse {
                    path: db.to_path_buf(),
                    pid: read_pid(&mut file),
                    lock: path,
                });
            }
            return Err(io_err("cannot lock", err));
        }
        let record = |file: &mut File| -> io::Result<()> {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            writeln!(file, "{}", std::process::id())?;
            file.flush()
        };
        record(&mut file).map_err(|e| io_err("cannot write pid to lock file", e))?;
        Ok(LockFile { _file: file })
    }
}

/// The pid the holder recorded, if readable (the holder may not have written it yet).
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}
