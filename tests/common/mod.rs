//! Helpers for tests that drive the built `ublk-bench` binary against the
//! real ublk driver: a serializing harness that cleans up even on panic,
//! commands with time limits, the device list, process checks and fio.
//!
//! These tests own the machine's ublk devices: the harness runs
//! `ublk-bench del -a` and kills every `ublk-bench` process before and after
//! each test. That is what the guest (`bench-scripts/test`) is for; on a
//! bare-metal machine with the driver loaded, run them only where no other
//! ublk device matters.

#![allow(dead_code)] // each test crate uses a subset

use std::fs;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary cargo built. Run it through [`bin`].
pub const BIN: &str = env!("CARGO_BIN_EXE_ublk-bench");
/// Where [`bin`] keeps its copy: root-only, tmpfs on most machines.
pub const BIN_COPY_DIR: &str = "/run/ublk-bench-tests";
pub const CONTROL: &str = "/dev/ublk-control";
/// The comm of every ublk-bench process (CLI, daemon and foreground server).
pub const COMM: &str = "ublk-bench";
/// Why a driver test skips on a machine without the driver.
pub const SKIP: &str = "/dev/ublk-control absent (run inside the guest: bench-scripts/test)";
/// Set to 1 by bench-scripts/vm for every command it runs in the guest,
/// which has the driver, the emulated NVMe disk, root, setpriv and 2 CPUs:
/// there a test that would skip fails instead, so a run cannot pass by
/// testing nothing.
pub const NO_SKIP_ENV: &str = "UBLK_TEST_NO_SKIP";
/// A file each skip appends `suite::test<TAB>reason` to; bench-scripts/test
/// sets it for the host's `cargo test` and prints how many tests skipped.
pub const SKIP_LOG_ENV: &str = "UBLK_TEST_SKIP_LOG";
/// A file each driver test appends `suite::test<TAB>seconds<TAB>ok|failed`
/// to when its harness drops (clean-up included); bench-scripts/test sets
/// it and prints the slowest tests and those over their budget. Unset,
/// the line goes to `test-times.tsv` in cargo's target/tmp.
pub const TIME_LOG_ENV: &str = "UBLK_TEST_TIME_LOG";

/// Longest a single command may take: `add` waits for START_DEV, which
/// scans partitions and is slow under software emulation.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(120);
/// How long to wait for an exited process to be reaped, a node to vanish, ...
pub const SETTLE: Duration = Duration::from_secs(10);

/// Cargo runs tests in threads; these share the machine's devices.
static SERIAL: Mutex<()> = Mutex::new(());
/// Process groups of the fio runs in flight, killed by the cleanup.
static FIO_GROUPS: Mutex<Vec<i32>> = Mutex::new(Vec::new());

pub fn have_driver() -> bool {
    Path::new(CONTROL).exists()
}

/// The binary to run: a byte-for-byte copy of [`BIN`] in [`BIN_COPY_DIR`]
/// where the driver is present, else BIN itself. In the guest the build
/// folder is a 9p share read again at every exec: running a 20 MB debug
/// binary from there costs 2-3 s per command, from tmpfs about 0.5 s.
pub fn bin() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if !have_driver() {
            return PathBuf::from(BIN);
        }
        copy_bin().unwrap_or_else(|e| {
            println!("running {BIN} in place: cannot copy it to {BIN_COPY_DIR}: {e}");
            PathBuf::from(BIN)
        })
    })
}

/// Copies BIN to BIN_COPY_DIR/ublk-bench (same name, so the same comm),
/// through a rename so that a server still running an older copy is fine.
/// A copy with BIN's size and modification time (which the copy is given)
/// is BIN already: each test binary of a run would otherwise copy the same
/// tens of megabytes again over the 9p share.
fn copy_bin() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = Path::new(BIN_COPY_DIR);
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    let dst = dir.join("ublk-bench");
    let src = fs::metadata(BIN)?;
    let same = |m: fs::Metadata| m.len() == src.len() && m.modified().ok() == src.modified().ok();
    if fs::metadata(&dst).is_ok_and(same) {
        return Ok(dst);
    }
    let tmp = dir.join(format!(".ublk-bench.{}", std::process::id()));
    fs::copy(BIN, &tmp)?;
    fs::File::options().write(true).open(&tmp)?.set_modified(src.modified()?)?;
    fs::rename(&tmp, &dst)?;
    Ok(dst)
}

