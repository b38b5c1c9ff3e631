//! Run files under `/run/ublk-bench/`: `<id>.json` holds the
//! [`DeviceConfig`] of a live device, so recovery and `list` need no other
//! argument; `<id>.supervisor` records the supervisor process;
//! `<id>.events` has a line per takeover; `server.log` is the daemons' log.
//! Written by `add` and the servers, removed by `del`.
//!
//! Every file here is mode 0600 and written whole under a temporary name,
//! then renamed into place, so a reader never sees half a file. The folder
//! is 0700: it is root's business only.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::DeviceConfig;
use crate::error::{Error, Result};
use crate::process::ProcId;

/// The environment variable that moves the run folder (tests, unprivileged use).
pub const RUN_DIR_ENV: &str = "UBLK_BENCH_RUN_DIR";
const DEFAULT_RUN_DIR: &str = "/run/ublk-bench";

/// The run folder: `/run/ublk-bench`, or [`RUN_DIR_ENV`] where
/// [`run_dir_override`] allows it. Decided once per process.
pub fn run_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let Some(want) = std::env::var_os(RUN_DIR_ENV) else { return DEFAULT_RUN_DIR.into() };
        let want = PathBuf::from(want);
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        match run_dir_override(&want, euid, !cfg!(debug_assertions), fs::symlink_metadata(&want)) {
            Ok(()) => want,
            Err(why) => {
                eprintln!(
                    "ublk-bench: ignoring {RUN_DIR_ENV}={}: {why}; using {DEFAULT_RUN_DIR}",
                    want.display()
                );
                DEFAULT_RUN_DIR.into()
            }
        }
    })
    .clone()
}

/// Whether a release build run as root may take `dir` (its `lstat` is
/// `meta`) as its run folder. Root's daemons write settings, stats and logs
/// there and trust what they read back (a device's settings name the store
/// `del` removes), so the folder must be root's alone: an existing folder,
/// not a link, owned by root, not writable by group or others. Debug builds
/// (the tests) and unprivileged runs take any folder.
pub fn run_dir_override(
    dir: &Path,
    euid: u32,
    release: bool,
    meta: std::io::Result<fs::Metadata>,
) -> std::result::Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if !release || euid != 0 {
        return Ok(());
    }
    let meta = meta.map_err(|e| format!("a release build run as root needs an existing folder ({e})"))?;
    if !meta.file_type().is_dir() {
        return Err(format!("{} is not a folder (a link is not followed)", dir.display()));
    }
    if meta.uid() != 0 {
        return Err(format!("{} belongs to uid {}, not root", dir.display(), meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by group or others (mode {:o})",
            dir.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Creates the run folder (mode 0700) if it is missing.
pub fn ensure_run_dir() -> Result<PathBuf> {
    let dir = run_dir();
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    Ok(dir)
}

pub fn path(dev_id: u32) -> PathBuf {
    run_dir().join(format!("{dev_id}.json"))
}

pub fn supervisor_path(dev_id: u32) -> PathBuf {
    run_dir().join(format!("{dev_id}.supervisor"))
}

/// Writes `bytes` to `path` atomically: a 0600 temporary file in the same
/// folder, then rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    // Left by an earlier process with our pid, or planted: it goes, and the
    // new one is O_EXCL|O_NOFOLLOW, so no link there is ever followed.
    let _ = fs::remove_file(&tmp);
    let res = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .and_then(|()| fs::rename(&tmp, path));
    res.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(format!("write {}", path.display()), e)
    })
}

/// Opens a file in the run folder for appending, created 0600. Every
/// server appends to the same log, so it cannot be O_EXCL: it is opened
/// O_NOFOLLOW and must then be a regular file of our own user.
pub fn open_append(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::MetadataExt;
    // O_NONBLOCK: a FIFO planted at the name does not hang the open.
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .mode(0o600)
        .open(path)?;
    let meta = f.metadata()?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if !meta.file_type().is_file() || meta.uid() != euid {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file of uid {euid}: remove it",
            path.display()
        )));
    }
    Ok(f)
}

pub fn save(dev_id: u32, cfg: &DeviceConfig) -> Result<()> {
    ensure_run_dir()?;
    write_atomic(&path(dev_id), &serde_json::to_vec_pretty(cfg).expect("config serializes"))
}

pub fn load(dev_id: u32) -> Result<DeviceConfig> {
    let p = path(dev_id);
    let text = fs::read(&p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::invalid(format!(
            "no settings file {} for device {dev_id}: it was not made by ublk-bench add, or /run was cleared",
            p.display()
        )),
        _ => Error::io(format!("read {}", p.display()), e),
    })?;
    serde_json::from_slice(&text).map_err(|e| Error::Refused(format!("{} is corrupt: {e}", p.display())))
}

/// Records this process as the supervisor of `dev_id`.
pub fn save_supervisor(dev_id: u32) -> Result<()> {
    ensure_run_dir()?;
    let me = serde_json::to_vec(&ProcId::me()).expect("serializes");
    write_atomic(&supervisor_path(dev_id), &me)
}

