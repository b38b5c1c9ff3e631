//! Command-line arguments, following ublksrv/rublk habits: `-n` device id,
//! `-q` queues, `-d` depth, `-a` all. `main` only parses and dispatches.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::backend::{self, Options};
use crate::config::{self as config, BackendKind, CopyMode, check_depth, check_queues, parse_size};
use crate::cpus::parse_cpus;
use crate::emulate::{self, Emulation, FailRule, Latency};
use crate::error::{Error, Result};
use crate::integrity::{Integrity, PiFormat};
use crate::io_scheduler::{SchedulerChoice, parse_scheduler};

/// A whole `--cpus` list: an alias, so clap takes the parser's Vec as one value.
pub type CpuList = Vec<usize>;

#[derive(Debug, Parser)]
#[command(
    name = "ublk-bench",
    version,
    about = "A ublk server built to be measured: IOPS, latency and crash-recovery downtime"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the UBLK_F_* features of the running kernel.
    Features {
        /// Print the flags and copy modes as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a device and serve it (daemonized unless --foreground).
    Add(AddArgs),
    /// List devices.
    List {
        /// Only this device id (default: every device).
        #[arg(short = 'n', long = "number")]
        id: Option<u32>,
        /// Print a JSON array instead of the ublksrv-style dump.
        #[arg(long)]
        json: bool,
    },
    /// Delete a device (-n ID) or all of them (-a).
    Del(DelArgs),
    /// Serve a device again after its server died (needs -r at add time).
    Recover {
        /// Id of the device whose server died (QUIESCED or FAIL_IO).
        #[arg(short = 'n', long = "number")]
        id: u32,
    },
    /// Planned handover: the server drains and exits, a new one takes over (6.16+;
    /// a --batch device with -i is handed over by SIGKILL: see docs/recovery.md).
    Restart {
        /// Id of the LIVE device to hand over to a new server.
        #[arg(short = 'n', long = "number")]
        id: u32,
    },
    /// Change a LIVE device's size while it is served (UPDATE_SIZE, 6.16): null, ram (the store
    /// grows or shrinks, data below the new size kept) and file (up to the file's size).
    Resize {
        /// Id of the device.
        #[arg(short = 'n', long = "number")]
        id: u32,
        /// The new size, e.g. 512M or 2G: a multiple of the device's block size.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Per-queue and merged server-side statistics of a device.
    Stats {
        /// Id of the device to report on.
        #[arg(short = 'n', long = "number")]
        id: u32,
        /// Print per-queue and merged figures as JSON.
        #[arg(long)]
        json: bool,
        /// How long to watch for IOPS, MB/s and the window's service times, e.g. 1s, 250ms; 0 reads the
        /// counts at once (rates 0, service times over the server's life).
        #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = crate::cmd::stats::parse_window)]
        window: std::time::Duration,
    },
    /// Recovery-downtime run: drive a device, SIGKILL its server N times, measure the gap.
    Downtime(DowntimeArgs),
    /// Internal: a daemonized server (new device, or --recover ID).
    #[command(name = "__serve", hide = true)]
    Serve(ServeArgs),
    /// Internal: the supervisor started by `add --supervise/--standby`.
    #[command(name = "__supervise", hide = true)]
    Supervise {
        #[arg(long)]
        config: String,
        #[arg(long)]
        standby: bool,
        #[arg(long)]
        notify_fd: i32,
    },
}

/// `add --help`, after the options: where queue threads run and why.
const PLACEMENT_HELP: &str = "\
CPU placement (without --cpus): each queue thread is pinned to the last online CPU of the \
queue's affinity set (GET_QUEUE_AFFINITY), away from CPU 0 where clients tend to start; with one \
queue on two CPUs that is CPU 1. Queues whose set has no online CPU (more queues than online CPUs) \
take the online CPUs round robin and share them; with --poll, add warns that spinning threads share \
a CPU. With --cpus LIST queue q runs on LIST[q % len]; a recovery that finds that CPU offline \
falls back to the rule above, with a warning. With --threads N, thread t takes LIST[t % len]; \
without --cpus the n-th thread of a queue takes the n-th online CPU of its set, from the last.

I/O scheduler: the device's queue is put on `none` once it starts (a ublk server does its own \
queueing; mq-deadline costs a quarter of the throughput); --scheduler keep leaves the kernel's choice.";

#[derive(Debug, Args)]
#[command(after_help = PLACEMENT_HELP)]
pub struct AddArgs {
    /// Backend: null (ublk cost alone), ram (shared-memory store that survives a crash), file (a file or
    /// block device, like loop) or nvme (passthrough).
    #[arg(value_enum)]
    pub backend: BackendKind,
    /// Device id; -1 or absent lets the kernel pick.
    #[arg(short = 'n', long = "number", allow_negative_numbers = true)]
    pub id: Option<i64>,
    #[command(flatten)]
    pub queue: QueueArgs,
    /// CPUs for the queue threads, e.g. 0,1 or 0-3 (queue q on the (q % len)-th); default: the last
    /// online CPU of each queue's kernel affinity set (see below).
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<CpuList>,
    /// Busy-poll the queue rings instead of sleeping in io_uring_enter.
    #[arg(long)]
    pub poll: bool,
    /// Device size, e.g. 256M or 1G (default: null 250G, ram 256M).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// RAM store file (ram only; default /dev/shm/ublk-bench-<id>). It must not exist: ublk-bench
    /// creates it (mode 0600) and `del` removes it.
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Serve an existing --store file and keep its contents (a store from an earlier device); its size
    /// must match --size (default: the file's size). `del` leaves it in place.
    #[arg(long, requires = "store")]
    pub reuse_store: bool,
    /// ram: leave the store sparse instead of reserving all of it at `add` (fallocate). Memory is then
    /// taken as blocks are written, and a write that finds the store's file system full fails with
    /// ENOSPC (an I/O error on the device); the server keeps serving.
    #[arg(long)]
    pub sparse: bool,
    #[command(flatten)]
    pub dev_opts: DeviceOptions,
    /// Scan the device for partitions when it starts, as a disk would be. Off by default where the
    /// kernel can leave it out (UBLK_F_NO_AUTO_PART_SCAN, Linux 7.0), as `losetup` does without -P: a
    /// benchmark device's start then sends no I/O of its own, and a fresh device has no partitions.
    #[arg(long)]
    pub part_scan: bool,
    /// Stay in the foreground; SIGTERM/SIGINT stop and delete the device.
    #[arg(long)]
    pub foreground: bool,
    /// Print the device as JSON instead of the dump.
    #[arg(long)]
    pub json: bool,
    /// UBLK_F_USER_RECOVERY: the device survives a server crash.
    #[arg(short = 'r', long = "recovery")]
    pub recovery: bool,
    /// Requeue I/O that was in the dead server (USER_RECOVERY_REISSUE); implies -r.
    #[arg(short = 'i', long = "reissue")]
    pub reissue: bool,
    /// Fail new I/O fast while no server is attached (USER_RECOVERY_FAIL_IO); implies -r.
    #[arg(short = 'e', long = "fail-io")]
    pub fail_io: bool,
    /// Watch the server and recover it at once if it dies; implies -r.
    #[arg(long)]
    pub supervise: bool,
    /// Like --supervise, with a hot standby server ready to take over; implies -r.
    #[arg(long)]
    pub standby: bool,
}

/// The options of `add` that say what a device serves and how its data moves,
/// shared with `downtime` so that it can create every device `add` can.
#[derive(Debug, Clone, Args)]
pub struct DeviceOptions {
    /// File or block device the file backend serves (it must exist and open read-write; ublk-bench never
    /// creates, truncates or removes it). The size defaults to the file's.
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// file backend: open --path with O_DIRECT (no page cache); the block size becomes the file's
    /// O_DIRECT alignment where that is larger.
    #[arg(long)]
    pub direct: bool,
    /// NVMe namespace for the nvme backend: /dev/ngXnY (or /dev/nvmeXnY).
    #[arg(long)]
    pub dev: Option<PathBuf>,
    /// Logical block size in bytes.
    #[arg(short = 'b', long = "block-size", default_value_t = 512)]
    pub block_size: u32,
    /// How data moves between the bio and the server.
    #[arg(long, value_enum, default_value_t = CopyMode::Auto)]
    pub copy_mode: CopyMode,
    /// Zero copy: register each request's pages with REGISTER_IO_BUF commands
    /// even where the kernel has UBLK_F_AUTO_BUF_REG (6.15 behaviour; for comparing).
    #[arg(long)]
    pub explicit_buf_reg: bool,
    /// Serve like a disk that takes this long per request: a fixed time (100us), a uniform range
    /// (50us-200us), or a recorded distribution (file:PATH, the JSON of `stats --json` or of fio
    /// --output-format=json); read=MODEL,write=MODEL sets reads and the rest apart. Requests
    /// complete when due, not in order of arrival.
    #[arg(long, value_name = "MODEL", value_parser = parse_latency, allow_hyphen_values = true)]
    pub latency: Option<LatencyArg>,
    /// Fail requests on purpose: rate=FRACTION,op=read|write|flush|discard|write-zeroes,
    /// lba=START-END (sectors),err=EIO|ENOSPC|ENODATA|ETIMEDOUT|ENOLINK|EREMOTEIO|EILSEQ|EOPNOTSUPP|EBADE,
    /// after=N (the first N matching requests pass); each key optional, the rule repeatable. Failed
    /// requests never reach the backend and count in `stats` as errors.
    #[arg(long = "fail", value_name = "RULE", value_parser = emulate::fail::parse)]
    pub fail: Vec<FailRule>,
    /// ram and null: protection information (UBLK_F_INTEGRITY, Linux 7.0): t10dif-type1,
    /// t10dif-type3, nvme-type1 or nvme-type3 (type 1 checks the reference tag). The block layer
    /// generates it on write and verifies it on read; ram keeps it beside the data in its store,
    /// null returns unwritten metadata (not checked). Data moves by user copy.
    #[arg(long, value_name = "FORMAT", value_parser = PiFormat::parse)]
    pub integrity: Option<PiFormat>,
    /// --integrity: metadata bytes per logical block, 8 or 16 (default: the PI tuple's size, 8 for
    /// t10dif and 16 for nvme).
    #[arg(long, value_name = "BYTES", requires = "integrity")]
    pub metadata_size: Option<u8>,
}

/// `--latency` as given (so `downtime` can pass it on) and as parsed.
#[derive(Debug, Clone)]
pub struct LatencyArg {
    pub text: String,
    pub model: Latency,
}

fn parse_latency(s: &str) -> std::result::Result<LatencyArg, String> {
    Ok(LatencyArg { text: s.to_string(), model: emulate::latency::parse(s)? })
}

impl DeviceOptions {
    /// What the device emulates, as its settings keep it.
    pub fn emulation(&self) -> Emulation {
        Emulation { latency: self.latency.as_ref().map(|l| l.model.clone()), fail: self.fail.clone() }
    }

    /// The device's protection information, checked.
    pub fn integrity(&self) -> Result<Option<Integrity>> {
        self.integrity.map(|f| Integrity::new(f, self.metadata_size)).transpose()
    }

    /// The checks that need neither the driver nor the file: each option
    /// belongs to the backend, the copy mode fits it, and what it needs is
    /// given. Opening --path or --dev is left to `add`.
    pub fn check(&self, backend: BackendKind) -> Result<()> {
        backend::check_options(backend::of(backend), &self.options(None))
    }

    /// The backend options among these, with `--size` as given (`add`
    /// adds its store options).
    pub fn options(&self, size: Option<u64>) -> Options<'_> {
        Options {
            size,
            path: self.path.as_deref(),
            direct: self.direct,
            dev: self.dev.as_deref(),
            copy_mode: self.copy_mode,
            explicit_buf_reg: self.explicit_buf_reg,
            integrity: self.integrity.is_some(),
            ..Options::default()
        }
    }

    /// The options set away from their defaults, as flags.
    pub fn given(&self) -> Vec<&'static str> {
        let set = [
            ("--path", self.path.is_some()),
            ("--direct", self.direct),
            ("--dev", self.dev.is_some()),
            ("--block-size", self.block_size != 512),
            ("--copy-mode", self.copy_mode != CopyMode::Auto),
            ("--explicit-buf-reg", self.explicit_buf_reg),
            ("--latency", self.latency.is_some()),
            ("--fail", !self.fail.is_empty()),
            ("--integrity", self.integrity.is_some()),
            ("--metadata-size", self.metadata_size.is_some()),
        ];
        set.iter().filter(|(_, on)| *on).map(|(flag, _)| *flag).collect()
    }
}