// ---------------------------------------------------------------- harness

/// Held for the whole of a driver test. Creating it waits for the other
/// tests and starts from a clean machine; dropping it checks that the test
/// left no device, node, settings file or process behind (unless the test
/// already failed), then removes whatever is left either way.
pub struct Harness {
    started: Instant,
    _serial: MutexGuard<'static, ()>,
}

/// The harness, or None (after [`skip`]) where there is no driver.
pub fn harness() -> Option<Harness> {
    if !have_driver() {
        skip(SKIP);
        return None;
    }
    let serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let started = Instant::now();
    let leftovers = leftovers();
    if !leftovers.is_empty() {
        println!("cleaning up before the test: {}", leftovers.join("; "));
        force_cleanup();
    }
    Some(Harness { started, _serial: serial })
}

/// Every skip goes through here; the caller then returns (or skips one
/// case). Where [`NO_SKIP_ENV`] is 1 (the guest) this panics with the
/// reason instead. Otherwise it prints the reason and, if [`SKIP_LOG_ENV`]
/// names a file, appends the test's name to it.
pub fn skip(reason: &str) {
    let test = test_name();
    if std::env::var(NO_SKIP_ENV).is_ok_and(|v| v == "1") {
        panic!(
            "{test} would be skipped, and {NO_SKIP_ENV}=1 (set in the guest) makes that a failure: {reason}"
        );
    }
    println!("skipped: {reason}");
    let Some(log) = std::env::var_os(SKIP_LOG_ENV) else { return };
    let line = format!("{test}\t{reason}\n");
    let written = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
    if let Err(e) = written {
        panic!("cannot record the skip of {test} in {SKIP_LOG_ENV}={}: {e}", Path::new(&log).display());
    }
}

/// `suite::test`: the test binary's name without cargo's hash, and the
/// name libtest gives the thread that runs the test.
pub fn test_name() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe.as_deref().and_then(Path::file_stem).map(|s| s.to_string_lossy().into_owned());
    let suite = stem.as_deref().map_or("?", |s| s.rsplit_once('-').map_or(s, |(name, _)| name)).to_string();
    let thread = std::thread::current();
    format!("{suite}::{}", thread.name().unwrap_or("?"))
}

impl Drop for Harness {
    fn drop(&mut self) {
        let check = !std::thread::panicking();
        let left = if check { settled_leftovers() } else { Vec::new() };
        if check && left.is_empty() {
            // Nothing left to delete: `del -a` would only cost a process
            // start (seconds under emulation). Our fio groups still go.
            kill_fio_groups();
        } else {
            force_cleanup();
        }
        let took = self.started.elapsed().as_secs_f64();
        println!("[{took:6.2}s] test done");
        log_time(took, check && left.is_empty());
        if !left.is_empty() {
            panic!("the test left things behind:\n  {}", left.join("\n  "));
        }
    }
}

/// Appends this test's wall time to the [`TIME_LOG_ENV`] file. A test
/// whose time cannot be logged still passes: the line is for reading, the
/// test's verdict is its own.
fn log_time(secs: f64, ok: bool) {
    let path = std::env::var_os(TIME_LOG_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-times.tsv"));
    let line = format!("{}\t{secs:.2}\t{}\n", test_name(), if ok { "ok" } else { "failed" });
    let written = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
    if let Err(e) = written {
        println!("cannot append the test's time to {}: {e}", path.display());
    }
}

/// Everything a finished test must not leave: devices, their nodes and
/// settings files, ublk-bench processes (zombies included).
pub fn leftovers() -> Vec<String> {
    let mut left = Vec::new();
    let ids = ublk_nodes();
    if !ids.is_empty() {
        left.push(format!("device nodes {}", ids.join(" ")));
    }
    let files: Vec<String> = device_files().iter().map(|p| p.display().to_string()).collect();
    if !files.is_empty() {
        left.push(format!("device files {}", files.join(" ")));
    }
    for p in servers() {
        let zombie = if p.state == 'Z' { " (ZOMBIE, parent has not reaped it)" } else { "" };
        left.push(format!("process {} {} state {} ppid {}{zombie}", p.pid, p.comm, p.state, p.ppid));
    }
    left
}

/// Leftovers that are still there after SETTLE: an exiting server needs a
/// moment to be reaped by init and for its nodes to go.
pub fn settled_leftovers() -> Vec<String> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let left = leftovers();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        sleep_ms(50);
    }
}

