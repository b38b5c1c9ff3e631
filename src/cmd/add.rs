//! `add`: validate, then serve a new device in a daemon (default) or in
//! this process (`--foreground`), and print it once LIVE.

use std::time::Duration;

use crate::backend::claim::Claim;
use crate::backend::{self, Options};
use crate::cli::{AddArgs, OnOff};
use crate::config::{self, DEFAULT_MAX_IO_BYTES, DeviceConfig, Recovery};
use crate::ctrl::Ctrl;
use crate::daemonize::{self, Notifier};
use crate::error::{Error, Result};
use crate::server_process;

/// How long `add` waits for the daemon: START_DEV scans partitions, which
/// is slow under software emulation.
const START_TIMEOUT: Duration = Duration::from_secs(120);

pub fn run(args: &AddArgs) -> Result<()> {
    let cfg = checked(args)?;
    if args.foreground {
        return server_process::new_device(cfg, Notifier::none(), |id| {
            crate::cmd::list::print_one(id, args.json)
        });
    }
    let dev_id = start(&cfg, args)?;
    crate::cmd::list::print_one(dev_id, args.json)
}

/// Makes the device `args` describe, served in the background (`add`
/// without `--foreground`, and `downtime`'s device): its id once LIVE.
pub fn create(args: &AddArgs) -> Result<u32> {
    start(&checked(args)?, args)
}

/// The device's settings, checked. Every check that needs no driver
/// (`config_from`, the backend's `validate`) runs before `preflight`, so
/// bad input gets its own message on any machine.
fn checked(args: &AddArgs) -> Result<DeviceConfig> {
    let cfg = config_from(args)?;
    backend::of(cfg.backend).validate(&cfg)?;
    preflight(&cfg)?;
    Ok(cfg)
}

/// Starts the server (or its supervisor) in the background and waits
/// until the device is LIVE.
fn start(cfg: &DeviceConfig, args: &AddArgs) -> Result<u32> {
    if args.supervise || args.standby {
        let json = serde_json::to_string(cfg).expect("config serializes");
        let mut a = vec!["__supervise".to_string(), "--config".into(), json];
        if args.standby {
            a.push("--standby".into());
        }
        daemonize::spawn_server(&a, START_TIMEOUT)
    } else {
        daemonize::spawn_server(&daemonize::serve_args(cfg), START_TIMEOUT)
    }
}

pub fn config_from(args: &AddArgs) -> Result<DeviceConfig> {
    if args.foreground && (args.supervise || args.standby) {
        return Err(Error::invalid("--supervise/--standby run in the background: drop --foreground"));
    }
    let dev_id = match args.id {
        None | Some(-1) => None,
        Some(id) if (0..1 << 20).contains(&id) => Some(id as u32),
        Some(id) => {
            return Err(Error::invalid(format!(
                "device id {id} is out of range: give -n between 0 and 1048575"
            )));
        }
    };
    let spec = backend::of(args.backend);
    let opts = options(args);
    backend::check_options(spec, &opts)?;
    let (queues, depth) = args.queue.checked()?;
    let mut cfg = DeviceConfig {
        dev_id,
        backend: args.backend,
        size: args.size.or(spec.default_size()).unwrap_or(0),
        store: None,
        store_created: false,
        path: None,
        direct: false,
        nvme_dev: None,
        backing_id: None,
        queues,
        depth,
        cpus: args.cpus.clone().unwrap_or_default(),
        poll: args.poll,
        block_size: args.dev_opts.block_size,
        max_io_bytes: DEFAULT_MAX_IO_BYTES,
        copy_mode: args.dev_opts.copy_mode,
        explicit_buf_reg: args.dev_opts.explicit_buf_reg,
        recovery: recovery_from(args)?,
        batch: args.queue.batch,
        gather_wait_us: args.queue.gather_wait_us(args.poll)?,
        stats: args.queue.stats == OnOff::On,
        scheduler: args.queue.scheduler.0.clone(),
        sparse: false,
        part_scan: args.part_scan,
        emulate: args.dev_opts.emulation(),
        integrity: args.dev_opts.integrity()?,
        threads: args.queue.threads,
    };
    spec.configure(&mut cfg, &opts)?;
    Ok(cfg)
}

/// The backend options of `add`, as given.
fn options(args: &AddArgs) -> Options<'_> {
    Options {
        store: args.store.as_deref(),
        reuse_store: args.reuse_store,
        sparse: args.sparse,
        ..args.dev_opts.options(args.size)
    }
}

