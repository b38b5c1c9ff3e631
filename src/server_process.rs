//! A server process's life from start to exit: serve a new device, or take over
//! one whose server died or is handing over, then serve it until a stop
//! signal or until its queues end. Run by `__serve` (and by
//! `add --foreground`); progress goes to the starter on the notify pipe.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::backend::claim::Claim;
use crate::backend::{self, DeviceBackend};
use crate::clock::now_ns;
use crate::config::DeviceConfig;
use crate::daemonize::{HANDOVER_SIGNAL, Notifier};
use crate::error::Result;
use crate::fault::{self, Fault};
use crate::plan::Transfer;
use crate::process::ProcId;
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
    let mut server = match Server::create(&cfg) {
        Ok(s) => s,
        Err(e) => {
            notify.failed(&e);
            return Err(e);
        }
    };
    notify.added(server.dev_id);
    note_queues(&mut server.cfg, server.info.nr_hw_queues);
    let started = make_backend(&mut server.cfg, server.plan.transfer).and_then(|backend| {
        server.hold(Claim::take_new(&backend, server.dev_id)?);
        run_files::save(server.dev_id, &server.cfg)?;
        server.prepare(&backend)?;
        server.attach()?;
        server.start()?;
        // After START_DEV the queue exists; a failed write abandons the
        // device below like any other failed start.
        if let Some(name) = &server.cfg.scheduler {
            crate::io_scheduler::set_scheduler(server.dev_id, name)?;
        }
        server.publish_stats();
        Ok(backend)
    });
    let _backend = match started {
        Ok(b) => b,
        Err(e) => {
            let e = server.abandon(e);
            notify.failed(&e);
            return Err(e);
        }
    };
    if fault::from_env()? == Some(Fault::AbortBeforeLive) {
        log!("device {}: {} asks to abort before reporting LIVE", server.dev_id, fault::FAULT_ENV);
        std::process::abort();
    }
    let cfg = &server.cfg;
    log!(
        "device {} LIVE, {} queue(s), backend {}",
        server.dev_id,
        cfg.queues,
        backend::of(cfg.backend).name()
    );
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
    if let Some(warning) = cfg.poll_sharing(cfg.threads_for(made)) {
        log!("device {}: {warning}", cfg.dev_id.unwrap_or(0));
    }
}

/// A new store is created (and only then marked ours, so a failed start
/// never removes a file that was there before); a reused one is opened.
/// A size cell left by a gone device with this id goes first.
fn make_backend(cfg: &mut DeviceConfig, transfer: Transfer) -> Result<DeviceBackend> {
    if let Some(id) = cfg.dev_id {
        backend::live_size::remove(id);
    }
    let create = cfg.store_created;
    cfg.store_created = false;
    let backend = backend::of(cfg.backend).open(cfg, transfer, create)?;
    cfg.store_created = create;
    // A store made just now is identified as opened (`add` identified the rest).
    cfg.backing_id = cfg.backing_id.or_else(|| backend.file_id());
    Ok(backend)
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
            // `restart` recovers cold after a failed successor unless it is
            // gone (Ctrl-C): then this line is all a person has.
            let hint = match method {
                "restart" => format!("; if it stays QUIESCED, run `ublk-bench recover -n {dev_id}`"),
                _ => String::new(),
            };
            log!("device {dev_id}: {method} failed: {e}{hint}");
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
    let abort_when_gone =
        watch.is_some() && method == "restart" && fault::from_env()? == Some(Fault::SuccessorAbort);
    // Opened before the slow preparation: a server that dies meanwhile is
    // still seen, and one already gone (or its pid now another process's)
    // means take over at once.
    let watched = watch.map(|id| (id.pid, id.open()));
    // Before any queue thread exists, so that every thread inherits the block.
    let handover = watched.is_some().then(handover_signalfd).transpose()?;
    let mut t = match cfg {
        Some(cfg) => Takeover::prepare_with(dev_id, cfg, method, now_ns())?,
        None => Takeover::prepare(dev_id, method)?,
    };
    let crash_seen = match (watched, handover) {
        (Some((pid, fd)), Some(handover)) => {
            t.phases.old_pid = Some(pid);
            die_with_parent(libc::SIGKILL);
            notify.prepared(dev_id);
            if let Some(fd) = fd {
                wait_old_server(dev_id, &fd, &handover, notify);
            }
            if abort_when_gone {
                log!("device {dev_id}: {} asks this successor to abort", fault::FAULT_ENV);
                std::process::abort();
            }
            Some(now_ns())
        }
        _ => crash_seen_ns,
    };
    t.run(crash_seen)?;
    // The server it now is outlives whoever started it.
    die_with_parent(0);
    Ok(t)
}

/// Blocks [`HANDOVER_SIGNAL`] in this thread (and every thread made after)
/// and returns a signalfd that reads it.
fn handover_signalfd() -> Result<OwnedFd> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset; the calls
    // only read it.
    let fd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, HANDOVER_SIGNAL);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC)
    };
    if fd < 0 {
        return Err(crate::error::Error::io("signalfd", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits for the old server (`old`, a pidfd) to exit. Handed the device
/// meanwhile, the successor stops dying with its starter and says so: once
/// `restart` has sent QUIESCE_DEV it is the device's only hope of a server,
/// whatever becomes of `restart` (Ctrl-C, a closed terminal).
fn wait_old_server(dev_id: u32, old: &OwnedFd, handover: &OwnedFd, notify: &mut Notifier) {
    let mut fds = [
        libc::pollfd { fd: old.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: handover.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    let mut watching = 2;
    loop {
        // SAFETY: fds holds `watching` valid pollfds for the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), watching, -1) };
        if r < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                _ => return,
            }
        }
        if watching == 2 && fds[1].revents != 0 {
            let mut info = [0u8; 128];
            // SAFETY: a signalfd read fills whole 128-byte siginfo records; info is one.
            unsafe { libc::read(handover.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
            die_with_parent(0);
            notify.handed(dev_id);
            watching = 1;
        }
        if fds[0].revents != 0 {
            return;
        }
    }
}

/// A waiting successor is useless without whoever started it: SIGKILL makes
/// it die with its parent, 0 ends that once it is handed the device or serves it.
fn die_with_parent(signal: i32) {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal) };
}
