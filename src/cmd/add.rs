//! `add`: validate, then serve a new device in a daemon (default) or in
//! this process (`--foreground`), and print it once LIVE.

use std::path::PathBuf;
use std::time::Duration;

use crate::backend::claim::{self, Claim};
use crate::cli::{AddArgs, OnOff};
use crate::config::{self, BackendKind, DEFAULT_MAX_IO_BYTES, DeviceConfig, Recovery};
use crate::ctrl::Ctrl;
use crate::daemonize::{self, Notifier};
use crate::error::{Error, Result};
use crate::server_process;

/// How long `add` waits for the daemon: START_DEV scans partitions, which
/// is slow under software emulation.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Every check that needs no driver (`config_from`, `validate`) runs before
/// `preflight`, so bad input gets its own message on any machine.
pub fn run(args: &AddArgs) -> Result<()> {
    let cfg = config_from(args)?;
    cfg.validate()?;
    preflight(&cfg)?;
    let supervised = args.supervise || args.standby;
    if args.foreground {
        return server_process::new_device(cfg, Notifier::none(), |id| {
            crate::cmd::list::print_one(id, args.json)
        });
    }
    let dev_id = if supervised {
        let json = serde_json::to_string(&cfg).expect("config serializes");
        let mut a = vec!["__supervise".to_string(), "--config".into(), json];
        if args.standby {
            a.push("--standby".into());
        }
        daemonize::spawn_server(&a, START_TIMEOUT)?
    } else {
        daemonize::spawn_server(&daemonize::serve_args(&cfg), START_TIMEOUT)?
    };
    crate::cmd::list::print_one(dev_id, args.json)
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
    let default_size = match args.backend {
        BackendKind::Null => 250 << 30,
        BackendKind::Ram => 256 << 20,
        BackendKind::Nvme | BackendKind::File => 0,
    };
    let (store, store_size) = store_from(args)?;
    // A reused store is identified now; a new one by the server that makes it.
    let store_id = match (&store, args.reuse_store) {
        (Some(p), true) => {
            Some(claim::find(p).map_err(|e| Error::io(format!("open {}", p.display()), e))?.id)
        }
        _ => None,
    };
    let (queues, depth) = args.queue.checked()?;
    let cfg = DeviceConfig {
        dev_id,
        backend: args.backend,
        size: args.size.or(store_size).unwrap_or(default_size),
        store,
        // Only a store we make is ours to remove; `file` never makes one.
        store_created: !args.reuse_store && args.backend == BackendKind::Ram,
        path: None,
        direct: false,
        nvme_dev: None,
        backing_id: store_id,
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
        sparse: args.sparse,
        part_scan: args.part_scan,
        emulate: args.dev_opts.emulation(),
    };
    if args.sparse && args.backend != BackendKind::Ram {
        return Err(Error::invalid(format!(
            "--sparse is an option of the ram backend (its store), not {}: drop it",
            args.backend.name()
        )));
    }
    args.dev_opts.check(args.backend)?;
    match args.backend {
        BackendKind::Nvme => nvme_config(cfg, args),
        BackendKind::File => file_config(cfg, args),
        _ => Ok(cfg),
    }
}

/// The file's size by default; --size may be smaller, never larger. A block
/// device opened O_DIRECT needs requests of its own block size at least.
fn file_config(mut cfg: DeviceConfig, args: &AddArgs) -> Result<DeviceConfig> {
    let opts = &args.dev_opts;
    let path = opts.path.as_deref().expect("DeviceOptions::check wants --path for file");
    let probe = crate::backend::file::probe(path, opts.direct, cfg.block_size)?;
    if let Some(size) = args.size.filter(|&s| s > probe.size) {
        return Err(Error::invalid(format!(
            "--size {size} exceeds --path {} ({} bytes): give at most {}, or leave --size out to serve the whole file",
            probe.path.display(),
            probe.size,
            probe.size
        )));
    }
    if let Some(lbs) = probe.logical_block.filter(|&b| opts.direct && b > cfg.block_size) {
        if lbs > 4096 {
            return Err(Error::invalid(format!(
                "--direct on {} needs I/O aligned to {lbs} bytes, more than the largest block size (4096): drop --direct",
                probe.path.display()
            )));
        }
        cfg.block_size = lbs;
    }
    let bs = cfg.block_size as u64;
    // A tail shorter than a block is not served.
    cfg.size = args.size.unwrap_or(probe.size) / bs * bs;
    cfg.path = Some(probe.path);
    cfg.backing_id = Some(probe.id);
    cfg.direct = opts.direct;
    Ok(cfg)
}