/// Kills our fio runs, deletes every device, kills every ublk-bench
/// process (reaping the ones that are our children) and deletes again, in
/// case a killed server had left its device behind.
pub fn force_cleanup() {
    kill_fio_groups();
    let del_all = || {
        let _ = try_run(Command::new(bin()).args(["del", "-a", "--force"]), Duration::from_secs(30));
    };
    del_all();
    let me = std::process::id() as i32;
    for p in servers() {
        // SAFETY: kill and waitpid take plain integers; we only wait for our own children.
        unsafe {
            libc::kill(p.pid, libc::SIGKILL);
            if p.ppid == me {
                libc::waitpid(p.pid, std::ptr::null_mut(), 0);
            }
        }
    }
    if !ublk_nodes().is_empty() {
        del_all();
    }
    for f in device_files() {
        let _ = fs::remove_file(f);
    }
}

fn kill_fio_groups() {
    for pgid in FIO_GROUPS.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
        // SAFETY: kill takes plain integers.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
}

/// Per-device files: in the run folder `ID.json` (settings), `ID.events`,
/// `ID.stats`, ... (not server-wide ones such as `server.log`), and the
/// default RAM stores `/dev/shm/ublk-bench-ID`.
pub fn device_files() -> Vec<PathBuf> {
    let is_id = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let in_dir = |dir: &Path, pick: &dyn Fn(&str) -> bool| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| pick(&e.file_name().to_string_lossy()))
            .map(|e| e.path())
            .collect()
    };
    let mut files = in_dir(&run_dir(), &|n| n.split_once('.').is_some_and(|(id, _)| is_id(id)));
    files.extend(in_dir(Path::new("/dev/shm"), &|n| n.strip_prefix("ublk-bench-").is_some_and(is_id)));
    files.sort();
    files
}

// ---------------------------------------------------------------- commands

/// What a finished command left: its status and both streams as text.
pub struct Out {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub raw_stdout: Vec<u8>,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// Panics with everything known unless the command succeeded.
    pub fn success(self) -> Self {
        assert!(self.ok(), "{} failed:\n{}", self.what, self.describe());
        self
    }

    pub fn describe(&self) -> String {
        format!(
            "  status: {}\n  stdout: {}\n  stderr: {}",
            self.status,
            self.stdout.trim_end().replace('\n', "\n          "),
            self.stderr.trim_end().replace('\n', "\n          ")
        )
    }
}

/// A child whose stdout and stderr are collected by threads.
pub struct Running {
    pub what: String,
    pub child: Child,
    started: Instant,
    readers: Option<[JoinHandle<Vec<u8>>; 2]>,
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for the exit, or kills the child (and its process group if it
    /// leads one) after `timeout`; None then.
    pub fn wait(mut self, timeout: Duration) -> Option<Out> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("waitpid") {
                break s;
            }
            if Instant::now() >= deadline {
                // SAFETY: kill takes plain integers; a group we do not lead does not exist.
                unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            sleep_ms(10);
        };
        let [out, err] = self.readers.take().expect("waited once");
        let raw_stdout = out.join().expect("stdout reader");
        let stderr = String::from_utf8_lossy(&err.join().expect("stderr reader")).into_owned();
        let stdout = String::from_utf8_lossy(&raw_stdout).into_owned();
        println!("[{:6.2}s] {} -> {status}", self.started.elapsed().as_secs_f64(), self.what);
        Some(Out { what: self.what, status, stdout, stderr, raw_stdout })
    }

    /// As `wait`, panicking on a timeout.
    pub fn finish(self, timeout: Duration) -> Out {
        let what = self.what.clone();
        self.wait(timeout).unwrap_or_else(|| panic!("{what} did not finish within {timeout:?}; killed it"))
    }
}

