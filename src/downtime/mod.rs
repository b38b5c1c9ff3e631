//! `downtime`: the recovery-downtime run.
//!
//! 1. Make a device (`add ram -r -i`, plus `--supervise`/`--standby` for
//!    those methods; with `-n ID` that id) or take the one given with
//!    `--reuse -n ID`. A guard deletes what
//!    the run made, on success, error and Ctrl-C alike.
//! 2. Drive `/dev/ublkbN` with the run's own io_uring client ([`client`]).
//! 3. `--cycles` times, `--interval` after the device was last seen LIVE:
//!    publish the kill time, SIGKILL the server (or call `restart`), bring
//!    it back by the method, and wait until the device is LIVE under a new
//!    server.
//! 4. Stop the client, read the server's phase events, delete the device,
//!    and write `downtime-<UTC>.json`, `.csv` and `.svg` into `--out`.
//!
//! Add, recover, restart and del run as subprocesses of this very binary, in
//! their own process group so that a Ctrl-C reaches only this process, which
//! then finishes the step at hand and cleans up.
//!
//! The rooms: `args.rs` checks the arguments before any device exists,
//! `device.rs` takes or makes the device and deletes what it made,
//! `cycle.rs` runs the kill-and-wait loop, and `outputs.rs` builds the
//! report and writes its files; [`client`] is the I/O load, [`gap`] finds
//! the outage in it, [`trace`] reads the kernel's side, [`report`] and
//! [`plot`] format what `outputs.rs` writes.

mod args;
pub mod client;
mod cycle;
mod device;
pub mod gap;
mod outputs;
pub mod plot;
pub mod report;
pub mod trace;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use crate::cli::DowntimeArgs;
use crate::clock::now_ns;
use crate::ctrl::{self, Ctrl};
use crate::error::{Error, Result};
use crate::process;

pub use args::parse_duration;
use args::{bucket_ms, check_out, validate};
use client::{JobConfig, Shared};
use cycle::{Run, Timeline, read_events, start_trace};
use device::Device;
use outputs::{build_report, rw_name, write_outputs};

pub fn run(a: &DowntimeArgs) -> Result<()> {
    let interval = validate(a)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::NotRoot);
    }
    process::catch_interrupts();
    let exe = std::env::current_exe().map_err(|e| Error::io("find own executable", e))?;
    let mut ctrl = Ctrl::open()?;
    check_out(&a.out)?;
    let (tracer, trace_note) = start_trace(a)?;
    let unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let stamp = report::utc_stamp(unix);

    let dev = Device::acquire(a, &exe, &mut ctrl)?;
    let path = PathBuf::from(ctrl::block_path(dev.id));
    println!(
        "downtime: device {} ({}), method {:?}, {} cycle(s) every {:?}, client {} job(s) x qd{} bs {} {}",
        dev.id,
        if dev.created { "created" } else { "existing" },
        a.method,
        a.cycles,
        interval,
        a.jobs,
        a.iodepth,
        a.bs,
        rw_name(a.rwmix)
    );

    let cycles = a.cycles as usize;
    let max_ms = bucket_ms(a.cycles, interval);
    let shared = Arc::new(Shared::new(cycles, a.jobs as usize));
    let t0 = now_ns();
    let mut run = Run {
        a,
        interval,
        exe,
        dev_id: dev.id,
        shared,
        jobs: Vec::new(),
        t0,
        tl: Timeline::default(),
        tracer,
        records: Vec::new(),
    };
    let mut outcome = Ok(());
    for index in 0..a.jobs as usize {
        let cfg = JobConfig {
            index,
            path: path.clone(),
            bs: a.bs,
            iodepth: a.iodepth,
            rwmix: a.rwmix,
            t0,
            max_ms,
            cycles,
        };
        match client::spawn(cfg, run.shared.clone()) {
            Ok(h) => run.jobs.push(h),
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    if outcome.is_ok() {
        outcome = run.drive(&mut ctrl);
    }
    run.shared.stop.store(true, Ordering::Relaxed);
    let end_ns = now_ns();
    let mut results = Vec::new();
    for h in run.jobs.drain(..) {
        match h.join() {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(e)) => match outcome {
                Ok(()) => outcome = Err(e),
                Err(_) => eprintln!("ublk-bench: downtime: client job: {e}"),
            },
            Err(_) => outcome = Err(Error::Refused("a client thread panicked".into())),
        }
    }
    let events = read_events(dev.id, &run.tl, outcome.is_ok());
    run.drain_trace();
    let facts = dev.facts.clone();
    drop(dev);
    if results.len() == a.jobs as usize && !run.tl.kills.is_empty() {
        let complete = outcome.is_ok() && run.tl.lives.len() == cycles;
        let rep = build_report(&run, &results, &events, &stamp, complete, &facts, trace_note);
        write_outputs(&run, &rep, &results, end_ns, &stamp)?;
    } else if outcome.is_ok() {
        outcome = Err(Error::Refused("no result: a client job failed".into()));
    }
    outcome
}
