//! The running device server ([`Server`]): create or take over a device, run
//! its queue threads, start it, wait for a stop, and tear down without
//! leaking the device. The process around it is `server_process`.
//!
//! The control thread (the caller) sends every control command; queue
//! threads only FETCH and COMMIT. START_DEV and END_USER_RECOVERY block
//! until every tag is fetched, which is why they are sent from here after
//! each queue thread reported its FETCHes posted.
//!
//! Signals: SIGTERM and SIGINT ask for a graceful stop that deletes the
//! device; SIGUSR1 is raised by a queue thread when it ends. All three are
//! blocked in every thread and taken with `sigwait` by the control thread.

use std::fs::{File, OpenOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backend::claim::Claim;
use crate::backend::{self, DeviceBackend};
use crate::config::DeviceConfig;
use crate::ctrl::{self, Ctrl};
use crate::emulate::Failer;
use crate::error::{Error, Result};
use crate::fault::{self, Fault};
use crate::layout::{self, Slice};
use crate::plan::{self, Plan};
use crate::queue::batch::Batch;
use crate::queue::{PerTag, QueueChannels, QueueSetup, spawn_queue};
use crate::stats::StatsFile;
use crate::sys::{self, DevInfo};
use crate::{run_files, teardown};

pub struct Server {
    pub ctrl: Ctrl,
    pub cfg: DeviceConfig,
    /// How the device is served, made once: from the features for a new
    /// device, from the kernel's flags for a takeover.
    pub plan: Plan,
    pub info: DevInfo,
    pub dev_id: u32,
    char_dev: Option<Arc<File>>,
    threads: Vec<JoinHandle<Result<()>>>,
    binds: Vec<mpsc::Sender<Arc<File>>>,
    ready: Option<mpsc::Receiver<Result<()>>>,
    /// Monotonic ns of the first request served by any queue (0: none yet).
    pub first_served: Arc<AtomicU64>,
    /// Made by `prepare` under no name; `publish_stats` names it.
    stats: Option<Arc<StatsFile>>,
    /// The test-only fault hook (`queue` module doc); never set on a takeover.
    panic_after: Option<u64>,
    /// This server's hold on the backing file (`backend::claim`), kept
    /// until the server is gone.
    claim: Option<Claim>,
    /// The `auto-buf-reg-fallback` fault hook (never set on a takeover).
    unreg_auto_buf: bool,
    /// `--fail`'s rules and counts, shared by the queues (None: no emulation).
    failer: Option<Arc<Failer>>,
}

/// Why `wait` returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM or SIGINT: delete the device.
    Signal,
    /// Every queue ended (device stopped, deleted or quiesced elsewhere).
    QueuesEnded,
}

impl Server {
    /// Plans a new device from the kernel's features, then ADD_DEV and
    /// SET_PARAMS. On error nothing is left. The settings take the plan's
    /// copy mode, so the run file records the mode chosen.
    pub fn create(cfg: &DeviceConfig) -> Result<Self> {
        let fault = fault::from_env()?;
        let panic_after = match fault {
            Some(Fault::QueuePanic(n)) => Some(n),
            _ => None,
        };
        let mut ctrl = Ctrl::open()?;
        let features = fault::mask_features(ctrl.features()?, fault);
        let spec = backend::of(cfg.backend);
        let plan = Plan::new(cfg, spec.copy_rules(), features)?;
        let mut cfg = cfg.clone();
        cfg.copy_mode = plan.transfer.mode();
        let mut info = DevInfo {
            nr_hw_queues: cfg.queues,
            queue_depth: cfg.depth,
            max_io_buf_bytes: cfg.max_io_bytes,
            dev_id: cfg.dev_id.unwrap_or(sys::DEV_ID_ANY),
            flags: plan.flags,
            ..Default::default()
        };
        ctrl.add(&mut info).map_err(|e| match e.raw_os_error() {
            Some(libc::EEXIST) => Error::IdInUse(info.dev_id),
            _ => Error::kernel("ADD_DEV", e),
        })?;
        let dev_id = info.dev_id;
        cfg.dev_id = Some(dev_id);
        let mut params = plan::params(&cfg, info.max_io_buf_bytes);
        let set = spec
            .params(&cfg, &mut params)
            .and_then(|()| ctrl.set_params(dev_id, &mut params).map_err(|e| Error::kernel("SET_PARAMS", e)));
        if let Err(e) = set {
            let undo = ctrl.del(dev_id).err();
            return Err(with_undo(e, dev_id, "DEL_DEV", undo));
        }
        let unreg_auto_buf = fault == Some(Fault::AutoBufRegFallback);
        Ok(Server { panic_after, unreg_auto_buf, ..Server::new(ctrl, cfg, plan, info) })
    }

