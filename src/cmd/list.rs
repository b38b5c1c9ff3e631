//! `list`: the kernel's view of each device (GET_DEV_INFO) joined with our
//! persisted settings (backend, size, store, a file device's path).

use serde::Serialize;

use crate::backend;
use crate::backend::limits::QueueLimits;
use crate::config::DeviceConfig;
use crate::ctrl::{self, Ctrl};
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::run_files;
use crate::sys::{self, DevInfo};

#[derive(Debug, Serialize)]
pub struct DeviceView {
    pub dev_id: u32,
    pub state: &'static str,
    pub pid: i32,
    pub queues: u16,
    pub depth: u16,
    pub backend: String,
    pub size: u64,
    pub block_size: u32,
    pub max_io_bytes: u32,
    /// The UBLK_F_* bits as the kernel has the device (`flags` names them).
    pub flags_raw: u64,
    pub flags: Vec<String>,
    pub copy_mode: Option<&'static str>,
    pub poll: Option<bool>,
    /// Threads serving the device's tags (`--threads`; one per queue by
    /// default), for a device whose settings we have.
    pub threads: Option<u16>,
    /// UBLK_F_BATCH_IO, as the kernel has the device.
    pub batch: bool,
    /// `--gather-wait` in µs (blocking devices whose settings we have).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gather_wait_us: Option<u32>,
    pub cpus: Vec<usize>,
    pub store: Option<String>,
    /// The file a file device serves (absolute); None for other backends.
    pub path: Option<String>,
    /// The queue's active I/O scheduler (sysfs); None before START_DEV.
    pub scheduler: Option<String>,
    /// What a client's I/O must meet, as the kernel set up `/dev/ublkbN`
    /// (sysfs `queue/`); None before START_DEV.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<QueueLimits>,
    /// `--latency`/`--fail` as the device emulates them; None: a plain device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub emulate: Option<String>,
    /// `--integrity`: the PI format and metadata bytes per block.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub integrity: Option<String>,
}

pub fn view(ctrl: &mut Ctrl, dev_id: u32) -> Result<DeviceView> {
    let info = ctrl.info(dev_id).map_err(|e| ctrl::no_device(dev_id, e))?;
    let cfg = run_files::load(dev_id).ok();
    let size = match &cfg {
        Some(c) => c.size,
        None => ctrl.get_params(dev_id).map(|p| p.basic.dev_sectors << 9).unwrap_or(0),
    };
    let mut v = make_view(&info, cfg.as_ref(), size, crate::io_scheduler::active_scheduler(dev_id));
    v.limits =
        QueueLimits::read(&std::path::Path::new("/sys/block").join(format!("ublkb{dev_id}")).join("queue"));
    if cfg.is_none() {
        // Another server's device: the kernel's block size, as ublksrv prints it.
        if let Ok(p) = ctrl.get_params(dev_id) {
            v.block_size = 1 << p.basic.logical_bs_shift;
        }
    }
    Ok(v)
}

fn make_view(info: &DevInfo, cfg: Option<&DeviceConfig>, size: u64, scheduler: Option<String>) -> DeviceView {
    let plan = Plan::of_device(info.flags);
    DeviceView {
        dev_id: info.dev_id,
        state: sys::state_name(info.state),
        pid: info.ublksrv_pid,
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
        backend: cfg.map_or("unknown".into(), |c| backend::of(c.backend).name().into()),
        size,
        block_size: cfg.map_or(512, |c| c.block_size),
        max_io_bytes: info.max_io_buf_bytes,
        flags_raw: info.flags,
        flags: sys::flag_names(info.flags),
        copy_mode: cfg.map(|_| plan.transfer.name()),
        poll: cfg.map(|c| c.poll),
        threads: cfg.map(|c| c.threads_for(info.nr_hw_queues)),
        batch: plan.batch,
        gather_wait_us: cfg.filter(|c| !c.poll).map(|c| c.gather_wait_us),
        cpus: cfg.map(|c| c.cpus.clone()).unwrap_or_default(),
        store: cfg.and_then(|c| c.store.as_ref().map(|p| p.display().to_string())),
        path: cfg
            .filter(|c| c.path.is_some() && backend::of(c.backend).claimed_path(c) == c.path.as_deref())
            .and_then(|c| c.path.as_ref())
            .map(|p| p.display().to_string()),
        scheduler,
        limits: None,
        emulate: cfg.filter(|c| c.emulate.is_on()).map(|c| c.emulate.describe()),
        integrity: cfg.and_then(|c| c.integrity).map(|i| i.describe()),
    }
}

/// The dump: its first two lines are ublksrv's and kublk's, field for
/// field, so scripts that read those by position work unchanged; our own
/// fields follow on lines of their own.
pub fn dump(v: &DeviceView) -> String {
    format!(
        "dev id {}: nr_hw_queues {} queue_depth {} block size {} dev_capacity {}\n\
         \tmax rq size {} daemon pid {} flags {:#x} state {}\n\
         \tfeatures {}\n\
         \tbackend {} copy {} poll {} threads {} batch {}{} cpus [{}] scheduler {}{}{}\n{}{}{}",
        v.dev_id,
        v.queues,
        v.depth,
        v.block_size,
        v.size >> 9,
        v.max_io_bytes,
        v.pid,
        v.flags_raw,
        v.state,
        v.flags.join("|"),
        v.backend,
        v.copy_mode.unwrap_or("?"),
        v.poll.map_or("?".into(), |p| p.to_string()),
        v.threads.map_or("?".into(), |t| t.to_string()),
        v.batch,
        v.gather_wait_us.map_or(String::new(), |w| format!(" gather-wait {w}us")),
        crate::cpus::format_cpus(&v.cpus),
        v.scheduler.as_deref().unwrap_or("-"),
        v.store.as_ref().map_or(String::new(), |s| format!(" store {s}")),
        v.path.as_ref().map_or(String::new(), |p| format!(" path {p}")),
        v.emulate.as_ref().map_or(String::new(), |e| format!("\temulate {e}\n")),
        v.integrity.as_ref().map_or(String::new(), |i| format!("\tintegrity {i}\n")),
        v.limits.map_or(String::new(), |l| format!(
            "\tlimits logical_block_size {} dma_alignment {} max_segments {} max_segment_size {}\n",
            l.logical_block_size, l.dma_alignment, l.max_segments, l.max_segment_size
        )),
    )
}