fn recovery_from(args: &AddArgs) -> Result<Recovery> {
    Ok(match (args.reissue, args.fail_io) {
        (true, true) => {
            return Err(Error::invalid(
                "-i/--reissue and -e/--fail-io exclude each other: reissue requeues I/O the dead server held, \
                 fail-io fails it; pick one",
            ));
        }
        (true, false) => Recovery::Reissue,
        (false, true) => Recovery::FailIo,
        _ if args.recovery || args.supervise || args.standby => Recovery::Plain,
        _ => Recovery::None,
    })
}

/// Checks that need the machine, before anything is created.
fn preflight(cfg: &DeviceConfig) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::NotRoot);
    }
    let mut ctrl = Ctrl::open()?;
    if let Some(id) = cfg.dev_id.filter(|&id| ctrl.info(id).is_ok()) {
        return Err(Error::IdInUse(id));
    }
    let spec = backend::of(cfg.backend);
    spec.preflight(cfg)?;
    // A file, store or NVMe namespace another device serves, or a block device in use, is
    // refused here, before ADD_DEV; the server's own claim is the one that holds. A store
    // the server will create does not exist yet.
    let existing = spec.claimed_path(cfg).filter(|_| !cfg.store_created);
    if let Some(path) = existing {
        Claim::check_free(path, cfg.backing_id.as_ref())?;
    }
    if let Some(name) = &cfg.scheduler {
        crate::io_scheduler::check_scheduler(name, &crate::io_scheduler::offered_schedulers())?;
    }
    let queues = config::kernel_queues(cfg.queues);
    if queues < cfg.queues {
        eprintln!(
            "note: the kernel makes at most one queue per possible CPU: the device gets {queues} queues, not {}",
            cfg.queues
        );
    }
    if let Some(warning) = cfg.poll_sharing(cfg.threads_for(queues)) {
        eprintln!("{warning}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> AddArgs {
        let argv = ["ublk-bench", "add"].iter().chain(extra).copied();
        match crate::cli::Cli::parse_from(argv).cmd {
            crate::cli::Command::Add(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn reissue_and_fail_io_exclude_each_other() {
        let err = config_from(&args(&["ram", "-i", "-e"])).unwrap_err().to_string();
        assert!(err.contains("exclude each other"), "{err}");
    }

    #[test]
    fn recovery_flags_imply_user_recovery() {
        assert_eq!(config_from(&args(&["ram", "-i"])).unwrap().recovery, Recovery::Reissue);
        assert_eq!(config_from(&args(&["ram", "-e"])).unwrap().recovery, Recovery::FailIo);
        assert_eq!(config_from(&args(&["ram", "--supervise"])).unwrap().recovery, Recovery::Plain);
        assert_eq!(config_from(&args(&["null"])).unwrap().recovery, Recovery::None);
    }

    #[test]
    fn store_is_a_ram_option_and_must_be_new() {
        let dir = tempfile::tempdir().unwrap();
        let err = config_from(&args(&["null", "--store", "/etc/passwd"])).unwrap_err().to_string();
        assert!(err.contains("ram backend"), "{err}");
        let existing = dir.path().join("old");
        std::fs::write(&existing, vec![0u8; 1 << 20]).unwrap();
        let p = existing.to_str().unwrap();
        let err = config_from(&args(&["ram", "--store", p])).unwrap_err().to_string();
        assert!(err.contains("already exists") && err.contains("--reuse-store"), "{err}");
        let cfg = config_from(&args(&["ram", "--store", p, "--reuse-store"])).unwrap();
        assert_eq!((cfg.size, cfg.store_created), (1 << 20, false), "size taken from the store");
        let err = config_from(&args(&["ram", "--store", p, "--reuse-store", "--size", "2M"])).unwrap_err();
        assert!(err.to_string().contains("holds 1048576 bytes"), "{err}");
        let new = dir.path().join("sub/../new");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let cfg = config_from(&args(&["ram", "--store", new.to_str().unwrap()])).unwrap();
        let want = dir.path().canonicalize().unwrap().join("new");
        assert_eq!((cfg.store, cfg.store_created), (Some(want), true));
        let missing = dir.path().join("nowhere/store");
        assert!(config_from(&args(&["ram", "--store", missing.to_str().unwrap()])).is_err());
    }

    #[test]
    fn a_relative_store_becomes_absolute() {
        let cfg =
            config_from(&args(&["ram", "--store", "ublk-bench-test-store-that-does-not-exist"])).unwrap();
        let store = cfg.store.unwrap();
        assert!(store.is_absolute(), "{}", store.display());
        assert_eq!(
            store,
            std::env::current_dir().unwrap().canonicalize().unwrap().join(store.file_name().unwrap())
        );
    }

    #[test]
    fn ids_and_backend_options_are_checked() {
        assert_eq!(config_from(&args(&["null", "-n", "-1"])).unwrap().dev_id, None);
        assert!(config_from(&args(&["null", "-n", "2000000"])).is_err());
        assert!(config_from(&args(&["ram", "--dev", "/dev/ng0n1"])).is_err());
        assert!(config_from(&args(&["null", "-q", "70000"])).is_err());
    }

    #[test]
    fn static_conflicts_are_refused_before_any_machine_check() {
        let cases: [(&[&str], &str); 5] = [
            (&["null", "--supervise", "--foreground"], "drop --foreground"),
            (&["ram", "--standby", "--foreground"], "drop --foreground"),
            (&["file", "--path", "/nonexistent", "--copy-mode", "user"], "user copy would add a bounce copy"),
            (&["null", "--explicit-buf-reg"], "--explicit-buf-reg applies to zero copy"),
            (&["nvme", "--dev", "/nonexistent", "--copy-mode", "user"], "user copy would add a bounce copy"),
        ];
        for (argv, want) in cases {
            let err = config_from(&args(argv)).unwrap_err().to_string();
            assert!(err.contains(want), "add {}: {err}", argv.join(" "));
        }
    }

    #[test]
    fn out_of_range_queue_counts_share_one_message() {
        let msg = |q: &str| config_from(&args(&["null", "-q", q])).unwrap_err().to_string();
        let (a, b) = (msg("4097"), msg("70000"));
        assert_eq!(a.replace("4097", "N"), b.replace("70000", "N"));
        assert_eq!(config_from(&args(&["null", "-q", "4096"])).unwrap().queues, 4096);
    }

    #[test]
    fn file_options_belong_to_the_file_backend() {
        let cases: [(&[&str], &str); 6] = [
            (&["file"], "the file backend needs --path FILE"),
            (&["ram", "--path", "/etc/passwd"], "--path is an option of the file backend, not ram"),
            (&["null", "--path", "/etc/passwd"], "--path is an option of the file backend, not null"),
            (&["null", "--direct"], "--direct is an option of the file backend"),
            (
                &["file", "--path", "/etc/passwd", "--store", "/tmp/x"],
                "--store is an option of the ram backend",
            ),
            (&["file", "--path", "/nonexistent/ublk-bench"], "give an existing regular file or block device"),
        ];
        for (argv, want) in cases {
            let err = config_from(&args(argv)).unwrap_err().to_string();
            assert!(err.contains(want), "add {}: {err}", argv.join(" "));
        }
    }

    #[test]
    fn a_file_is_checked_and_sized_without_being_touched() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let err = config_from(&args(&["file", "--path", d])).unwrap_err().to_string();
        assert!(err.contains("is a directory"), "{err}");
        let tiny = dir.path().join("tiny");
        std::fs::write(&tiny, [7u8; 100]).unwrap();
        let err = config_from(&args(&["file", "--path", tiny.to_str().unwrap()])).unwrap_err().to_string();
        assert!(err.contains("holds 100 bytes, less than one 512-byte block"), "{err}");
        let img = dir.path().join("img");
        std::fs::write(&img, vec![5u8; (1 << 20) + 700]).unwrap();
        let p = img.to_str().unwrap();
        let cfg = config_from(&args(&["file", "--path", p])).unwrap();
        assert_eq!(
            (cfg.size, &cfg.store, cfg.store_created),
            ((1 << 20) + 512, &None, false),
            "tail cut to a block"
        );
        assert_eq!(cfg.path, Some(img.canonicalize().unwrap()));
        assert!(backend::of(cfg.backend).validate(&cfg).is_ok());
        let cfg = config_from(&args(&["file", "--path", p, "--size", "4k"])).unwrap();
        assert_eq!(cfg.size, 4096);
        let err = config_from(&args(&["file", "--path", p, "--size", "2M"])).unwrap_err().to_string();
        assert!(err.contains("--size 2097152 exceeds") && err.contains("give at most 1049276"), "{err}");
        assert_eq!(std::fs::read(&img).unwrap(), vec![5u8; (1 << 20) + 700], "the file is left as it was");
    }

    /// A read-only file is refused before anything else happens. As root,
    /// mode bits do not stop a write, so the file is a read-only sysfs
    /// attribute (0444 there holds for root too); otherwise a file of mode 0444.
    #[test]
    fn a_read_only_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o444)).unwrap();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let ro = match root {
            true => std::path::PathBuf::from("/sys/kernel/uevent_seqnum"),
            false => img,
        };
        assert!(ro.exists(), "{} is missing", ro.display());
        let err = config_from(&args(&["file", "--path", ro.to_str().unwrap(), "-b", "4096"])).unwrap_err();
        let err = err.to_string();
        assert!(err.contains("cannot be opened read-write") && err.contains("writes to it"), "{err}");
    }
}
