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

pub fn run_dir() -> PathBuf {
    std::env::var_os("UBLK_BENCH_RUN_DIR").map(PathBuf::from).unwrap_or_else(|| "/run/ublk-bench".into())
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
    let res = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .and_then(|()| fs::rename(&tmp, path));
    res.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(format!("write {}", path.display()), e)
    })
}

/// Opens a file in the run folder for appending, created 0600.
pub fn open_append(path: &Path) -> std::io::Result<fs::File> {
    OpenOptions::new().create(true).append(true).mode(0o600).open(path)
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
    serde_json::from_slice(&text).map_err(|e| Error::invalid(format!("{} is corrupt: {e}", p.display())))
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
    for ext in ["json", "events", "stats", "supervisor"] {
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