pub fn print_one(dev_id: u32, json: bool) -> Result<()> {
    let v = view(&mut Ctrl::open()?, dev_id)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v).expect("serializes"));
    } else {
        print!("{}", dump(&v));
    }
    Ok(())
}

/// Every device; one deleted between enumeration and GET_DEV_INFO is skipped.
fn all_views(ctrl: &mut Ctrl) -> Result<Vec<DeviceView>> {
    let mut views = Vec::new();
    for id in ctrl::device_ids(ctrl)? {
        match view(ctrl, id) {
            Ok(v) => views.push(v),
            Err(Error::NoDevice(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(views)
}

pub fn run(id: Option<u32>, json: bool) -> Result<()> {
    let mut ctrl = Ctrl::open()?;
    let views = match id {
        Some(id) => vec![view(&mut ctrl, id)?],
        None => all_views(&mut ctrl)?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&views).expect("serializes"));
    } else {
        views.iter().for_each(|v| print!("{}", dump(v)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::sample;
    use crate::config::{BackendKind, CopyMode};

    fn settings(backend: BackendKind, path: Option<&str>) -> DeviceConfig {
        let path = path.map(Into::into);
        DeviceConfig { dev_id: Some(3), backend, path, copy_mode: CopyMode::Zero, ..sample() }
    }

    /// A file device shows the file it serves, in the dump and the JSON;
    /// other devices show none, even with a stray path in their settings.
    #[test]
    fn a_file_device_shows_its_path() {
        let info = DevInfo { dev_id: 3, ..Default::default() };
        let file = settings(BackendKind::File, Some("/dev/shm/dt-file"));
        let v = make_view(&info, Some(&file), file.size, None);
        assert!(dump(&v).contains(" path /dev/shm/dt-file\n"), "{}", dump(&v));
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["path"], "/dev/shm/dt-file", "{json}");
        let ram = settings(BackendKind::Ram, Some("/stray"));
        let v = make_view(&info, Some(&ram), ram.size, None);
        assert!(!dump(&v).contains("path"), "{}", dump(&v));
        assert!(serde_json::to_value(&v).unwrap()["path"].is_null());
        assert!(make_view(&info, None, 0, None).path.is_none(), "no settings, no path");
    }

    /// The first two lines are ublksrv's and kublk's, field for field
    /// (`printf` formats of ublksrv_ctrl_dump), the flags as hex.
    #[test]
    fn the_first_two_lines_are_the_ublksrv_dump() {
        let info = DevInfo {
            dev_id: 3,
            nr_hw_queues: 2,
            queue_depth: 64,
            state: sys::UBLK_S_DEV_LIVE,
            max_io_buf_bytes: 524288,
            ublksrv_pid: 4242,
            flags: sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_COPY | 1 << 40,
            ..Default::default()
        };
        let cfg = DeviceConfig { block_size: 4096, size: 1 << 30, ..settings(BackendKind::Null, None) };
        let text = dump(&make_view(&info, Some(&cfg), cfg.size, None));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "dev id 3: nr_hw_queues 2 queue_depth 64 block size 4096 dev_capacity 2097152");
        assert_eq!(lines[1], "\tmax rq size 524288 daemon pid 4242 flags 0x10000000088 state LIVE");
        assert_eq!(lines[2], "\tfeatures USER_RECOVERY|USER_COPY|bit 40");
    }

    /// A blocking device shows its `--gather-wait`; a polling one none.
    #[test]
    fn a_blocking_device_shows_its_gather_wait() {
        let info = DevInfo { dev_id: 3, nr_hw_queues: 1, ..Default::default() };
        let cfg = DeviceConfig { gather_wait_us: 20, ..settings(BackendKind::Null, None) };
        let v = make_view(&info, Some(&cfg), cfg.size, None);
        assert!(dump(&v).contains(" batch false gather-wait 20us cpus"), "{}", dump(&v));
        assert!(dump(&v).contains(" poll false threads 1 batch"), "one per queue by default: {}", dump(&v));
        let three = DeviceConfig { threads: Some(3), ..cfg.clone() };
        let v3 = make_view(&DevInfo { nr_hw_queues: 2, ..info }, Some(&three), three.size, None);
        assert!(dump(&v3).contains(" threads 3 batch"), "{}", dump(&v3));
        assert_eq!(serde_json::to_value(&v3).unwrap()["threads"], 3);
        assert_eq!(serde_json::to_value(&v).unwrap()["gather_wait_us"], 20);
        let poll = DeviceConfig { poll: true, ..cfg };
        let v = make_view(&info, Some(&poll), poll.size, None);
        assert!(dump(&v).contains(" batch false cpus"), "{}", dump(&v));
        assert!(serde_json::to_value(&v).unwrap().get("gather_wait_us").is_none());
    }
}
