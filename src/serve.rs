//! A server process from start to exit: serve a new device, or take over
//! one whose server died or is handing over, then serve it until a stop
//! signal or until its queues end. Run by `__serve` (and by
//! `add --foreground`); progress goes to the starter on the notify pipe.

use std::fs::File;
use std::time::Duration;

use crate::backend::DeviceBackend;
use crate::backend::nvme::Namespace;
use crate::clock::now_ns;
use crate::config::{self, BackendKind, DeviceConfig};
use crate::daemon::Notifier;
use crate::error::Result;
use crate::fault::{self, Fault};
use crate::process::{self, ProcId};
use crate::recovery::Takeover;
use crate::server::{Server, Stop};
use crate::{log, run_files};

/// A new device: create, attach, start, serve until stopped. `on_live`
/// runs once the device is LIVE (`add --foreground` prints it there).
pub fn new_device(
    cfg: DeviceConfig,
    mut notify: Notifier,
    on_live: impl FnOnce(u32) -> Result<()>,
) -> Result<()> {
    let (mut server, ns) = match create(&cfg) {
        Ok(s) => s,
        Err(e) => {
            notify.failed(&e);
            return Err(e);
        }
    };
    notify.added(server.dev_id);
    note_queues(&mut server.cfg, server.info.nr_hw_queues);
    if server.cfg.backend == BackendKind::Ram && server.cfg.store.is_none() {
        server.cfg.store = Some(format!("/dev/shm/ublk-bench-{}", server.dev_id).into());
    }
    let started = make_backend(&mut server.cfg, ns).and_then(|backend| {
        run_files::save(server.dev_id, &server.cfg)?;
        server.prepare(&backend)?;
        server.attach()?;
        server.start()?;
        // After START_DEV the queue exists; a failed write abandons the
        // device below like any other failed start.
        if let Some(name) = &server.cfg.scheduler {
            config::set_scheduler(server.dev_id, name)?;
        }
        server.publish_stats();
        Ok(backend)
    });
    let _backend = match started {
        Ok(b) => b,
        Err(e) => {
            notify.failed(&e);
            server.abandon();
            return Err(e);
        }
    };
    if fault::from_env()? == Some(Fault::AbortBeforeLive) {
        log!("device {}: {} asks to abort before reporting LIVE", server.dev_id, fault::FAULT_ENV);
        std::process::abort();
    }
    let cfg = &server.cfg;
    log!("device {} LIVE, {} queue(s), backend {}", server.dev_id, cfg.queues, cfg.backend.name());
    notify.live(server.dev_id);
    on_live(server.dev_id)?;
    let stop = server.wait();
    log!("device {}: {:?}", server.dev_id, stop);
    server.shutdown(stop == Stop::Signal)
}

/// The queues ADD_DEV made (the kernel clamps them to the possible CPUs)
/// become the settings' own; the server log says when polling threads share CPUs.
fn note_queues(cfg: &mut DeviceConfig, made: u16) {
    if made != cfg.queues {
        log!(
            "device {}: the kernel made {made} queue(s) of the {} asked",
            cfg.dev_id.unwrap_or(0),
            cfg.queues
        );
        cfg.queues = made;
    }
    if let Some(warning) = cfg.poll_sharing(made) {
        log!("device {}: {warning}", cfg.dev_id.unwrap_or(0));
    }
}

/// A new store is created (and only then marked ours, so a failed start
/// never removes a file that was there before); a reused one is opened.
fn make_backend(cfg: &mut DeviceConfig, ns: Option<(Namespace, File)>) -> Result<DeviceBackend> {
    let create = cfg.store_created;
    cfg.store_created = false;
    let backend = DeviceBackend::new(cfg, create, ns)?;
    cfg.store_created = create;
    Ok(backend)
}

/// ADD_DEV and SET_PARAMS. An nvme namespace is opened once, here, for
/// the params and then the backend.
fn create(cfg: &DeviceConfig) -> Result<(Server, Option<(Namespace, File)>)> {
    let ns = match cfg.backend {
        BackendKind::Nvme => Some(Namespace::probe_for(cfg)?),
        _ => None,
    };
    let server = Server::create(cfg, ns.as_ref().map(|(n, _)| n))?;
    Ok((server, ns))
}

/// The recovering server. With `watch` it is a successor (a hot standby,
/// or `restart`'s new server): it gets everything ready, says `ready`, then
/// waits for that process to die before taking over. `cfg` is the device's
/// settings where the caller has them, else they are read from the run file.
pub fn takeover(
    dev_id: u32,
    method: &str,
    crash_seen_ns: Option<u64>,
    watch: Option<ProcId>,
    cfg: Option<DeviceConfig>,
    mut notify: Notifier,
) -> Result<()> {
    let result = take_over(dev_id, method, crash_seen_ns, watch, cfg, &mut notify);
    let mut t = match result {
        Ok(t) => t,
        Err(e) => {
            log!("device {dev_id}: {method} failed: {e}");
            notify.failed(&e);
            return Err(e);
        }
    };
    notify.live(dev_id);
    log!("device {dev_id} LIVE again ({method})");
    let stopped = t.record_events(Duration::from_secs(5));
    let (server, _backend) = t.into_server();
    let stop = stopped.unwrap_or_else(|| server.wait());
    log!("device {dev_id}: {stop:?}");
    server.shutdown(stop == Stop::Signal)
}

fn take_over(
    dev_id: u32,
    method: &str,
    crash_seen_ns: Option<u64>,
    watch: Option<ProcId>,
    cfg: Option<DeviceConfig>,
    notify: &mut Notifier,
) -> Result<Takeover> {
    // Opened before the slow preparation: a server that dies meanwhile is
    // still seen, and one already gone (or its pid now another process's)
    // means take over at once.
    let watched = watch.map(|id| (id.pid, id.open()));
    let mut t = match cfg {
        Some(cfg) => Takeover::prepare_with(dev_id, cfg, method, now_ns())?,
        None => Takeover::prepare(dev_id, method)?,
    };
    let crash_seen = match watched {
        Some((pid, fd)) => {
            t.phases.old_pid = Some(pid);
            die_with_parent(libc::SIGKILL);
            notify.prepared(dev_id);
            if let Some(fd) = fd {
                process::wait_pidfd(&fd, None);
            }
            Some(now_ns())
        }
        None => crash_seen_ns,
    };
    t.run(crash_seen)?;
    // The server it now is outlives whoever started it.
    die_with_parent(0);
    Ok(t)
}

/// A waiting successor is useless without whoever started it: SIGKILL makes
/// it die with its parent, 0 ends that once it serves the device.
fn die_with_parent(signal: i32) {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal) };
}