fn describe(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    let mut s = match program.file_name() {
        Some(name) if name == COMM => COMM.to_string(),
        _ => program.to_string_lossy().into_owned(),
    };
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub fn spawn(cmd: &mut Command) -> Running {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped")));
    let err = drain(Box::new(child.stderr.take().expect("piped")));
    Running { what, child, started: Instant::now(), readers: Some([out, err]) }
}

pub fn try_run(cmd: &mut Command, timeout: Duration) -> Option<Out> {
    spawn(cmd).wait(timeout)
}

pub fn run(cmd: &mut Command) -> Out {
    spawn(cmd).finish(CMD_TIMEOUT)
}

/// `ublk-bench ARGS`, whatever its status.
pub fn ublk(args: &[&str]) -> Out {
    run(Command::new(bin()).args(args))
}

/// A tool from util-linux or coreutils, also found where PATH lacks sbin.
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

pub fn need_tool(name: &str) -> PathBuf {
    tool(name).unwrap_or_else(|| panic!("{name} not found: apt-get install -y fio util-linux coreutils"))
}

// ---------------------------------------------------------------- devices

/// A device made by `add`, as `list` shows it.
#[derive(Debug, Clone)]
pub struct Dev {
    pub id: u32,
    pub pid: i32,
    pub json: Value,
}

impl Dev {
    pub fn block(&self) -> PathBuf {
        block_path(self.id)
    }
}

pub fn block_path(id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{id}"))
}

pub fn run_dir() -> PathBuf {
    std::env::var_os("UBLK_BENCH_RUN_DIR").map(PathBuf::from).unwrap_or_else(|| "/run/ublk-bench".into())
}

pub fn settings_path(id: u32) -> PathBuf {
    run_dir().join(format!("{id}.json"))
}

/// The id in a `dev id N:` dump line.
pub fn parse_dev_id(dump: &str) -> Option<u32> {
    let rest = &dump[dump.find("dev id ")? + "dev id ".len()..];
    rest[..rest.find(':')?].trim().parse().ok()
}

/// `ublk-bench add ARGS`, which must succeed and print a LIVE device that
/// `list --json` then shows, served by a live process, with its block device.
pub fn add(args: &[&str]) -> Dev {
    let mut full = vec!["add"];
    full.extend_from_slice(args);
    let out = ublk(&full).success();
    let id = parse_dev_id(&out.stdout)
        .unwrap_or_else(|| panic!("no `dev id N:` in the output of {}:\n{}", out.what, out.describe()));
    assert!(
        out.stdout.contains("state LIVE"),
        "no `state LIVE` in the output of {}:\n{}",
        out.what,
        out.describe()
    );
    let json =
        list_one(id).unwrap_or_else(|| panic!("device {id} made by {} is not in `list --json`", out.what));
    assert_eq!(json["state"], "LIVE", "device {id}: {json}");
    let pid = json["pid"].as_i64().unwrap_or_else(|| panic!("device {id} has no pid: {json}")) as i32;
    assert!(alive(pid), "the server of device {id} (pid {pid}) is not running");
    assert_eq!(comm(pid).as_deref(), Some(COMM), "pid {pid} of device {id} is not a ublk-bench process");
    assert!(is_block_device(&block_path(id)), "{} is missing after add", block_path(id).display());
    Dev { id, pid, json }
}

/// `list --json` as parsed JSON; it must succeed and give an array.
pub fn list() -> Vec<Value> {
    let out = ublk(&["list", "--json"]).success();
    let v: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("`list --json` is not JSON ({e}):\n{}", out.describe()));
    match v {
        Value::Array(devs) => devs,
        other => panic!("`list --json` is not an array: {other}"),
    }
}

pub fn list_one(id: u32) -> Option<Value> {
    list().into_iter().find(|d| d["dev_id"] == id)
}

pub fn list_ids() -> Vec<u64> {
    list().iter().filter_map(|d| d["dev_id"].as_u64()).collect()
}

/// `del -n ID`, which must succeed.
/// `del -n ID`, which must succeed. `del` refuses a device that is still
/// open, so this first waits for every process to let go of it (a killed
/// fio's job processes take a moment to exit).
pub fn del(id: u32) {
    let block = block_path(id);
    if !eventually(SETTLE, || openers(&block).is_empty()) {
        let who: Vec<String> = openers(&block)
            .iter()
            .map(|&p| fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default())
            .collect();
        panic!("{} is still open after {SETTLE:?}: {who:?}", block.display());
    }
    ublk(&["del", "-n", &id.to_string()]).success();
}

