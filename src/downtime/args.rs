//! The run's arguments, checked before any device exists: durations,
//! recovery flavours, bounds, the device to create or reuse, the client's
//! memory and the output directory.

use std::path::Path;
use std::time::Duration;

use crate::backend;
use crate::cli::{DowntimeArgs, RecoverMethod};
use crate::config::{self, Recovery};
use crate::error::{Error, Result};

/// The longest run the per-millisecond buckets cover (1 h).
const MAX_BUCKETS: usize = 3_600_000;

/// `2s`, `500ms`, `1.5s`, `250us`, `1m`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || Error::invalid(format!("'{s}' is not a duration: write e.g. 2s, 500ms or 1.5s"));
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        "m" | "min" => n * 60.0,
        _ => return Err(bad()),
    };
    if !secs.is_finite() || secs <= 0.0 || secs > 86_400.0 {
        return Err(Error::invalid(format!(
            "--interval {s} is out of range: give more than 0 and at most a day"
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The recovery of a flavour's name.
pub(super) fn recovery_of(name: &str) -> Result<Recovery> {
    Ok(match name {
        "reissue" => Recovery::Reissue,
        "plain" => Recovery::Plain,
        "fail-io" | "fail_io" | "failio" => Recovery::FailIo,
        _ => {
            return Err(Error::invalid(format!(
                "--recovery {name} is unknown: use reissue (-r -i), plain (-r) or fail-io (-r -e)"
            )));
        }
    })
}

/// Most crash cycles a run takes: the per-cycle records are sized by it.
const MAX_CYCLES: u32 = 10_000;
/// Most memory the client may allocate: I/O buffers plus per-ms buckets.
const MAX_CLIENT_BYTES: u64 = 1 << 30;

/// Every check that needs no driver, so that bad input is refused before
/// a device exists (nothing here may leave one behind).
pub(super) fn validate(a: &DowntimeArgs) -> Result<Duration> {
    let interval = parse_duration(&a.interval)?;
    recovery_of(&a.recovery)?;
    if a.cycles == 0 || a.cycles > MAX_CYCLES {
        return Err(Error::invalid(format!(
            "--cycles {} is out of range: give 1..{MAX_CYCLES} (split longer runs)",
            a.cycles
        )));
    }
    if a.rwmix > 100 {
        return Err(Error::invalid(format!(
            "--rwmix {} is out of range: give a read percentage 0..100",
            a.rwmix
        )));
    }
    if a.bs < 512 || !a.bs.is_multiple_of(512) || a.bs > 1 << 20 {
        return Err(Error::invalid(format!("--bs {} must be a multiple of 512 between 512 and 1M", a.bs)));
    }
    if a.iodepth == 0 || a.iodepth > 4096 {
        return Err(Error::invalid(format!("--iodepth {} is out of range: give 1..4096", a.iodepth)));
    }
    if a.jobs == 0 || a.jobs > 256 {
        return Err(Error::invalid(format!("--jobs {} is out of range: give 1..256", a.jobs)));
    }
    check_client_memory(a, interval)?;
    check_recover_cmd(a)?;
    match a.reuse {
        true => check_reuse(a)?,
        false => validate_new_device(a)?,
    }
    Ok(interval)
}

/// `--reuse` measures a device as it was added: options that describe a
/// device to create would be silently ignored, so they are refused.
fn check_reuse(a: &DowntimeArgs) -> Result<()> {
    let given = a.dev_opts.given();
    if given.is_empty() {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{} describe the device to create, but --reuse measures device {} as it was added: \
         drop them, or drop --reuse (and -n of an existing device) to create one",
        given.join(", "),
        a.id.map_or("-n".into(), |id| id.to_string())
    )))
}

/// `--recover-cmd` replaces `ublk-bench recover`, so it needs that method.
fn check_recover_cmd(a: &DowntimeArgs) -> Result<()> {
    match &a.recover_cmd {
        Some(c) if c.trim().is_empty() => {
            Err(Error::invalid("--recover-cmd is empty: give the command that recovers the device"))
        }
        Some(_) if a.method != RecoverMethod::Recover => Err(Error::invalid(format!(
            "--recover-cmd replaces `ublk-bench recover`: it needs --method recover, not {:?}",
            a.method
        ))),
        _ => Ok(()),
    }
}

/// Size of a null or ram device when --size is not given.
const DEFAULT_SIZE: u64 = 256 << 20;

/// The size the run asks `add` for: a backend that sizes its device
/// itself (null, ram) gets DEFAULT_SIZE unless told; one that serves a file
/// or namespace serves all of it unless told.
pub(super) fn device_size(a: &DowntimeArgs) -> Option<u64> {
    match backend::of(a.backend).default_size() {
        Some(_) => Some(a.size.unwrap_or(DEFAULT_SIZE)),
        None => a.size,
    }
}

/// The settings of the device the run creates, checked as `add` checks
/// them. `add` itself probes --path and --dev again, fully.
fn validate_new_device(a: &DowntimeArgs) -> Result<()> {
    if let Some(id) = a.id.filter(|&id| id >= 1 << 20) {
        return Err(Error::invalid(format!("device id {id} is out of range: give -n between 0 and 1048575")));
    }
    a.queue.checked()?;
    a.queue.gather_wait_us(a.poll)?;
    a.dev_opts.check(a.backend)?;
    // A file or namespace is sized, and its --size checked, by `add` against it.
    if let (Some(_), Some(size)) = (backend::of(a.backend).default_size(), device_size(a))
        && !((config::MIN_SIZE..=config::MAX_SIZE).contains(&size) && size.is_multiple_of(512))
    {
        return Err(Error::invalid(format!(
            "--size {size} is out of range: give a multiple of 512 between 1M and 1P"
        )));
    }
    check_exists(a)
}

/// A missing --path or --dev is refused here, before the run sets up
/// tracing; `add` checks the rest (type, read-write, size) before it makes
/// the device.
fn check_exists(a: &DowntimeArgs) -> Result<()> {
    let opts = &a.dev_opts;
    let given = [
        (
            "--path",
            &opts.path,
            "an existing regular file or block device (`truncate -s 1G FILE` makes a file)",
        ),
        ("--dev", &opts.dev, "an existing NVMe namespace, /dev/ngXnY"),
    ];
    for (flag, p, want) in given {
        let Some(p) = p else { continue };
        if let Err(e) = std::fs::metadata(p) {
            return Err(Error::invalid(format!("{flag} {}: {e}: give {want}", p.display())));
        }
    }
    Ok(())
}

/// Per-ms buckets each client job keeps: the run's expected length plus
/// slack for slow recoveries, at most an hour.
pub(super) fn bucket_ms(cycles: u32, interval: Duration) -> usize {
    let cycles = cycles as usize;
    let interval_ms = interval.as_millis().min(MAX_BUCKETS as u128) as usize;
    (60_000 + (cycles + 2) * interval_ms + cycles * 30_000).min(MAX_BUCKETS)
}

/// Refuses a client that would allocate more than MAX_CLIENT_BYTES.
fn check_client_memory(a: &DowntimeArgs, interval: Duration) -> Result<()> {
    let per_job = a.iodepth as u64 * a.bs + 8 * bucket_ms(a.cycles, interval) as u64;
    let total = a.jobs as u64 * per_job;
    if total > MAX_CLIENT_BYTES {
        return Err(Error::invalid(format!(
            "the client would need {} MiB (--jobs x (--iodepth x --bs + 8 bytes per ms of run)), more than {} MiB: \
             lower --jobs, --iodepth or --bs",
            total >> 20,
            MAX_CLIENT_BYTES >> 20
        )));
    }
    Ok(())
}

/// Makes `dir` and checks that a file can be written in it, before any
/// device exists; the probe file is removed again.
pub(super) fn check_out(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create --out {}", dir.display()), e))?;
    let probe = dir.join(format!(".ublk-bench-probe-{}", std::process::id()));
    std::fs::OpenOptions::new().write(true).create_new(true).open(&probe).map_err(|e| {
        Error::io(format!("--out {} is not writable (probe {})", dir.display(), probe.display()), e)
    })?;
    std::fs::remove_file(&probe).map_err(|e| Error::io(format!("remove probe {}", probe.display()), e))
}

/// `ublk-bench downtime EXTRA...` as the command line parses it (for the
/// unit tests here and in device.rs).
#[cfg(test)]
pub(super) fn args(extra: &[&str]) -> std::result::Result<DowntimeArgs, clap::Error> {
    use clap::Parser;
    let argv = ["ublk-bench", "downtime"].iter().chain(extra).copied();
    match crate::cli::Cli::try_parse_from(argv)?.cmd {
        crate::cli::Command::Downtime(a) => Ok(a),
        _ => unreachable!(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("fast").is_err());
    }

    fn refused(extra: &[&str]) -> String {
        let a = args(extra).unwrap_or_else(|e| panic!("downtime {extra:?} does not parse: {e}"));
        validate(&a).map(|_| ()).unwrap_err().to_string()
    }

    #[test]
    fn every_argument_is_bounded_before_any_device() {
        assert!(validate(&args(&[]).unwrap()).is_ok());
        let cases: [(&[&str], &str); 21] = [
            (&["--cycles", "4000000000"], "--cycles 4000000000 is out of range"),
            (&["--cycles", "0"], "--cycles 0 is out of range"),
            (&["--interval", "0s"], "--interval"),
            (&["--interval", "soon"], "not a duration"),
            (&["--jobs", "0"], "--jobs 0"),
            (&["--iodepth", "5000"], "--iodepth 5000"),
            (&["--bs", "1000"], "--bs 1000"),
            (&["--rwmix", "101"], "--rwmix 101"),
            (&["--jobs", "256", "--iodepth", "4096", "--bs", "1M"], "the client would need"),
            (&["-q", "70000"], "queues is out of range"),
            (&["--size", "1000"], "--size 1000 is out of range"),
            (&["--backend", "nvme"], "the nvme backend needs --dev /dev/ngXnY"),
            (&["--backend", "file"], "the file backend needs --path FILE"),
            (&["--path", "/etc/passwd"], "--path is an option of the file backend, not ram"),
            (&["--backend", "null", "--direct"], "--direct is an option of the file backend, not null"),
            (&["--dev", "/dev/ng0n1"], "--dev is an option of the nvme backend, not ram"),
            (
                &["--backend", "file", "--path", "/etc/passwd", "--dev", "/dev/ng0n1"],
                "--dev is an option of the nvme backend, not file",
            ),
            (&["--backend", "file", "--path", "/etc/passwd", "--copy-mode", "user"], "user copy would add"),
            (&["--backend", "null", "--explicit-buf-reg"], "--explicit-buf-reg applies to zero copy"),
            (&["--backend", "file", "--path", "/nonexistent/dt"], "--path /nonexistent/dt: No such file"),
            (&["--backend", "nvme", "--dev", "/nonexistent/ng9n9"], "give an existing NVMe namespace"),
        ];
        for (extra, want) in cases {
            let err = refused(extra);
            assert!(err.contains(want), "downtime {extra:?}: {err}");
        }
        assert!(refused(&["-n", "2000000"]).contains("-n between 0 and 1048575"));
    }

    /// `--reuse` measures a device as it is: the options that would shape a
    /// new one are refused, not ignored.
    #[test]
    fn reuse_refuses_the_options_of_a_device_to_create() {
        let cases: [(&[&str], &str); 3] = [
            (&["--path", "/etc/passwd"], "--path describe the device to create"),
            (&["--copy-mode", "user", "--explicit-buf-reg"], "--copy-mode, --explicit-buf-reg describe"),
            (&["--dev", "/dev/ng0n1", "--direct", "-b", "4096"], "--direct, --dev, --block-size describe"),
        ];
        for (extra, want) in cases {
            let argv: Vec<&str> = ["--reuse", "-n", "3"].iter().chain(extra).copied().collect();
            let err = refused(&argv);
            assert!(err.contains(want) && err.contains("drop them"), "downtime {argv:?}: {err}");
        }
        assert!(validate(&args(&["--reuse", "-n", "3", "--copy-mode", "auto"]).unwrap()).is_ok());
    }

    #[test]
    fn reuse_needs_an_id_and_skips_the_creation_checks() {
        assert!(args(&["--reuse"]).is_err(), "--reuse without -n parsed");
        let a = args(&["--reuse", "-n", "3", "--backend", "nvme"]).unwrap();
        assert!(a.reuse && a.id == Some(3));
        assert!(validate(&a).is_ok());
    }

    #[test]
    fn recover_cmd_needs_reuse_and_the_recover_method() {
        assert!(args(&["--recover-cmd", "true"]).is_err(), "--recover-cmd without --reuse parsed");
        let ok = args(&["--reuse", "-n", "3", "--method", "recover", "--recover-cmd", "kublk recover"]);
        assert!(validate(&ok.unwrap()).is_ok());
        let err = refused(&["--reuse", "-n", "3", "--method", "standby", "--recover-cmd", "x"]);
        assert!(err.contains("needs --method recover"), "{err}");
        let err = refused(&["--reuse", "-n", "3", "--method", "recover", "--recover-cmd", " "]);
        assert!(err.contains("--recover-cmd is empty"), "{err}");
    }

    #[test]
    fn out_is_created_and_probed_without_leaving_the_probe() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("a/b");
        check_out(&out).unwrap();
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "probe left behind");
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = check_out(&file.join("sub")).unwrap_err().to_string();
        assert!(err.contains("--out"), "{err}");
    }

    #[test]
    fn recovery_names() {
        assert_eq!(recovery_of("reissue").unwrap(), Recovery::Reissue);
        assert_eq!(recovery_of("plain").unwrap(), Recovery::Plain);
        assert_eq!(recovery_of("fail-io").unwrap(), Recovery::FailIo);
        assert!(recovery_of("magic").is_err());
    }
}