/// Queue count and depth of a device, as `add` and `downtime` take them
/// (`downtime` words the help for the device it creates).
#[derive(Debug, Clone, Args)]
pub struct QueueArgs {
    /// Hardware queues (one pinned thread each), 1 to 4096; the kernel makes at most one per
    /// possible CPU.
    #[arg(short = 'q', long = "queues", default_value_t = 1)]
    pub queues: u32,
    /// Queue depth (tags per queue).
    #[arg(short = 'd', long = "depth", default_value_t = 128)]
    pub depth: u32,
    /// Threads serving the device's tags [default: one per queue]. More threads than queues split
    /// each queue's tags into contiguous ranges over threads t = q, q+Q, ...; fewer serve whole
    /// queues round robin (q % N). Each thread is pinned as a queue thread is. N != queues needs
    /// UBLK_F_PER_IO_DAEMON (Linux 6.16+) and cannot be used with --batch.
    #[arg(long, value_name = "N")]
    pub threads: Option<u16>,
    /// I/O scheduler of the device's queue, set once it starts: `keep` leaves the kernel's choice
    /// (mq-deadline for one queue), a NAME must be one the kernel offers.
    #[arg(long, value_name = "keep|NAME", value_parser = parse_scheduler, default_value = "none")]
    pub scheduler: SchedulerChoice,
    /// Batch I/O (UBLK_F_BATCH_IO, Linux 7.0+): each queue takes requests as arrays of tags from one
    /// multishot FETCH and commits them in one command per pass; refused where the kernel lacks it.
    #[arg(long)]
    pub batch: bool,
    /// Blocking queues (not --poll): after a pass that took two or more separate deliveries, a queue
    /// waits up to USEC microseconds for a second one before it serves again (io_uring min_wait,
    /// Linux 6.12+), so one io_uring_enter takes several; otherwise it returns on the first, so a
    /// lone request never waits. 0: always on the first. [default: 50]
    #[arg(long, value_name = "USEC",
          value_parser = clap::value_parser!(u32).range(0..=config::GATHER_WAIT_MAX_US as i64))]
    pub gather_wait: Option<u32>,
    /// Server-side statistics for `ublk-bench stats`: `off` leaves the queue loop without
    /// clock reads or per-request counting (only io_uring_enter calls are counted).
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub stats: OnOff,
}