/// Pids of the processes that have `path` open.
pub fn openers(path: &Path) -> Vec<i32> {
    let holds = |pid: i32| {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| fs::read_link(e.path()).is_ok_and(|t| t == path))
    };
    procs().into_iter().map(|p| p.pid).filter(|&p| holds(p)).collect()
}

/// After a delete: not listed, no block device, no server, no settings.
pub fn assert_gone(dev: &Dev) {
    assert_all_gone(std::slice::from_ref(dev));
}

/// [`assert_gone`] for several deleted devices, with one `list` for all
/// (a process start costs a good part of a second under emulation).
pub fn assert_all_gone(devs: &[Dev]) {
    let listed = list_ids();
    for dev in devs {
        assert!(!listed.contains(&u64::from(dev.id)), "device {} is still listed after its delete", dev.id);
        gone_but_listing(dev);
    }
}

/// The checks of [`assert_gone`] other than `list`'s.
fn gone_but_listing(dev: &Dev) {
    let id = dev.id;
    wait_until(&format!("{} to disappear", dev.block().display()), SETTLE, || !dev.block().exists());
    wait_until(&format!("server pid {} of device {id} to exit and be reaped", dev.pid), SETTLE, || {
        !Path::new(&format!("/proc/{}", dev.pid)).exists()
    });
    assert!(!settings_path(id).exists(), "{} is still there after the delete", settings_path(id).display());
    if let Some(store) = dev.json["store"].as_str() {
        assert!(!Path::new(store).exists(), "RAM store {store} of device {id} is still there");
    }
}

/// The ublk device nodes present (ublkbN and ublkcN).
pub fn ublk_nodes() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir("/dev")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            ["ublkb", "ublkc"].iter().any(|p| {
                n.strip_prefix(p).is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
            })
        })
        .collect();
    names.sort();
    names
}

pub fn is_block_device(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
}

// ---------------------------------------------------------------- processes

#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: i32,
    pub ppid: i32,
    pub state: char,
    pub comm: String,
}

/// Every process, from /proc/PID/stat.
pub fn procs() -> Vec<Proc> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else { continue };
        // pid (comm) state ppid ...; comm may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = rest.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        out.push(Proc { pid, ppid, state, comm: stat[open + 1..close].to_string() });
    }
    out
}

/// Every ublk-bench process, zombies included.
pub fn servers() -> Vec<Proc> {
    procs().into_iter().filter(|p| p.comm == COMM).collect()
}

pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// The state letter in `/proc/PID/stat` (R, S, Z, ...), None if gone.
pub fn proc_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Waits for `pid` to be gone: reaped, or a zombie nobody has reaped yet
/// (the kernel has seen it die).
pub fn wait_dead(pid: i32) {
    wait_until(&format!("pid {pid} to die"), SETTLE, || !alive(pid) || proc_state(pid) == Some('Z'));
}

pub fn comm(pid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim_end().to_string())
}

/// The threads of `pid` as (tid, comm).
pub fn threads(pid: i32) -> Vec<(i32, String)> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let tid = e.file_name().to_str()?.parse().ok()?;
            let comm = fs::read_to_string(e.path().join("comm")).ok()?;
            Some((tid, comm.trim_end().to_string()))
        })
        .collect()
}

/// A `Name:\tvalue` line of /proc/PID/task/TID/status.
pub fn task_status(pid: i32, tid: i32, key: &str) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    text.lines().find_map(|l| Some(l.strip_prefix(key)?.strip_prefix(':')?.trim().to_string()))
}

/// The CPUs this process may use.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill takes plain integers.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig}): {}", std::io::Error::last_os_error());
}

// ---------------------------------------------------------------- waiting

pub fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// Polls `cond` until it holds or `timeout` passes; false then.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep_ms(20);
    }
}

pub fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    assert!(eventually(timeout, cond), "timed out after {timeout:?} waiting for {what}");
}

