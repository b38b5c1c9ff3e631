//! The device under test: taken (`--reuse`) or made by running `add` with
//! the run's options, checked for the method, and deleted again when the
//! run made it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cli::{DowntimeArgs, OnOff, RecoverMethod};
use crate::config;
use crate::ctrl::{self, Ctrl};
use crate::error::{Error, Result};
use crate::{run_files, sys};

use super::args::{device_size, recovery_flags};

/// Runs this binary with `args` in its own process group; Ok(stdout) on success.
pub(super) fn run_self(exe: &Path, args: &[String]) -> Result<String> {
    let out = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .output()
        .map_err(|e| Error::io(format!("run {}", exe.display()), e))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    Err(Error::invalid(format!(
        "`ublk-bench {}` failed ({}): {}",
        args.join(" "),
        out.status,
        err.trim().trim_start_matches("ublk-bench: error: ")
    )))
}

/// The device under test; deletes it on drop if the run made it.
pub(super) struct Device {
    pub(super) id: u32,
    pub(super) created: bool,
    exe: PathBuf,
    pub(super) facts: DeviceFacts,
}

/// What the report says about the device, read while it exists.
#[derive(Debug, Clone, Default)]
pub(super) struct DeviceFacts {
    pub(super) flags: u64,
    /// Bytes, as the kernel has the device.
    pub(super) size: u64,
    /// The settings ublk-bench keeps for a device it added (copy mode as
    /// the server chose it, file path); None for another server's device.
    pub(super) settings: Option<config::DeviceConfig>,
}

impl Device {
    pub(super) fn acquire(a: &DowntimeArgs, exe: &Path, ctrl: &mut Ctrl) -> Result<Device> {
        let mut dev = match a.id {
            Some(id) if a.reuse => {
                Device { id, created: false, exe: exe.into(), facts: DeviceFacts::default() }
            }
            Some(id) if ctrl.info(id).is_ok() => {
                return Err(Error::invalid(format!(
                    "device {id} already exists: pass --reuse to measure it, or pick another -n"
                )));
            }
            _ => Device::create(a, exe)?,
        };
        let info = ctrl.info(dev.id).map_err(|e| ctrl::no_device(dev.id, e))?;
        dev.facts = DeviceFacts {
            flags: info.flags,
            size: ctrl.get_params(dev.id).map_or(0, |p| p.basic.dev_sectors << 9),
            settings: run_files::load(dev.id).ok(),
        };
        ctrl::check_recoverable(&info)?;
        if info.state != sys::UBLK_S_DEV_LIVE {
            return Err(Error::invalid(format!(
                "device {} is {}, not LIVE: recover it first (`ublk-bench recover -n {0}`)",
                dev.id,
                sys::state_name(info.state)
            )));
        }
        let supervised = run_files::live_supervisor(dev.id).is_some();
        match a.method {
            RecoverMethod::Supervise | RecoverMethod::Standby if !supervised => {
                return Err(Error::invalid(format!(
                    "device {} has no supervisor: --method {:?} needs a device added with --supervise/--standby",
                    dev.id, a.method
                )));
            }
            RecoverMethod::Recover if supervised => {
                return Err(Error::invalid(format!(
                    "device {} is supervised: its supervisor would race `recover`; use --method supervise or standby",
                    dev.id
                )));
            }
            RecoverMethod::Restart if info.flags & sys::UBLK_F_QUIESCE == 0 => {
                return Err(Error::Unsupported {
                    feature: "UBLK_F_QUIESCE on this device",
                    version: "6.16",
                    hint: "--method restart needs QUIESCE_DEV; use another method",
                });
            }
            _ => {}
        }
        Ok(dev)
    }

    fn create(a: &DowntimeArgs, exe: &Path) -> Result<Device> {
        let args = add_argv(a)?;
        let out = run_self(exe, &args)?;
        let v: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| Error::invalid(format!("cannot read `add --json` output ({e}): {out}")))?;
        let id = v["dev_id"]
            .as_u64()
            .ok_or_else(|| Error::invalid(format!("no dev_id in `add` output: {out}")))?;
        Ok(Device { id: id as u32, created: true, exe: exe.into(), facts: DeviceFacts::default() })
    }
}