/// A setting that is on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

impl QueueArgs {
    /// Queues and depth, each within what the machine and the driver
    /// allow, and `--threads` against them.
    pub fn checked(&self) -> Result<(u16, u16)> {
        let (queues, depth) = (check_queues(self.queues)?, check_depth(self.depth)?);
        if let Some(n) = self.threads {
            crate::layout::check_threads(n, queues, depth)?;
        }
        Ok((queues, depth))
    }

    /// `--gather-wait` or its default; refused with --poll, whose queues
    /// never sleep.
    pub fn gather_wait_us(&self, poll: bool) -> Result<u32> {
        match (self.gather_wait, poll) {
            (Some(_), true) => Err(Error::invalid(
                "--gather-wait is for blocking queues; a --poll queue never waits: drop one of them",
            )),
            (w, _) => Ok(w.unwrap_or(config::GATHER_WAIT_US)),
        }
    }
}

/// How a crashed server is brought back during a downtime run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecoverMethod {
    Recover,
    Supervise,
    Standby,
    Restart,
}

#[derive(Debug, Clone, Args)]
#[command(
    mut_arg("queues", |a| a.help("Queues of the device to create")),
    mut_arg("depth", |a| a.help("Queue depth of the device to create")),
    mut_arg("block_size", |a| a.help("Logical block size of the device to create (the client's is --bs)"))
)]
pub struct DowntimeArgs {
    /// Create the device with this id (refused if it exists); with --reuse,
    /// measure this existing device instead.
    #[arg(short = 'n', long = "number")]
    pub id: Option<u32>,
    /// Measure the existing device given with -n (it must be LIVE and recoverable)
    /// instead of creating one; it is left in place afterwards.
    #[arg(long, requires = "id")]
    pub reuse: bool,
    /// Backend of the device to create.
    #[arg(long, value_enum, default_value_t = BackendKind::Ram)]
    pub backend: BackendKind,
    /// Size of the device to create (default: 256M for null and ram, the whole --path or --dev for
    /// file and nvme).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// RAM store file of the device to create (default /dev/shm/ublk-bench-<id>). On a tmpfs
    /// mounted with huge=within_size a killed server exits, and so hands over, sooner.
    #[arg(long)]
    pub store: Option<PathBuf>,
    #[command(flatten)]
    pub dev_opts: DeviceOptions,
    #[command(flatten)]
    pub queue: QueueArgs,
    /// Create the device with busy-polling queue threads.
    #[arg(long)]
    pub poll: bool,
    /// Recovery flavour of the created device: reissue (-r -i), plain (-r) or fail-io (-r -e).
    #[arg(long, default_value = "reissue")]
    pub recovery: String,
    /// How the server comes back: `recover` (this run calls `ublk-bench recover`
    /// after the kill), `supervise` (cold restart by the supervisor), `standby`
    /// (hot standby takes over), `restart` (planned handover with QUIESCE_DEV; a
    /// `--batch` device with -i is handed over by SIGKILL, see `restart --help`).
    #[arg(long, value_enum, default_value_t = RecoverMethod::Supervise)]
    pub method: RecoverMethod,
    /// With `--method recover` on a `--reuse` device: the shell command that brings the server back
    /// after the kill, instead of `ublk-bench recover -n ID`. For measuring another ublk server
    /// (e.g. kublk) the same way: its server is whichever process holds /dev/ublkcN.
    #[arg(long, requires = "reuse")]
    pub recover_cmd: Option<String>,
    /// Crash cycles.
    #[arg(long, default_value_t = 10)]
    pub cycles: u32,
    /// Time between kills, e.g. 2s or 500ms.
    #[arg(long, default_value = "2s")]
    pub interval: String,
    /// Client read percentage (100 = randread, 0 = randwrite).
    #[arg(long, default_value_t = 100)]
    pub rwmix: u32,
    /// Client block size.
    #[arg(long, value_parser = parse_size, default_value = "4k")]
    pub bs: u64,
    /// Client iodepth per job.
    #[arg(long, default_value_t = 16)]
    pub iodepth: u32,
    /// Client jobs (threads, one io_uring each).
    #[arg(long, default_value_t = 1)]
    pub jobs: u32,
    /// Where downtime-<UTC>.json, .csv and .svg go.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// Split each gap into kernel-side phases with tracefs and kprobes, and refuse to run where
    /// they are missing (not root, no tracefs, no CONFIG_KPROBE_EVENTS). Without --trace the run
    /// traces whenever it can and says in the JSON why not when it cannot.
    #[arg(long, conflicts_with = "no_trace")]
    pub trace: bool,
    /// Do not trace, even where tracefs is available.
    #[arg(long)]
    pub no_trace: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[arg(long)]
    pub config: Option<String>,
    #[arg(long)]
    pub recover: Option<u32>,
    #[arg(long, default_value = "recover")]
    pub method: String,
    #[arg(long)]
    pub crash_seen_ns: Option<u64>,
    #[arg(long, requires = "watch_start")]
    pub watch_pid: Option<i32>,
    /// Start time (clock ticks after boot) of --watch-pid's process, so a reused pid is not mistaken for it.
    #[arg(long, requires = "watch_pid")]
    pub watch_start: Option<u64>,
    #[arg(long)]
    pub notify_fd: i32,
}