/// Runs `case` on every item at once, each in a thread of its own, and
/// fails with the first failure's own message. For cases that share
/// nothing (each its own device and files): under emulation one case
/// leaves the CPUs idle much of the time, waiting for processes and I/O.
pub fn side_by_side<T: Sync>(items: &[T], case: impl Fn(&T) + Sync) {
    let results: Vec<std::thread::Result<()>> = std::thread::scope(|s| {
        let running: Vec<_> = items.iter().map(|item| s.spawn(|| case(item))).collect();
        running.into_iter().map(|t| t.join()).collect()
    });
    for r in results {
        if let Err(panic) = r {
            std::panic::resume_unwind(panic);
        }
    }
}

// ---------------------------------------------------------------- fio

/// Runs fio on `dev` with `args` (plus JSON output) in its own process
/// group, which the cleanup kills if the test dies; returns fio's JSON after
/// checking its exit status and that no job saw an error.
pub fn fio(dev: &Path, args: &[&str]) -> Value {
    let mut cmd = Command::new(need_tool("fio"));
    cmd.arg("--name=check").arg(format!("--filename={}", dev.display())).args(args);
    run_fio(cmd)
}

/// As `fio`, with several jobs in one fio run (one start-up, which costs
/// seconds under emulation): `global` applies to all, then each job is
/// `(name, options)`. A job with `--stonewall` waits for the ones before it.
/// `dev` is every job's file, or None when each job gives `--filename`.
pub fn fio_jobs(dev: Option<&Path>, global: &[&str], jobs: &[(String, Vec<String>)]) -> Value {
    fio_jobs_within(CMD_TIMEOUT, dev, global, jobs)
}

/// As `fio_jobs`, killed with the stall state printed if it runs past `limit`.
pub fn fio_jobs_within(
    limit: Duration,
    dev: Option<&Path>,
    global: &[&str],
    jobs: &[(String, Vec<String>)],
) -> Value {
    let mut cmd = Command::new(need_tool("fio"));
    cmd.args(dev.map(|d| format!("--filename={}", d.display()))).args(global);
    for (name, opts) in jobs {
        cmd.arg(format!("--name={name}")).args(opts);
    }
    run_fio_within(cmd, limit)
}

/// What a stalled fio run leaves to look at, printed before the test
/// fails: each ublk disk's in-flight reads and writes and its server's
/// counts (`stats --json`), each ublk-bench thread's kernel wait channel
/// and stack, each server ring's heads and tails, and the kernel log's tail.
fn print_stall() {
    println!("--- stall: /sys/block/ublkb*/inflight (reads writes)");
    for dev in fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let name = dev.file_name().to_string_lossy().into_owned();
        if name.starts_with("ublkb") {
            let inflight = fs::read_to_string(dev.path().join("inflight")).unwrap_or_default();
            println!("{name}: {}", inflight.split_whitespace().collect::<Vec<_>>().join(" "));
            let id = name.trim_start_matches("ublkb");
            if let Ok(out) = Command::new(BIN).args(["stats", "-n", id, "--json"]).output() {
                println!("  stats: {}", String::from_utf8_lossy(&out.stdout).trim());
            }
        }
    }
    println!("--- stall: ublk-bench threads (comm, wchan, stack)");
    for server in servers() {
        for (tid, name) in threads(server.pid) {
            let read = |f: &str| {
                fs::read_to_string(format!("/proc/{}/task/{tid}/{f}", server.pid)).unwrap_or_default()
            };
            println!("{}/{tid}: {name} in {}\n{}", server.pid, read("wchan"), read("stack"));
        }
        // Each io_uring's heads and tails: CQEs posted but not reaped
        // (CqTail ahead of CqHead) tell a server that missed a wakeup
        // from a kernel that never posted.
        for fd in fs::read_dir(format!("/proc/{}/fdinfo", server.pid)).into_iter().flatten().flatten() {
            let info = fs::read_to_string(fd.path()).unwrap_or_default();
            if info.contains("CqHead") {
                let keep: Vec<&str> =
                    info.lines().filter(|l| l.contains("Head") || l.contains("Tail")).collect();
                println!("{} fd {}: {}", server.pid, fd.file_name().to_string_lossy(), keep.join(" "));
            }
        }
    }
    if let Ok(out) = Command::new("dmesg").output() {
        let log = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = log.lines().collect();
        println!("--- stall: dmesg tail\n{}", lines[lines.len().saturating_sub(20)..].join("\n"));
    }
}