    fn new(ctrl: Ctrl, cfg: DeviceConfig, plan: Plan, info: DevInfo) -> Self {
        let failer = cfg.emulate.is_on().then(|| Arc::new(Failer::new(cfg.emulate.fail.clone())));
        Server {
            ctrl,
            cfg,
            plan,
            info,
            dev_id: info.dev_id,
            char_dev: None,
            threads: vec![],
            binds: vec![],
            ready: None,
            first_served: Arc::default(),
            stats: None,
            panic_after: None,
            claim: None,
            unreg_auto_buf: false,
            failer,
        }
    }

    /// Keeps `claim` for as long as this server lives.
    pub fn hold(&mut self, claim: Claim) {
        self.claim = Some(claim);
    }

    /// Takes over an existing device (recovery): no ADD_DEV, the kernel's
    /// queue count, depth and flags (`info`, read through `ctrl`) stand,
    /// and the plan is theirs ([`Plan::of_device`]).
    pub fn adopt(ctrl: Ctrl, info: DevInfo, plan: Plan, cfg: DeviceConfig) -> Self {
        Server::new(ctrl, cfg, plan, info)
    }

    /// Starts every queue thread and returns once each has pinned itself and
    /// built its ring and buffers. Nothing touches `/dev/ublkcN` yet, and the
    /// stats file has no name: `stats` keeps reading the live server's.
    pub fn prepare(&mut self, backend: &DeviceBackend) -> Result<()> {
        block_signals();
        QUEUES_ENDED.store(0, Ordering::SeqCst);
        let queues = self.info.nr_hw_queues;
        let layout = layout::layout(queues, self.info.queue_depth, self.cfg.threads_for(queues));
        let stats = Arc::new(StatsFile::create(self.dev_id, layout.len(), self.cfg.stats)?);
        self.stats = Some(stats.clone());
        let (tx, rx) = mpsc::channel();
        for (thread, slices) in layout.into_iter().enumerate() {
            let setup = self.queue_setup(thread as u16, slices, queues, &stats)?;
            let (bind_tx, bind_rx) = mpsc::channel();
            let spawn = match self.plan.batch {
                false => spawn_queue::<PerTag>,
                true => spawn_queue::<Batch>,
            };
            let handle = spawn(backend, setup, QueueChannels { bind: bind_rx, ready: tx.clone() })?;
            self.threads.push(handle);
            self.binds.push(bind_tx);
        }
        self.ready = Some(rx);
        self.wait_ready()
    }

    /// Opens `/dev/ublkcN`, hands it to every queue thread and returns once
    /// each has posted FETCH for all its tags. A takeover calls it after
    /// START_USER_RECOVERY (the old server is gone), a new device before
    /// START_DEV.
    pub fn attach(&mut self) -> Result<()> {
        let char_dev = Arc::new(open_char_dev(self.dev_id)?);
        self.char_dev = Some(char_dev.clone());
        for b in self.binds.drain(..) {
            let _ = b.send(char_dev.clone());
        }
        self.wait_ready()
    }

    /// Gives our stats file the device's name, once the device is ours
    /// (after START_DEV or END_USER_RECOVERY: a takeover does not make the
    /// client wait for it).
    pub fn publish_stats(&self) {
        if let Some(Err(e)) = self.stats.as_ref().map(|s| s.publish()) {
            // Serving the device matters more than its figures.
            crate::log!(
                "device {}: stats file not published, `stats` will not see this server: {e}",
                self.dev_id
            );
        }
    }