/// The `add` command line of the device the run creates.
fn add_argv(a: &DowntimeArgs) -> Result<Vec<String>> {
    let mut args: Vec<String> = vec!["add".into(), a.backend.name().into()];
    if let Some(size) = device_size(a) {
        args.extend(["--size".into(), size.to_string()]);
    }
    args.extend([
        "-q".into(),
        a.queue.queues.to_string(),
        "-d".into(),
        a.queue.depth.to_string(),
        "--scheduler".into(),
        a.queue.scheduler.to_string(),
        "--json".into(),
    ]);
    args.extend(a.dev_opts.to_args());
    if let Some(id) = a.id {
        args.extend(["-n".into(), id.to_string()]);
    }
    if a.poll {
        args.push("--poll".into());
    }
    if a.queue.batch {
        args.push("--batch".into());
    }
    if let Some(w) = a.queue.gather_wait {
        args.extend(["--gather-wait".into(), w.to_string()]);
    }
    if a.queue.stats == OnOff::Off {
        args.extend(["--stats".into(), "off".into()]);
    }
    if let Some(store) = &a.store {
        args.extend(["--store".into(), store.display().to_string()]);
    }
    args.extend(recovery_flags(&a.recovery)?.iter().map(|s| s.to_string()));
    match a.method {
        RecoverMethod::Supervise => args.push("--supervise".into()),
        RecoverMethod::Standby => args.push("--standby".into()),
        _ => {}
    }
    Ok(args)
}

impl Drop for Device {
    fn drop(&mut self) {
        if !self.created {
            return;
        }
        println!("deleting device {}", self.id);
        if let Err(e) = run_self(&self.exe, &["del".into(), "-n".into(), self.id.to_string()]) {
            eprintln!("ublk-bench: downtime: could not delete device {}: {e}", self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendKind;
    use crate::downtime::args::{args, validate};

    /// The `add` line of each row of the recovery-gap matrix, exactly.
    #[test]
    fn the_add_argv_carries_the_device_options() {
        let argv = |extra: &[&str]| add_argv(&args(extra).unwrap()).unwrap();
        let common = ["-q", "1", "-d", "128", "--scheduler", "none", "--json"];
        let want = |head: &[&str], tail: &[&str]| -> Vec<String> {
            head.iter().chain(&common).chain(tail).map(|s| s.to_string()).collect()
        };
        assert_eq!(
            argv(&["--backend", "file", "--path", "/dev/shm/f", "--direct", "--method", "standby"]),
            want(
                &["add", "file"],
                &[
                    "--copy-mode",
                    "auto",
                    "--block-size",
                    "512",
                    "--path",
                    "/dev/shm/f",
                    "--direct",
                    "-r",
                    "-i",
                    "--standby"
                ]
            ),
            "a file device is the whole file unless --size says otherwise"
        );
        assert_eq!(
            argv(&["--copy-mode", "user", "--method", "recover", "--recovery", "plain"]),
            want(
                &["add", "ram", "--size", "268435456"],
                &["--copy-mode", "user", "--block-size", "512", "-r"]
            )
        );
        assert_eq!(
            argv(&["--backend", "nvme", "--dev", "/dev/ng0n1", "--copy-mode", "zero", "--explicit-buf-reg"]),
            want(
                &["add", "nvme"],
                &[
                    "--copy-mode",
                    "zero",
                    "--block-size",
                    "512",
                    "--dev",
                    "/dev/ng0n1",
                    "--explicit-buf-reg",
                    "-r",
                    "-i",
                    "--supervise"
                ]
            )
        );
        let null = argv(&["--backend", "null", "--size", "1G", "-b", "4096"]);
        assert!(null.windows(2).any(|w| w == ["--size", "1073741824"]), "{null:?}");
        assert!(null.windows(2).any(|w| w == ["--block-size", "4096"]), "{null:?}");
    }

    /// What the run hands `add` is what `add` itself accepts and means the
    /// same by: a file device on a file that exists.
    #[test]
    fn add_takes_the_file_device_as_downtime_describes_it() {
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
        let p = img.to_str().unwrap();
        let a =
            args(&["--backend", "file", "--path", p, "--copy-mode", "zero", "--explicit-buf-reg"]).unwrap();
        validate(&a).unwrap();
        let argv = add_argv(&a).unwrap();
        let crate::cli::Command::Add(add) =
            crate::cli::Cli::try_parse_from(["ublk-bench".to_string()].into_iter().chain(argv)).unwrap().cmd
        else {
            panic!("not add")
        };
        let cfg = crate::cmd::add::config_from(&add).unwrap();
        assert_eq!(
            (cfg.backend, cfg.size, cfg.path),
            (BackendKind::File, 4 << 20, Some(img.canonicalize().unwrap()))
        );
        assert_eq!((cfg.copy_mode, cfg.explicit_buf_reg), (config::CopyMode::Zero, true));
        assert_eq!(cfg.recovery, config::Recovery::Reissue);
    }
}