/// fio's JSON document (fio may print notes before it).
pub fn fio_json(out: &Out) -> Result<Value, String> {
    let start = if out.stdout.starts_with('{') { 0 } else { out.stdout.find("\n{").map_or(0, |i| i + 1) };
    serde_json::from_str(&out.stdout[start..]).map_err(|e| format!("no JSON from fio ({e})"))
}

fn run_fio(cmd: Command) -> Value {
    run_fio_within(cmd, CMD_TIMEOUT)
}

fn run_fio_within(mut cmd: Command, limit: Duration) -> Value {
    cmd.arg("--output-format=json").process_group(0);
    let running = spawn(&mut cmd);
    let pgid = running.pid();
    FIO_GROUPS.lock().unwrap_or_else(|p| p.into_inner()).push(pgid);
    let what = running.what.clone();
    let out = running.wait(limit).unwrap_or_else(|| {
        print_stall();
        panic!("{what} did not finish within {limit:?}; killed it (state above)")
    });
    FIO_GROUPS.lock().unwrap_or_else(|p| p.into_inner()).retain(|&g| g != pgid);
    let out = out.success();
    let json = fio_json(&out).unwrap_or_else(|e| panic!("{}: {e}:\n{}", out.what, out.describe()));
    let jobs = json["jobs"].as_array().unwrap_or_else(|| panic!("fio JSON without jobs:\n{json}"));
    assert!(!jobs.is_empty(), "fio ran no job:\n{}", out.describe());
    for job in jobs {
        assert_eq!(
            job["error"],
            0,
            "fio job {} reported error {}:\n{}",
            job["jobname"],
            job["error"],
            out.describe()
        );
    }
    json
}

/// fio's write-then-verify options: O_DIRECT io_uring random writes at
/// depth 16, each block with a CRC32C, all read back and checked at the
/// end, the first bad block fatal.
pub const FIO_CRC_VERIFY: [&str; 8] = [
    "--ioengine=io_uring",
    "--direct=1",
    "--iodepth=16",
    "--rw=randwrite",
    "--verify=crc32c",
    "--do_verify=1",
    "--verify_fatal=1",
    "--verify_state_save=0",
];

/// fio's own verification on several devices of `size` bytes at once, in
/// one fio run (fio takes seconds just to start in the guest): first 4 KiB
/// random writes, then (stonewalled) mixed sizes up to 256 KiB, a job per
/// device named `{phase}-{label}`. Every job must write and verify its
/// whole device.
pub fn fio_verify_devices(devs: &[(&str, &Dev)], size: u64) {
    let mut jobs: Vec<(String, Vec<String>)> = Vec::new();
    for (phase, sizes) in [("rand4k", "--bs=4k"), ("mixed", "--bsrange=4k-256k")] {
        for (i, (label, dev)) in devs.iter().enumerate() {
            let mut opts = vec![format!("--filename={}", dev.block().display()), sizes.to_string()];
            if phase == "mixed" && i == 0 {
                opts.push("--stonewall".into());
            }
            jobs.push((format!("{phase}-{label}"), opts));
        }
    }
    let json = fio_jobs(None, &FIO_CRC_VERIFY, &jobs);
    for ((job, _), dir) in jobs.iter().flat_map(|j| [(j, "write"), (j, "read")]) {
        let bytes = fio_job_bytes(&json, job, dir);
        assert_eq!(bytes, size, "fio job {job}: {dir} bytes do not cover the device (write, then verify)");
    }
}

/// Bytes one fio job moved in one direction ("read" or "write").
pub fn fio_job_bytes(json: &Value, job: &str, dir: &str) -> u64 {
    let jobs = json["jobs"].as_array().into_iter().flatten();
    let j =
        jobs.clone().find(|j| j["jobname"] == job).unwrap_or_else(|| panic!("no fio job {job} in {json}"));
    j[dir]["io_bytes"].as_u64().unwrap_or(0)
}

/// Bytes fio moved in one direction ("read" or "write"), over all jobs.
pub fn fio_bytes(json: &Value, dir: &str) -> u64 {
    json["jobs"].as_array().into_iter().flatten().filter_map(|j| j[dir]["io_bytes"].as_u64()).sum()
}

