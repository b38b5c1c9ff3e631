//! The device under test: taken (`--reuse`) or made as `add` makes one,
//! from the run's options, checked for the method, and deleted again when
//! the run made it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cli::{AddArgs, DowntimeArgs, RecoverMethod};
use crate::cmd::add;
use crate::config::{self, Recovery};
use crate::ctrl::{self, Ctrl};
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::{run_files, sys};

use super::args::{device_size, recovery_of};

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
            RecoverMethod::Restart if !Plan::of_device(info.flags).quiesce() => {
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

    /// Makes the device as `add` does, from the same options (no command
    /// line between them): checked, planned by its server, LIVE on return.
    fn create(a: &DowntimeArgs, exe: &Path) -> Result<Device> {
        let id = add::create(&add_args(a)?)?;
        Ok(Device { id, created: true, exe: exe.into(), facts: DeviceFacts::default() })
    }
}

/// The `add` options of the device the run creates.
fn add_args(a: &DowntimeArgs) -> Result<AddArgs> {
    let recovery = recovery_of(&a.recovery)?;
    Ok(AddArgs {
        backend: a.backend,
        id: a.id.map(i64::from),
        queue: a.queue.clone(),
        cpus: None,
        poll: a.poll,
        size: device_size(a),
        store: a.store.clone(),
        reuse_store: false,
        sparse: false,
        part_scan: false,
        dev_opts: a.dev_opts.clone(),
        foreground: false,
        json: false,
        recovery: recovery == Recovery::Plain,
        reissue: recovery == Recovery::Reissue,
        fail_io: recovery == Recovery::FailIo,
        supervise: a.method == RecoverMethod::Supervise,
        standby: a.method == RecoverMethod::Standby,
    })
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
    use crate::cli::OnOff;
    use crate::config::{BackendKind, CopyMode};
    use crate::downtime::args::{args, validate};

    /// Each row of the recovery-gap matrix reaches `add` with its options.
    #[test]
    fn the_add_args_carry_the_device_options() {
        let add = |extra: &[&str]| add_args(&args(extra).unwrap()).unwrap();
        let file = add(&["--backend", "file", "--path", "/dev/shm/f", "--direct", "--method", "standby"]);
        assert_eq!((file.backend, file.size), (BackendKind::File, None), "the whole file unless told");
        assert_eq!(
            (file.dev_opts.path.as_deref(), file.dev_opts.direct),
            (Some(Path::new("/dev/shm/f")), true)
        );
        assert_eq!(
            (file.recovery, file.reissue, file.fail_io, file.supervise, file.standby),
            (false, true, false, false, true)
        );
        assert_eq!((file.queue.queues, file.queue.depth, file.foreground, file.json), (1, 128, false, false));
        let ram = add(&["--copy-mode", "user", "--method", "recover", "--recovery", "plain"]);
        assert_eq!(
            (ram.backend, ram.size, ram.dev_opts.copy_mode),
            (BackendKind::Ram, Some(256 << 20), CopyMode::User)
        );
        assert_eq!((ram.recovery, ram.reissue, ram.supervise, ram.standby), (true, false, false, false));
        let nvme =
            add(&["--backend", "nvme", "--dev", "/dev/ng0n1", "--copy-mode", "zero", "--explicit-buf-reg"]);
        assert_eq!(
            (nvme.dev_opts.dev.as_deref(), nvme.dev_opts.explicit_buf_reg),
            (Some(Path::new("/dev/ng0n1")), true)
        );
        assert_eq!((nvme.reissue, nvme.supervise), (true, true));
        let null = add(&["--backend", "null", "--size", "1G", "-b", "4096", "-n", "7", "--poll", "--batch"]);
        assert_eq!(
            (null.size, null.dev_opts.block_size, null.id, null.poll, null.queue.batch),
            (Some(1 << 30), 4096, Some(7), true, true)
        );
        let quiet =
            add(&["--stats", "off", "--gather-wait", "20", "--scheduler", "keep", "--store", "/dev/shm/s"]);
        assert_eq!((quiet.queue.stats, quiet.queue.gather_wait), (OnOff::Off, Some(20)));
        let split = add(&["-q", "1", "--threads", "2"]);
        assert_eq!(crate::cmd::add::config_from(&split).unwrap().threads, Some(2), "--threads reaches add");
        assert_eq!(
            (quiet.queue.scheduler.0.as_deref(), quiet.store.as_deref()),
            (None, Some(Path::new("/dev/shm/s")))
        );
    }

    /// What the run hands `add` is what `add` itself accepts and means the
    /// same by: a file device on a file that exists.
    #[test]
    fn add_takes_the_file_device_as_downtime_describes_it() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
        let p = img.to_str().unwrap();
        let a =
            args(&["--backend", "file", "--path", p, "--copy-mode", "zero", "--explicit-buf-reg"]).unwrap();
        validate(&a).unwrap();
        let cfg = add::config_from(&add_args(&a).unwrap()).unwrap();
        assert_eq!(
            (cfg.backend, cfg.size, cfg.path),
            (BackendKind::File, 4 << 20, Some(img.canonicalize().unwrap()))
        );
        assert_eq!((cfg.copy_mode, cfg.explicit_buf_reg), (CopyMode::Zero, true));
        assert_eq!(cfg.recovery, Recovery::Reissue);
    }
}