    fn wait_ready(&mut self) -> Result<()> {
        let rx = self.ready.as_ref().expect("prepare ran");
        for _ in 0..self.threads.len() {
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Error::Queue("a queue thread died during start-up".into())),
            }
        }
        Ok(())
    }

    /// Thread `thread` of the layout, serving `slices` of a device of `queues` queues.
    fn queue_setup(
        &mut self,
        thread: u16,
        slices: Vec<Slice>,
        queues: u16,
        stats: &Arc<StatsFile>,
    ) -> Result<QueueSetup> {
        let qid = slices[0].qid;
        // With more threads than queues, this is thread `nth` of its queue's (t = qid + nth * queues).
        let nth = (thread / queues) as usize;
        let online = crate::cpus::online_cpus();
        let listed = self.cfg.cpu_for(thread);
        let affinity = match listed.filter(|c| online.contains(c)) {
            Some(_) => vec![],
            None => self
                .ctrl
                .queue_affinity(self.dev_id, qid, crate::cpus::nr_cpu_ids())
                .map_err(|e| Error::kernel("GET_QUEUE_AFFINITY", e))?,
        };
        let cpu = self.cfg.queue_cpu(thread, nth, &affinity, &online);
        if let Some(c) = listed.filter(|&c| c != cpu) {
            crate::log!(
                "device {} queue thread {thread}: warning: CPU {c} of --cpus is offline (online: {}); the queue runs on \
                 CPU {cpu} of its affinity set instead",
                self.dev_id,
                crate::cpus::format_cpus(&online)
            );
        }
        Ok(QueueSetup {
            dev_id: self.dev_id,
            thread,
            qid,
            depth: layout::slots(&slices),
            slices: slices.into(),
            queue_depth: self.info.queue_depth,
            cpu: Some(cpu),
            poll: self.cfg.poll,
            copy: self.plan.transfer,
            auto_buf_reg: self.plan.auto_buf_reg,
            max_io_bytes: self.info.max_io_buf_bytes,
            stats: Some(stats.clone()),
            stats_on: self.cfg.stats,
            gather_wait_us: self.cfg.gather_wait_us,
            first_served: self.first_served.clone(),
            panic_after: self.panic_after,
            unreg_auto_buf: self.unreg_auto_buf,
            emulate: self.failer.as_ref().map(|f| (self.cfg.emulate.clone(), f.clone())),
            on_end: Arc::new(notify_queue_ended),
        })
    }

    /// START_DEV with our pid; `/dev/ublkbN` exists when it returns.
    pub fn start(&mut self) -> Result<()> {
        self.ctrl.start(self.dev_id, std::process::id() as i32).map_err(|e| Error::kernel("START_DEV", e))?;
        self.info = self.ctrl.info(self.dev_id).map_err(|e| Error::kernel("GET_DEV_INFO", e))?;
        Ok(())
    }

    /// Blocks until a stop signal or until every queue thread has ended.
    pub fn wait(&self) -> Stop {
        loop {
            if QUEUES_ENDED.load(Ordering::SeqCst) >= self.threads.len() {
                return Stop::QueuesEnded;
            }
            match wait_signal() {
                libc::SIGTERM | libc::SIGINT => return Stop::Signal,
                _ => continue,
            }
        }
    }

    /// Waits up to `wait` for the first request served, watching for a
    /// stop as [`Server::wait`] does: a stop that comes first is returned at
    /// once, so a takeover that no client uses yet still stops on demand.
    pub fn wait_first_served(&self, wait: Duration) -> Option<Stop> {
        let deadline = Instant::now() + wait;
        loop {
            if self.first_served.load(Ordering::Relaxed) != 0 {
                return None;
            }
            if QUEUES_ENDED.load(Ordering::SeqCst) >= self.threads.len() {
                return Some(Stop::QueuesEnded);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            // Coarse (1 ms): this runs while the client's held I/O is being served.
            if let Some(libc::SIGTERM | libc::SIGINT) = wait_signal_for(left.min(Duration::from_millis(1))) {
                return Some(Stop::Signal);
            }
        }
    }

    /// Ends the queue threads and, when `delete`, removes the device and its
    /// files. Without `delete` the device stays for a new server to recover.
    pub fn shutdown(mut self, delete: bool) -> Result<()> {
        if delete {
            let _ = self.ctrl.stop(self.dev_id);
        }
        // Threads still waiting to bind (a standby never used) end here.
        self.binds.clear();
        let mut first_err = None;
        for t in self.threads.drain(..) {
            if let Ok(Err(e)) = t.join() {
                first_err.get_or_insert(e);
            }
        }
        // DEL_DEV waits for every reference to /dev/ublkcN: close ours first.
        self.char_dev = None;
        if delete {
            teardown::del_dev(&mut self.ctrl, self.dev_id, Some(&self.cfg))
                .map_err(|e| Error::kernel(format!("DEL_DEV of device {}", self.dev_id), e))?;
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Abandons a device whose start failed with `cause`: DEL_DEV_ASYNC
    /// finishes the deletion once this process has exited and dropped its
    /// references. Returns `cause`, with the undo's failure if it failed:
    /// then the device and its files stay for `del`. (STOP_DEV may fail on
    /// a device that never started; only the deletion counts.)
    pub fn abandon(mut self, cause: Error) -> Error {
        let _ = self.ctrl.stop(self.dev_id);
        match self.ctrl.del_async(self.dev_id) {
            Ok(()) => {
                run_files::remove_all(self.dev_id, Some(&self.cfg));
                cause
            }
            Err(e) => with_undo(cause, self.dev_id, "DEL_DEV_ASYNC", Some(e)),
        }
    }
}

/// `cause`, and where undoing a half-made device with `op` failed too, that
/// failure and what to do about it (the device is left behind).
fn with_undo(cause: Error, dev_id: u32, op: &str, undo: Option<std::io::Error>) -> Error {
    let Some(e) = undo else { return cause };
    crate::log!("device {dev_id}: {op} after a failed start failed: {e}");
    Error::Refused(format!(
        "{cause}; deleting the half-made device {dev_id} then failed too ({op}: {e}): \
         remove it with `ublk-bench del -n {dev_id} --force`"
    ))
}

/// Opens `/dev/ublkcN`, waiting briefly for udev/devtmpfs to create it.
fn open_char_dev(dev_id: u32) -> Result<File> {
    let path = ctrl::char_path(dev_id);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => return Ok(f),
            Err(e) if retryable_open(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => return Err(Error::io(format!("open {path}"), e)),
        }
    }
}

/// ENOENT while the node appears; EBUSY while a dead server's file is released.
fn retryable_open(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EBUSY))
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the stop signals in this thread and every thread it spawns later.
pub fn block_signals() {
    let set = stop_signals();
    // SAFETY: set is a valid signal set; a null old-set pointer is allowed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

fn wait_signal() -> i32 {
    let set = stop_signals();
    let mut sig = 0;
    // SAFETY: set and sig are valid for the call.
    unsafe { libc::sigwait(&set, &mut sig) };
    sig
}

/// A stop signal taken within `timeout`, or None.
fn wait_signal_for(timeout: Duration) -> Option<i32> {
    let set = stop_signals();
    let ts =
        libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as _ };
    // SAFETY: set and ts are valid for the call; a null siginfo pointer is allowed.
    let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

/// Queue threads of this process that have ended. A counter rather than
/// `JoinHandle::is_finished`, which may still be false when the signal lands.
static QUEUES_ENDED: AtomicUsize = AtomicUsize::new(0);

/// Called by a queue thread as it ends, to wake the control thread.
fn notify_queue_ended() {
    QUEUES_ENDED.fetch_add(1, Ordering::SeqCst);
    // SAFETY: plain syscall.
    unsafe { libc::kill(libc::getpid(), libc::SIGUSR1) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed undo is reported with the failure it undid, not dropped.
    #[test]
    fn a_failed_undo_is_reported_with_its_cause() {
        let cause = || Error::io("SET_PARAMS", std::io::Error::from_raw_os_error(libc::EINVAL));
        assert_eq!(with_undo(cause(), 4, "DEL_DEV", None).to_string(), cause().to_string());
        let err =
            with_undo(cause(), 4, "DEL_DEV_ASYNC", Some(std::io::Error::from_raw_os_error(libc::EBUSY)))
                .to_string();
        assert!(err.starts_with(&cause().to_string()), "{err}");
        assert!(err.contains("DEL_DEV_ASYNC") && err.contains("busy"), "{err}");
        assert!(err.contains("ublk-bench del -n 4"), "{err}");
    }
}
