//! Persisted device settings under `/run/ublk-bench/`: `<id>.json` holds the
//! [`DeviceConfig`] of a live device, so recovery and `list` need no other
//! argument. Written by `add`, removed by `del`.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::config::DeviceConfig;
use crate::error::{Error, Result};

pub fn run_dir() -> PathBuf {
    std::env::var_os("UBLK_BENCH_RUN_DIR").map(PathBuf::from).unwrap_or_else(|| "/run/ublk-bench".into())
}

pub fn path(dev_id: u32) -> PathBuf {
    run_dir().join(format!("{dev_id}.json"))
}

/// Writes the settings atomically (temp file + rename), mode 0600.
pub fn save(dev_id: u32, cfg: &DeviceConfig) -> Result<()> {
    let dir = run_dir();
    fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let tmp = dir.join(format!(".{dev_id}.json.tmp"));
    let json = serde_json::to_vec_pretty(cfg).expect("config serializes");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
    f.write_all(&json).map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
    fs::rename(&tmp, path(dev_id)).map_err(|e| Error::io("rename settings file", e))
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

/// Removes the settings and every other per-device file in the run folder.
pub fn remove(dev_id: u32) {
    for ext in ["json", "events", "stats"] {
        let _ = fs::remove_file(run_dir().join(format!("{dev_id}.{ext}")));
    }
}
