//! File helpers for key material: private files are created 0600, and "create once" files are
//! published atomically so two processes racing on a fresh data dir agree on one value.
use std::fs;
use std::io::{self, Write};
use std::path::Path;

#[cfg(unix)]
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

/// Writes `contents` to `path` atomically (temp file + rename), with the given mode.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_sibling(path);
    write_new(&tmp, contents, mode)?;
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Publishes `contents` at `path` only if nothing is there yet. Returns `false` if another
/// writer got there first (the existing file is left untouched).
pub fn publish_once(path: &Path, contents: &[u8], mode: u32) -> io::Result<bool> {
    let tmp = temp_sibling(path);
    write_new(&tmp, contents, mode)?;
    // A hard link fails with AlreadyExists instead of replacing, unlike rename.
    let res = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match res {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Creates a directory (and parents) readable only by the owner.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    fs::create_dir_all(path)?;
    #[cfg(unix)]
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
    Ok(())
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

fn temp_sibling(path: &Path) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let suffix: u64 = rand::random();
    path.with_file_name(format!(".{name}.{suffix:016x}.tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_once_keeps_first_writer() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        assert!(publish_once(&p, b"one", 0o600).unwrap());
        assert!(!publish_once(&p, b"two", 0o600).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"one");
        #[cfg(unix)]
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn write_atomic_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("root-cert.pem");
        write_atomic(&p, b"a", 0o644).unwrap();
        write_atomic(&p, b"b", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"b");
    }
}