// ---------------------------------------------------------------- data

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A dd that reads `len` bytes at `offset` of `dev` with O_DIRECT to its
/// stdout, in 64 KiB blocks (both must be multiples of that).
pub fn dd_direct(dev: &Path, offset: u64, len: u64) -> Command {
    const BS: u64 = 64 << 10;
    assert!(offset.is_multiple_of(BS) && len.is_multiple_of(BS), "dd_direct wants 64 KiB multiples");
    let mut cmd = Command::new(need_tool("dd"));
    cmd.args([
        format!("if={}", dev.display()),
        "iflag=direct".into(),
        format!("bs={BS}"),
        format!("skip={}", offset / BS),
        format!("count={}", len / BS),
        "status=none".into(),
    ]);
    cmd
}

/// Reads `len` bytes at `offset` of a block device with O_DIRECT (dd), so
/// the page cache cannot answer for the device.
pub fn read_direct(dev: &Path, offset: u64, len: u64) -> Vec<u8> {
    let out = run(&mut dd_direct(dev, offset, len)).success();
    assert_eq!(out.raw_stdout.len() as u64, len, "short read from {}", dev.display());
    out.raw_stdout
}

/// Ok(json) if fio exited 0 and no job saw an error, else what went wrong.
pub fn fio_clean(out: &Out) -> Result<Value, String> {
    let json = fio_json(out);
    let mut problems = vec![];
    if !out.ok() {
        problems.push(format!("exit status {}", out.status));
    }
    if let Ok(json) = &json {
        for j in json["jobs"].as_array().into_iter().flatten() {
            if j["error"] != 0 {
                problems.push(format!("job {} error {}", j["jobname"], j["error"]));
            }
            if j["total_err"].as_u64().unwrap_or(0) != 0 {
                problems.push(format!("job {} total_err {}", j["jobname"], j["total_err"]));
            }
        }
    }
    match (json, problems.is_empty()) {
        (Ok(json), true) => Ok(json),
        (json, _) => {
            if let Err(e) = json {
                problems.push(e);
            }
            Err(format!("{}: {}\n{}", out.what, problems.join("; "), tail(&out.describe(), 4000)))
        }
    }
}

pub fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// Runs `ublk-bench ARGS`, which must fail with a message holding every
/// `hints` (case-insensitive) and no panic, and leave nothing behind.
/// Returns what went wrong, if anything.
pub fn check_rejected(args: &[&str], hints: &[&str]) -> Option<String> {
    let out = ublk(args);
    let cmd = format!("ublk-bench {}", args.join(" "));
    let err = out.stderr.to_lowercase();
    let problem = if out.ok() {
        Some("exit status 0".to_string())
    } else if err.contains("panicked") {
        Some("it panicked".to_string())
    } else {
        hints
            .iter()
            .find(|h| !err.contains(&h.to_lowercase()))
            .map(|h| format!("the message does not mention `{h}`"))
    };
    let left = settled_leftovers();
    if !left.is_empty() {
        force_cleanup();
    }
    let mut problems: Vec<String> = problem.into_iter().collect();
    if !left.is_empty() {
        problems.push(format!("left behind: {}", left.join("; ")));
    }
    if problems.is_empty() {
        println!("`{cmd}` refused: {}", out.stderr.trim_end());
    }
    (!problems.is_empty()).then(|| format!("`{cmd}`: {}\n{}", problems.join("; "), out.describe()))
}

// ---------------------------------------------------------------- run files

/// The supervisor pid recorded in `<id>.supervisor` (`{"pid": P, "start": T}`).
pub fn supervisor_pid(id: u32) -> i32 {
    let p = run_dir().join(format!("{id}.supervisor"));
    let text = fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text:?}", p.display()));
    v["pid"].as_i64().unwrap_or_else(|| panic!("{}: no pid: {text:?}", p.display())) as i32
}

/// The start time of `pid` in clock ticks after boot (`/proc/PID/stat` field 22).
pub fn proc_start(pid: i32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_else(|e| panic!("pid {pid}: {e}"));
    let rest = stat.rsplit_once(')').expect("stat has a command name").1;
    rest.split_whitespace().nth(19).and_then(|s| s.parse().ok()).expect("stat has a start time")
}
