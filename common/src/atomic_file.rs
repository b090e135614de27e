//! The one way files are published in this project (run directory reports, checkpoints, encoders, the
//! decode cache): written under a unique temporary name in the target's own directory, flushed to the
//! disk, renamed over the target, and the directory flushed too. A reader sees the old contents or the
//! new ones, never a part; after a crash or power loss the rename is durable once this returns.
//!
//! Temporaries are named `.NAME.tmp-PID-N`: unique per process and call, so two writers never share
//! one, and [`remove_stale_temporaries`] can tell a dead writer's leftovers from a live one's.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Publishes `target` atomically: `write` creates the temporary path it is given (a file, or a
/// directory filled with files), which is then synced, renamed to `target` and its directory synced.
/// An existing file at `target` is replaced; an existing directory must be removed first. On any error
/// the temporary is removed and the error names `target`.
pub fn write_atomic(target: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> std::io::Result<()> {
    let tmp = temporary_path(target);
    let result = (|| {
        write(&tmp)?;
        if tmp.is_dir() {
            for entry in std::fs::read_dir(&tmp)? {
                sync_path(&entry?.path())?;
            }
        }
        sync_path(&tmp)?;
        std::fs::rename(&tmp, target)?;
        sync_path(parent_of(target))
    })();
    result.map_err(|e| {
        let _ = if tmp.is_dir() { std::fs::remove_dir_all(&tmp) } else { std::fs::remove_file(&tmp) };
        std::io::Error::new(e.kind(), format!("cannot write {}: {e}", target.display()))
    })
}

/// [`write_atomic`] of `contents` as the whole file.
pub fn write_bytes_atomic(target: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_atomic(target, |tmp| std::fs::write(tmp, contents))
}

/// Removes the temporaries that writers killed mid-write left in `dir` (those of other processes: the
/// caller must be the directory's only writer). Returns the paths removed.
pub fn remove_stale_temporaries(dir: &Path) -> Vec<PathBuf> {
    let mine = format!(".tmp-{}-", std::process::id());
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(".tmp-") && !name.contains(&mine) {
            let path = entry.path();
            let done = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            if done.is_ok() {
                removed.push(path);
            }
        }
    }
    removed
}

fn temporary_path(target: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = target.file_name().map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    parent_of(target).join(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Flushes a file, or a directory's entries, to the disk.
fn sync_path(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn a_file_is_replaced_whole_and_no_temporary_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.json");
        write_bytes_atomic(&target, b"first").unwrap();
        write_bytes_atomic(&target, b"second").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"second");
        assert_eq!(names(dir.path()), ["a.json"]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_removes_its_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.json");
        write_bytes_atomic(&target, b"good").unwrap();
        let err = write_atomic(&target, |tmp| {
            std::fs::write(tmp, b"half")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("a.json") && err.to_string().contains("disk full"), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), b"good");
        assert_eq!(names(dir.path()), ["a.json"]);
    }

    #[test]
    fn a_directory_is_published_with_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("step-1");
        write_atomic(&target, |tmp| {
            std::fs::create_dir(tmp)?;
            std::fs::write(tmp.join("x"), b"1")?;
            std::fs::write(tmp.join("y"), b"2")
        })
        .unwrap();
        assert_eq!(names(&target), ["x", "y"]);
        assert_eq!(names(dir.path()), ["step-1"]);
    }

    #[test]
    fn temporaries_are_unique_and_only_other_processes_ones_are_stale() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a");
        assert_ne!(temporary_path(&target), temporary_path(&target));
        let mine = temporary_path(&target);
        std::fs::write(&mine, b"").unwrap();
        let dead = dir.path().join(".a.tmp-4294967295-0");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dir.path().join("kept.tmp-1-0"), b"").unwrap();
        assert_eq!(remove_stale_temporaries(dir.path()), [dead]);
        assert!(mine.exists());
    }
}