/// Size, block size and request size come from the namespace.
fn nvme_config(mut cfg: DeviceConfig, args: &AddArgs) -> Result<DeviceConfig> {
    let dev = args.dev_opts.dev.as_deref().expect("DeviceOptions::check wants --dev for nvme");
    let (ns, file) = crate::backend::nvme::Namespace::probe(dev)?;
    let meta = file.metadata().map_err(|e| Error::io(format!("stat {}", ns.char_dev.display()), e))?;
    cfg.backing_id = Some(config::FileId::of(&meta));
    if args.size.is_some_and(|s| s > ns.size) {
        return Err(Error::invalid(format!("--size exceeds the namespace ({} bytes)", ns.size)));
    }
    cfg.size = args.size.unwrap_or(ns.size);
    cfg.block_size = 1 << ns.lba_shift;
    // No buffer larger than one NVMe command carries (NLB).
    cfg.max_io_bytes =
        cfg.max_io_bytes.min(ns.max_hw_bytes).min(ns.max_cmd_bytes().min(u32::MAX as u64) as u32);
    cfg.nvme_dev = Some(ns.char_dev);
    Ok(cfg)
}

/// `--store` belongs to `ram`; its path is checked and made absolute here,
/// before anything is created.
fn store_from(args: &AddArgs) -> Result<(Option<PathBuf>, Option<u64>)> {
    let Some(path) = &args.store else { return Ok((None, None)) };
    if args.backend != BackendKind::Ram {
        let hint = if args.backend == BackendKind::File { " (file serves --path)" } else { "" };
        return Err(Error::invalid(format!(
            "--store is an option of the ram backend, not {}: drop it{hint}",
            args.backend.name()
        )));
    }
    let (path, size) = crate::backend::ram::resolve_store(path, args.reuse_store, args.size)?;
    Ok((Some(path), size))
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
    if cfg.backend == BackendKind::Ram {
        check_store_space(cfg)?;
    }
    // A file, store or NVMe namespace another device serves, or a block device in use, is
    // refused here, before ADD_DEV; the server's own claim is the one that holds.
    let existing = match cfg.backend {
        BackendKind::File => cfg.path.as_deref(),
        BackendKind::Ram if !cfg.store_created => cfg.store.as_deref(),
        BackendKind::Nvme => cfg.nvme_dev.as_deref(),
        BackendKind::Null | BackendKind::Ram => None,
    };
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
    if let Some(warning) = cfg.poll_sharing(queues) {
        eprintln!("{warning}");
    }
    Ok(())
}

fn store_dir(cfg: &DeviceConfig) -> PathBuf {
    match &cfg.store {
        Some(p) => p.parent().map(PathBuf::from).unwrap_or_else(|| ".".into()),
        None => "/dev/shm".into(),
    }
}

fn check_store_space(cfg: &DeviceConfig) -> Result<()> {
    let dir = store_dir(cfg);
    let c = std::ffi::CString::new(dir.to_string_lossy().as_bytes())
        .map_err(|_| Error::invalid("bad store path"))?;
    // SAFETY: statvfs is plain data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is NUL-terminated and st is a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::io(format!("statvfs {}", dir.display()), std::io::Error::last_os_error()));
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    if cfg.size > free {
        return Err(Error::invalid(format!(
            "size {} does not fit in {} ({} bytes free): give a smaller --size or another --store",
            cfg.size,
            dir.display(),
            free
        )));
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
        assert!(cfg.validate().is_ok());
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