#[derive(Debug, Args)]
pub struct DelArgs {
    #[command(flatten)]
    pub which: DelWhich,
    /// Delete even a device that is open (mounted, or held by a process such as fio): its I/O fails.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct DelWhich {
    /// The device to delete.
    #[arg(short = 'n', long = "number")]
    pub id: Option<u32>,
    /// Every ublk device on the machine, one after the other.
    #[arg(short = 'a', long = "all")]
    pub all: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ublk-bench").chain(args.iter().copied()))
    }

    #[test]
    fn add_takes_the_ublksrv_style_flags() {
        let cli = parse(&[
            "add", "ram", "-n", "3", "-q", "2", "-d", "64", "--cpus", "0-1", "--size", "64M", "-r", "-i",
        ])
        .unwrap();
        let Command::Add(a) = cli.cmd else { panic!("not add") };
        assert_eq!((a.id, a.queue.queues, a.queue.depth), (Some(3), 2, 64));
        assert_eq!(a.queue.stats, OnOff::On, "stats are on by default");
        assert_eq!(a.cpus, Some(vec![0, 1]));
        assert_eq!(a.size, Some(64 << 20));
        assert!(a.recovery && a.reissue && !a.fail_io);
        assert_eq!(a.queue.scheduler, SchedulerChoice(Some("none".into())), "none by default");
        assert!(!a.queue.batch);
        let Command::Add(a) = parse(&["add", "null", "--batch"]).unwrap().cmd else { panic!("not add") };
        assert!(a.queue.batch);
        let Command::Downtime(d) = parse(&["downtime", "--batch"]).unwrap().cmd else {
            panic!("not downtime")
        };
        assert!(d.queue.batch);
    }

    /// `--gather-wait`: 50 µs by default, 0 to 10 ms, refused with --poll.
    #[test]
    fn gather_wait_is_bounded_and_for_blocking_queues() {
        let wait = |args: &[&str]| match parse(args).map(|c| c.cmd) {
            Ok(Command::Add(a)) => a.queue.gather_wait_us(a.poll).map_err(|e| e.to_string()),
            Ok(_) => panic!("not add"),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(wait(&["add", "null"]), Ok(config::GATHER_WAIT_US));
        assert_eq!(wait(&["add", "null", "--poll"]), Ok(config::GATHER_WAIT_US), "unused, but not refused");
        assert_eq!(wait(&["add", "null", "--batch", "--gather-wait", "0"]), Ok(0));
        assert_eq!(wait(&["add", "null", "--gather-wait", "10000"]), Ok(10_000));
        let e = wait(&["add", "null", "--gather-wait", "10001"]).unwrap_err();
        assert!(e.contains("10000"), "{e}");
        let e = wait(&["add", "null", "--poll", "--gather-wait", "20"]).unwrap_err();
        assert!(e.contains("--gather-wait") && e.contains("--poll"), "{e}");
    }

    #[test]
    fn stats_window_is_one_second_unless_told() {
        let window = |args: &[&str]| match parse(args).unwrap().cmd {
            Command::Stats { window, .. } => window,
            _ => panic!("not stats"),
        };
        assert_eq!(window(&["stats", "-n", "1"]), std::time::Duration::from_secs(1));
        assert_eq!(window(&["stats", "-n", "1", "--window", "0"]), std::time::Duration::ZERO);
        assert!(parse(&["stats", "-n", "1", "--window", "soon"]).is_err());
    }

    #[test]
    fn stats_take_on_or_off() {
        let Command::Add(a) = parse(&["add", "null", "--stats", "off"]).unwrap().cmd else {
            panic!("not add")
        };
        assert_eq!(a.queue.stats, OnOff::Off);
        assert!(parse(&["add", "null", "--stats", "maybe"]).is_err());
        assert!(parse(&["downtime", "--stats", "off"]).is_ok());
    }

    #[test]
    fn scheduler_is_a_queue_option_of_add_and_downtime() {
        let Command::Add(a) = parse(&["add", "null", "--scheduler", "keep"]).unwrap().cmd else { panic!() };
        assert_eq!(a.queue.scheduler, SchedulerChoice(None));
        let Command::Downtime(d) = parse(&["downtime", "--scheduler", "kyber"]).unwrap().cmd else {
            panic!()
        };
        assert_eq!(d.queue.scheduler.to_string(), "kyber");
        let err = parse(&["add", "null", "--scheduler", "No/Such"]).unwrap_err().to_string();
        assert!(err.contains("not an I/O scheduler name"), "{err}");
    }

    #[test]
    fn bad_input_is_refused_by_the_parser() {
        assert!(parse(&["add", "foo"]).is_err());
        assert!(parse(&["add", "ram", "--size", "12x"]).is_err());
        assert!(parse(&["add", "null", "--cpus", "a"]).is_err());
        assert!(parse(&["del"]).is_err());
        assert!(parse(&["del", "-n", "1", "-a"]).is_err());
    }

    /// `--help` of every visible subcommand explains each of its options.
    #[test]
    fn every_visible_argument_has_help() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let mut missing = Vec::new();
        for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
            for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
                if arg.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
                    missing.push(format!("{} {}", sub.get_name(), arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "arguments without help text: {missing:?}");
        assert!(cli.get_subcommands().filter(|s| !s.is_hide_set()).count() >= 8, "subcommands went missing");
    }

    #[test]
    fn del_and_list_parse() {
        let Command::Del(d) = parse(&["del", "-a", "--force"]).unwrap().cmd else { panic!("not del") };
        assert!(d.which.all && d.force && d.which.id.is_none());
        assert!(matches!(parse(&["list", "--json"]).unwrap().cmd, Command::List { json: true, .. }));
    }
}