/// The recorded supervisor of `dev_id`; None if there is no record or it
/// cannot be read (a stale or foreign file proves nothing).
pub fn load_supervisor(dev_id: u32) -> Option<ProcId> {
    serde_json::from_slice(&fs::read(supervisor_path(dev_id)).ok()?).ok()
}

/// The running supervisor of `dev_id`, checked against its record.
pub fn live_supervisor(dev_id: u32) -> Option<(ProcId, OwnedFd)> {
    let id = load_supervisor(dev_id)?;
    id.open().map(|fd| (id, fd))
}

/// Where daemonized servers write their log.
pub fn log_path() -> PathBuf {
    run_dir().join("server.log")
}

/// The moments a takeover passes, in CLOCK_MONOTONIC nanoseconds. One JSON
/// line each in the events file; readers take missing fields as defaults.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Phases {
    pub dev_id: u32,
    pub method: String,
    pub pid: u32,
    /// The server taken over, where known: the kernel forgets it once the
    /// process is gone, so only a standby (which watched it) can say.
    pub old_pid: Option<i32>,
    pub began_ns: u64,
    pub crash_seen_ns: Option<u64>,
    pub prepared_ns: u64,
    pub quiesced_ns: u64,
    pub start_recovery_ns: u64,
    pub fetch_posted_ns: u64,
    pub end_recovery_ns: u64,
    pub first_served_ns: Option<u64>,
}

/// `<id>.events`: one JSON line of [`Phases`] per takeover.
pub fn events_path(dev_id: u32) -> PathBuf {
    run_dir().join(format!("{dev_id}.events"))
}

/// Rewrites the events file with one more line (temporary file, then
/// rename, like every run file): a reader never sees half a line.
pub fn append_event(p: &Phases) -> Result<()> {
    let path = events_path(p.dev_id);
    let mut text = std::fs::read(&path).unwrap_or_default();
    text.extend(serde_json::to_string(p).expect("phases serialize").bytes());
    text.push(b'\n');
    write_atomic(&path, &text)
}

/// Removes the settings and every other per-device file in the run folder.
pub fn remove(dev_id: u32) {
    for ext in ["json", "events", "stats", "supervisor", "size"] {
        let _ = fs::remove_file(run_dir().join(format!("{dev_id}.{ext}")));
    }
}

/// Removes the device's RAM store, but only a regular file that ublk-bench
/// created for it: a store the user brought (`--reuse-store`) stays, and a
/// path that is now a link, a device or a folder is never touched.
pub fn remove_store(cfg: &DeviceConfig) {
    let Some(store) = cfg.store.as_deref().filter(|_| cfg.store_created) else { return };
    if fs::symlink_metadata(store).is_ok_and(|m| m.file_type().is_file()) {
        let _ = fs::remove_file(store);
    }
}

/// Removes everything ublk-bench made for a device that no longer exists.
pub fn remove_all(dev_id: u32, cfg: Option<&DeviceConfig>) {
    remove(dev_id);
    if let Some(cfg) = cfg {
        remove_store(cfg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn folder(mode: u32) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::set_permissions(d.path(), fs::Permissions::from_mode(mode)).unwrap();
        d
    }

    fn allowed(dir: &Path, euid: u32, release: bool) -> bool {
        run_dir_override(dir, euid, release, fs::symlink_metadata(dir)).is_ok()
    }

    /// A release build run as root takes only a folder of root's alone;
    /// a debug build or another user takes any.
    #[test]
    fn run_dir_override_in_release_as_root_needs_roots_own_folder() {
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let private = folder(0o700);
        let open = folder(0o777);
        let group = folder(0o770);
        let missing = private.path().join("missing");
        let link = private.path().join("link");
        std::os::unix::fs::symlink(private.path(), &link).unwrap();
        for d in [private.path(), open.path(), missing.as_path(), link.as_path()] {
            assert!(allowed(d, 0, false), "a debug build refused {}", d.display());
            assert!(allowed(d, 1000, true), "an unprivileged run refused {}", d.display());
        }
        assert!(!allowed(open.path(), 0, true), "world-writable folder taken");
        assert!(!allowed(group.path(), 0, true), "group-writable folder taken");
        assert!(!allowed(&missing, 0, true), "missing folder taken");
        assert!(!allowed(&link, 0, true), "a link taken");
        // The folder is ours: root's own only where the tests run as root.
        assert_eq!(allowed(private.path(), 0, true), me == 0, "mode 0700 folder of uid {me}");
    }

    /// Temporary files never follow a link planted at their name.
    #[test]
    fn write_atomic_does_not_follow_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let target = dir.path().join("7.json");
        let tmp = dir.path().join(format!(".7.json.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        write_atomic(&target, b"new").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep", "the write went through the link");
        assert_eq!(fs::read(&target).unwrap(), b"new");
    }

    /// The log is never a link (someone else's file) nor another user's file.
    #[test]
    fn open_append_refuses_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let log = dir.path().join("server.log");
        std::os::unix::fs::symlink(&victim, &log).unwrap();
        assert!(open_append(&log).is_err(), "a link was opened as the log");
        fs::remove_file(&log).unwrap();
        let mut f = open_append(&log).unwrap();
        f.write_all(b"line\n").unwrap();
    }
}
