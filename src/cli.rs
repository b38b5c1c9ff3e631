//! Command-line arguments, following ublksrv/rublk habits: `-n` device id,
//! `-q` queues, `-d` depth, `-a` all. `main` only parses and dispatches.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{parse_cpus, parse_size, BackendKind, CopyMode};

#[derive(Debug, Parser)]
#[command(name = "ublk-bench", version, about = "A ublk server built to be measured: IOPS, latency and crash-recovery downtime")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the UBLK_F_* features of the running kernel.
    Features {
        #[arg(long)]
        json: bool,
    },
    /// Create a device and serve it (daemonized unless --foreground).
    Add(AddArgs),
    /// List devices.
    List {
        #[arg(short = 'n', long = "number")]
        id: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a device (-n ID) or all of them (-a).
    Del(DelArgs),
    /// Internal: the daemonized server started by `add`.
    #[command(name = "__serve", hide = true)]
    Serve {
        #[arg(long)]
        config: String,
        #[arg(long)]
        notify_fd: i32,
    },
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Backend: null (ublk cost alone) or ram (shared-memory store that survives a crash).
    #[arg(value_enum)]
    pub backend: BackendKind,
    /// Device id; -1 or absent lets the kernel pick.
    #[arg(short = 'n', long = "number", allow_negative_numbers = true)]
    pub id: Option<i64>,
    /// Hardware queues (one pinned thread each).
    #[arg(short = 'q', long = "queues", default_value_t = 1)]
    pub queues: u32,
    /// Queue depth (tags per queue).
    #[arg(short = 'd', long = "depth", default_value_t = 128)]
    pub depth: u32,
    /// CPUs for the queue threads, e.g. 0,1 or 0-3; default: the kernel's queue affinity.
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<Vec<usize>>,
    /// Busy-poll the queue rings instead of sleeping in io_uring_enter.
    #[arg(long)]
    pub poll: bool,
    /// Device size, e.g. 256M or 1G (default: null 250G, ram 256M).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// RAM store file (default /dev/shm/ublk-bench-<id>).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Logical block size in bytes.
    #[arg(short = 'b', long = "block-size", default_value_t = 512)]
    pub block_size: u32,
    /// How data moves between the bio and the server.
    #[arg(long, value_enum, default_value_t = CopyMode::Auto)]
    pub copy_mode: CopyMode,
    /// Stay in the foreground; SIGTERM/SIGINT stop and delete the device.
    #[arg(long)]
    pub foreground: bool,
    /// Print the device as JSON instead of the dump.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct DelArgs {
    #[arg(short = 'n', long = "number")]
    pub id: Option<u32>,
    #[arg(short = 'a', long = "all")]
    pub all: bool,
}
