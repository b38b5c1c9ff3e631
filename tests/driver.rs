//! Driver tests: the built `ublk-bench` binary against the real ublk driver,
//! black-box, through its CLI, the block devices it makes, fio and /proc.
//! What they prove:
//! - `add`, `list` and `del` (one device, several side by side, `-a` over
//!   mixed backends, and without sysfs) make, show and remove devices, and
//!   SIGTERM to a foreground server stops and deletes its device;
//! - queue threads run on the CPUs `--cpus` names or, by default, on the
//!   last CPU of their queue's affinity set; more queues than CPUs serve
//!   I/O on every queue; polling queues sharing a CPU are warned about;
//! - the queue is put on the `none` scheduler by default, or on the one
//!   `--scheduler` names;
//! - `file` and `ram` keep data (fio verify, zero copy included), DISCARD and
//!   WRITE_ZEROES read back as zeros, a zero-copy RAM server maps no store,
//!   tmpfs I/O runs inline (no io-wq worker), a `file` device leaves its
//!   file in place, and a write to a full tmpfs fails that write, not the
//!   server;
//! - bad input (values, files, an id in use, not root, no driver) is refused
//!   with a message naming the problem, before any kernel state is touched,
//!   and leaves nothing behind.
//!
//! They need /dev/ublk-control and root; without the driver each one goes
//! through `common::skip`, which says why and passes on the host but fails
//! in the guest (`UBLK_TEST_NO_SKIP=1`). `no_driver_error_says_modprobe`
//! runs everywhere: with the driver loaded it hides /dev/ublk-control from
//! the binary in a private mount namespace. Run them in the guest with `bench-scripts/test`,
//! or by hand: `bench-scripts/vm --auto -- target/debug/deps/driver-HASH
//! --test-threads=1`.
//!
//! Every test holds the harness from `common`: tests run one at a time, and
//! the harness deletes every ublk device and kills every ublk-bench process
//! (and fio run) when the test ends, even on panic, after checking that the
//! test itself left nothing behind.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------- add, list, del

/// `add` BACKEND in each shape (1 and 2 queues, blocking and busy-poll),
/// check what `list --json` says and that the device answers a read, then
/// `del -n` it and check that it is gone with its server.
fn add_list_del(backend: &str, size_mib: u64) {
    let Some(_h) = harness() else { return };
    let size = format!("{size_mib}M");
    for queues in [1, 2] {
        if queues > online_cpus() {
            skip(&format!("{queues} queues: only {} CPU(s)", online_cpus()));
            continue;
        }
        for poll in [false, true] {
            let q = queues.to_string();
            let mut args = vec![backend, "-q", &q, "-d", "64", "--size", &size];
            if poll {
                args.push("--poll");
            }
            let dev = add(&args);
            let j = &dev.json;
            let expect = json!({
                "dev_id": dev.id, "state": "LIVE", "queues": queues, "depth": 64,
                "backend": backend, "size": size_mib * MIB, "poll": poll,
            });
            for (key, want) in expect.as_object().expect("object") {
                assert_eq!(&j[key], want, "`{key}` of `add {}` in list --json: {j}", args.join(" "));
            }
            if let Some(store) = j["store"].as_str() {
                assert!(fs::metadata(store).is_ok(), "RAM store {store} is missing while LIVE");
            }
            assert_eq!(read_direct(&dev.block(), 0, 64 << 10).len(), 64 << 10);
            del(dev.id);
            assert_gone(&dev);
        }
    }
}

#[test]
fn add_list_del_null() {
    add_list_del("null", 1024);
}

#[test]
fn add_list_del_ram() {
    add_list_del("ram", 64);
}

/// `add --foreground` serves in the calling process; SIGTERM stops it,
/// deletes the device and its settings, and the exit status is 0.
#[test]
fn foreground_sigterm_stops_and_deletes() {
    let Some(_h) = harness() else { return };
    let id = 7;
    let server = spawn(Command::new(bin()).args(["add", "null", "--foreground", "-n", "7", "--size", "1G"]));
    let live = eventually(CMD_TIMEOUT, || list_one(id).is_some_and(|d| d["state"] == "LIVE"));
    if !live {
        let out = server.wait(Duration::ZERO);
        panic!(
            "device {id} never went LIVE under add --foreground:\n{}",
            out.map(|o| o.describe()).unwrap_or_default()
        );
    }
    let dev = list_one(id).expect("listed");
    assert_eq!(dev["pid"], server.pid(), "the foreground process is not the server: {dev}");
    assert!(is_block_device(&block_path(id)), "/dev/ublkb{id} is missing");
    assert!(settings_path(id).exists(), "{} is missing while LIVE", settings_path(id).display());

    signal(server.pid(), libc::SIGTERM);
    let out = server.finish(Duration::from_secs(30));
    assert!(out.ok(), "add --foreground did not exit cleanly on SIGTERM:\n{}", out.describe());
    assert_eq!(parse_dev_id(&out.stdout), Some(id), "no `dev id {id}:` printed:\n{}", out.describe());
    assert!(out.stdout.contains("state LIVE"), "no `state LIVE` printed:\n{}", out.describe());
    assert_eq!(list(), Vec::<Value>::new(), "devices left after SIGTERM");
    assert!(!settings_path(id).exists(), "{} left after SIGTERM", settings_path(id).display());
    wait_until(&format!("/dev/ublkb{id} to disappear"), SETTLE, || !block_path(id).exists());
}

/// The CPU list the kernel allows queue thread `ublk{ID}q{Q}`.
fn queue_cpus(dev: &Dev, q: u32) -> String {
    let name = format!("ublk{}q{q}", dev.id);
    let tasks = threads(dev.pid);
    let (tid, _) = tasks
        .iter()
        .find(|(_, c)| *c == name)
        .unwrap_or_else(|| panic!("no thread {name} in server {}: threads {tasks:?}", dev.pid));
    task_status(dev.pid, *tid, "Cpus_allowed_list").expect("Cpus_allowed_list")
}

/// `--cpus` pins queue q to the q-th CPU of the list (cycling).
#[test]
fn cpus_pin_queue_threads() {
    let Some(_h) = harness() else { return };
    if online_cpus() < 2 {
        skip(&format!("pinning to CPU 1 needs 2 CPUs, have {}", online_cpus()));
        return;
    }
    let dev = add(&["null", "--cpus", "1"]);
    assert_eq!(dev.json["cpus"], json!([1]), "{}", dev.json);
    assert_eq!(queue_cpus(&dev, 0), "1", "queue 0 of `add null --cpus 1`");
    del(dev.id);
    assert_gone(&dev);

    let dev = add(&["null", "-q", "2", "--cpus", "1,0"]);
    assert_eq!(queue_cpus(&dev, 0), "1", "queue 0 of `add null -q 2 --cpus 1,0`");
    assert_eq!(queue_cpus(&dev, 1), "0", "queue 1 of `add null -q 2 --cpus 1,0`");
    del(dev.id);
    assert_gone(&dev);
}

/// The I/O scheduler sysfs shows for device `id`'s queue (the bracketed name).
fn sysfs_scheduler(id: u32) -> String {
    let path = format!("/sys/block/ublkb{id}/queue/scheduler");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let active = text.split_whitespace().find(|w| w.starts_with('['));
    active
        .unwrap_or_else(|| panic!("no [active] scheduler in {path}: {text}"))
        .trim_matches(['[', ']'])
        .into()
}

/// `add` puts the queue on `none` unless told otherwise; `--scheduler keep`
/// leaves the kernel's choice (mq-deadline for one queue where built in),
/// a NAME the kernel offers is used; `list` (JSON and text) shows sysfs's
/// answer; a kill -9 and `recover` keep the scheduler.
#[test]
fn scheduler_is_none_by_default_and_chosen_with_a_flag() {
    let Some(_h) = harness() else { return };
    let dev = add(&["null", "-r"]);
    assert_eq!(sysfs_scheduler(dev.id), "none", "`add null` left the queue on another scheduler");
    assert_eq!(dev.json["scheduler"], "none", "{}", dev.json);
    let text = ublk(&["list", "-n", &dev.id.to_string()]).success().stdout;
    assert!(text.contains("scheduler none"), "`list` does not show the scheduler:\n{text}");
    signal(dev.pid, libc::SIGKILL);
    wait_until("the device to be QUIESCED", SETTLE, || {
        list_one(dev.id).is_some_and(|j| j["state"] == "QUIESCED")
    });
    ublk(&["recover", "-n", &dev.id.to_string()]).success();
    wait_until("the device to be LIVE again", SETTLE, || {
        list_one(dev.id).is_some_and(|j| j["state"] == "LIVE")
    });
    assert_eq!(sysfs_scheduler(dev.id), "none", "recovery changed the queue's scheduler");
    del(dev.id);

    let kept = add(&["null", "--scheduler", "keep"]);
    let offered = fs::read_to_string(format!("/sys/block/ublkb{}/queue/scheduler", kept.id)).expect("sysfs");
    let kernel_choice = sysfs_scheduler(kept.id);
    assert_eq!(kept.json["scheduler"], kernel_choice.as_str(), "{}", kept.json);
    if offered.contains("mq-deadline") {
        assert_eq!(kernel_choice, "mq-deadline", "--scheduler keep: the kernel gives one queue mq-deadline");
    }
    del(kept.id);
    let other = offered.split_whitespace().map(|w| w.trim_matches(['[', ']'])).find(|&w| w != "none");
    let Some(other) = other else {
        skip(&format!("the kernel offers no scheduler but none: {offered}"));
        return;
    };
    let dev = add(&["null", "--scheduler", other]);
    assert_eq!(sysfs_scheduler(dev.id), other, "--scheduler {other} was not applied");
    del(dev.id);
}

/// The CPUs the kernel may make queues for (ADD_DEV clamps -q to nr_cpu_ids).
fn possible_cpus() -> usize {
    let text = fs::read_to_string("/sys/devices/system/cpu/possible").expect("possible CPUs");
    let last = text.trim().rsplit([',', '-']).next().expect("a CPU").parse::<usize>().expect("a CPU id");
    last + 1
}

/// `-q 4` on fewer CPUs is allowed: the device gets the queues the kernel
/// makes (min of 4 and the possible CPUs), each thread on one online CPU,
/// and fio's verify from every online CPU moves I/O through every queue.
#[test]
fn more_queues_than_cpus_serve_io_on_every_queue() {
    let Some(_h) = harness() else { return };
    let dev = add(&["ram", "-q", "4", "--size", "32M"]);
    let made = 4.min(possible_cpus());
    assert_eq!(dev.json["queues"], made, "-q 4 with {} possible CPUs: {}", possible_cpus(), dev.json);
    for q in 0..made as u32 {
        let cpus = queue_cpus(&dev, q);
        assert!(cpus.parse::<usize>().is_ok_and(|c| c < online_cpus()), "queue {q} runs on {cpus}");
    }
    let per = 32 * MIB / online_cpus() as u64;
    let jobs: Vec<(String, Vec<String>)> = (0..online_cpus())
        .map(|c| {
            let opts = vec![
                format!("--cpus_allowed={c}"),
                format!("--offset={}", c as u64 * per),
                format!("--size={per}"),
                "--bs=4k".into(),
            ];
            (format!("cpu{c}"), opts)
        })
        .collect();
    let json = fio_jobs(Some(&dev.block()), &FIO_CRC_VERIFY, &jobs);
    assert_eq!(fio_bytes(&json, "write"), per * online_cpus() as u64, "fio did not write every region");
    // Per-queue totals: no window needed.
    let out = ublk(&["stats", "-n", &dev.id.to_string(), "--json", "--window", "0"]).success();
    let stats: Value = serde_json::from_str(&out.stdout).expect("stats --json is JSON");
    let queues = stats["queues"].as_array().expect("per-queue stats");
    assert_eq!(queues.len(), made, "{stats}");
    // blk-mq maps each online CPU to one queue: those queues all saw I/O.
    let busy = queues.iter().filter(|q| q["ios"].as_u64().unwrap_or(0) > 0).count();
    assert_eq!(busy, made.min(online_cpus()), "queues without I/O: {stats}");
    del(dev.id);
    assert_gone(&dev);
}

/// Two busy-polling queues on one CPU work, and `add` warns that the
/// spinning threads share it (stderr and the server log).
#[test]
fn polling_queues_sharing_a_cpu_are_warned_about() {
    let Some(_h) = harness() else { return };
    if online_cpus() < 2 || possible_cpus() < 2 {
        skip("two queues need two CPUs");
        return;
    }
    let out = ublk(&["add", "ram", "-q", "2", "--cpus", "1", "--poll", "--size", "16M"]).success();
    assert!(
        out.stderr.contains("share a CPU"),
        "no warning for two spinning threads on CPU 1:\n{}",
        out.describe()
    );
    let id = parse_dev_id(&out.stdout).expect("dev id");
    let log = fs::read_to_string(run_dir().join("server.log")).unwrap_or_default();
    let said = format!("device {id}: warning: 2 busy-polling");
    assert!(log.contains(&said), "the server log does not say `{said}`:\n{}", tail(&log, 2000));
    let dev = Dev {
        id,
        pid: list_one(id).expect("listed")["pid"].as_i64().expect("pid") as i32,
        json: Value::Null,
    };
    assert_eq!((queue_cpus(&dev, 0), queue_cpus(&dev, 1)), ("1".into(), "1".into()));
    let json = fio(&dev.block(), &[&FIO_CRC_VERIFY[..], &["--bs=4k", "--size=16M"]].concat());
    assert_eq!(fio_bytes(&json, "read"), 16 * MIB, "verify did not read the device back");
    del(id);
}

/// `del -a` with three devices of mixed kinds leaves an empty list.
#[test]
fn del_all_removes_mixed_devices() {
    let Some(_h) = harness() else { return };
    let q = online_cpus().min(2).to_string();
    let devs = [
        add(&["null", "-q", &q]),
        add(&["ram", "--size", "32M", "--poll"]),
        add(&["null", "-n", "9", "-d", "32"]),
    ];
    assert_eq!(list().len(), 3, "three devices expected: {:?}", list());
    ublk(&["del", "-a"]).success();
    let out = ublk(&["list", "--json"]).success();
    let v: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("list --json: {e}: {}", out.stdout));
    assert_eq!(v, json!([]), "list --json after del -a");
    devs.iter().for_each(assert_gone);
}

// ---------------------------------------------------------------- data

/// DISCARD (`blkdiscard`) and WRITE_ZEROES (`blkdiscard -z`) on ram read
/// back as zeros, and the bytes around each range keep their data.
#[test]
fn discard_and_write_zeroes_read_back_zeros() {
    let Some(_h) = harness() else { return };
    let blkdiscard = need_tool("blkdiscard");
    let dev = add(&["ram", "--size", "16M"]);
    let span = 8 * MIB;
    let data = random_bytes(span as usize, 0x5eed);
    let f = OpenOptions::new().write(true).open(dev.block()).expect("open the block device");
    f.write_all_at(&data, 0).expect("write the pattern");
    f.sync_all().expect("fsync the block device");
    drop(f);
    assert!(read_direct(&dev.block(), 0, span) == data, "the pattern did not read back before any discard");

    // 4 KiB aligned, but not on MiB boundaries, so neighbours share pages.
    let ranges = [("discard", MIB + (64 << 10), 512 << 10), ("write zeroes", 5 * MIB + 4096, 300 << 10)];
    let mut expect = data;
    for (what, off, len) in ranges {
        let mut cmd = Command::new(&blkdiscard);
        if what == "write zeroes" {
            cmd.arg("-z");
        }
        run(cmd.args(["-o", &off.to_string(), "-l", &len.to_string()]).arg(dev.block())).success();
        expect[off as usize..(off + len) as usize].fill(0);
    }
    let back = read_direct(&dev.block(), 0, span);
    if let Some(at) = back.iter().zip(&expect).position(|(a, b)| a != b) {
        let at = at as u64;
        let place =
            ranges.iter().find(|(_, off, len)| (*off..off + len).contains(&at)).map_or(
                "outside the ranges: data around a range was changed".to_string(),
                |(what, off, len)| format!("inside the {what} range {off}+{len}: not zero"),
            );
        panic!("byte {at} reads {:#04x}, expected {:#04x}, {place}", back[at as usize], expect[at as usize]);
    }
    del(dev.id);
    assert_gone(&dev);
}

// ---------------------------------------------------------------- file, ram zero copy

/// A user's file of `len` bytes of `random_bytes(len, seed)` in `dir`.
fn user_file(dir: &std::path::Path, len: u64, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join("img");
    let data = random_bytes(len as usize, seed);
    fs::write(&path, &data).expect("write the user's file");
    (path, data)
}

/// `add file --path P` (with `extra`) serves the file: what it held reads
/// back; a write flushed by the block layer (fsync on the device) is in the
/// file through another descriptor; DISCARD and WRITE_ZEROES zero their
/// ranges in the file and nothing around them; `del` leaves the file in
/// place at its size, holding what was written.
fn file_serves(dir: &std::path::Path, extra: &[&str], mode: &str) {
    let size = 16 * MIB;
    let (path, mut expect) = user_file(dir, size, 0xf11e);
    let p = path.to_string_lossy().into_owned();
    let mut args = vec!["file", "--path", &p, "-d", "64"];
    args.extend_from_slice(extra);
    let what = format!("add {}", args.join(" "));
    let dev = add(&args);
    let j = &dev.json;
    assert_eq!(
        (&j["backend"], &j["size"], &j["copy_mode"]),
        (&json!("file"), &json!(size), &json!(mode)),
        "{what}: {j}"
    );
    assert!(
        read_direct(&dev.block(), 0, MIB) == expect[..MIB as usize],
        "{what}: the file's data did not read back"
    );

    let data = random_bytes(MIB as usize, 0xda7a);
    let f = OpenOptions::new().write(true).open(dev.block()).expect("open the block device");
    f.write_all_at(&data, 2 * MIB).expect("write");
    f.sync_all().expect("fsync the block device: FLUSH");
    drop(f);
    expect[(2 * MIB) as usize..(3 * MIB) as usize].copy_from_slice(&data);
    let mut got = vec![0u8; MIB as usize];
    fs::File::open(&path).expect("open the file").read_exact_at(&mut got, 2 * MIB).expect("read the file");
    assert!(got == data, "{what}: a flushed write is not in the file");

    let blkdiscard = need_tool("blkdiscard");
    for (z, off, len) in [(false, 5 * MIB + 4096, 512 << 10), (true, 9 * MIB + 8192, 300 << 10)] {
        let mut cmd = Command::new(&blkdiscard);
        if z {
            cmd.arg("-z");
        }
        run(cmd.args(["-o", &off.to_string(), "-l", &len.to_string()]).arg(dev.block())).success();
        expect[off as usize..(off + len) as usize].fill(0);
    }
    assert!(
        read_direct(&dev.block(), 0, size) == expect,
        "{what}: the device does not read back as expected"
    );
    del(dev.id);
    assert_gone(&dev);
    let after = fs::read(&path).expect("the user's file is still there");
    assert_eq!(after.len() as u64, size, "{what}: the file's size changed");
    if let Some(at) = after.iter().zip(&expect).position(|(a, b)| a != b) {
        panic!("{what}: byte {at} of the file is {:#04x}, expected {:#04x}", after[at], expect[at]);
    }
}

/// The file backend in each data path: zero copy (AUTO_BUF_REG, and the
/// explicit REGISTER chain), copy mode, and O_DIRECT; on tmpfs (/dev/shm)
/// and on the filesystem of the temporary folder. Each on its own file (in
/// a folder of its own) and device, all at once ([`side_by_side`]).
#[test]
fn file_backend_serves_the_file_and_leaves_it() {
    let Some(_h) = harness() else { return };
    // (on tmpfs, add options, the copy mode they give)
    let cases: [(bool, &[&str], &str); 5] = [
        (true, &[], "zero"),
        (true, &["--explicit-buf-reg"], "zero"),
        (true, &["--copy-mode", "copy"], "copy"),
        (true, &["--direct", "-q", "2"], "zero"),
        (false, &[], "zero"),
    ];
    side_by_side(&cases, |&(shm, extra, mode)| {
        let dir = if shm { tempfile::tempdir_in("/dev/shm") } else { tempfile::tempdir() };
        file_serves(dir.expect("a temporary folder").path(), extra, mode)
    });
}

/// fio's own CRC32C verification ([`fio_verify_devices`]: 4 KiB random
/// writes, then mixed sizes up to 256 KiB) on `file` and on `ram` in zero
/// copy (auto and explicit registration), ram with 1 queue and with 2, all
/// at once.
#[test]
fn fio_verify_file_and_ram_zero_copy() {
    let Some(_h) = harness() else { return };
    let shm = tempfile::tempdir_in("/dev/shm").expect("a folder in /dev/shm");
    let (path, _) = user_file(shm.path(), 32 * MIB, 1);
    let mut devs = vec![
        ("file", add(&["file", "--path", &path.to_string_lossy()])),
        ("ram", add(&["ram", "--size", "32M"])),
        ("ram-explicit", add(&["ram", "--size", "32M", "--explicit-buf-reg", "-q", "2"])),
    ];
    if online_cpus() >= 2 {
        devs.push(("ram-2q", add(&["ram", "-q", "2", "--size", "32M"])));
    }
    for (_, d) in &devs {
        assert_eq!(d.json["copy_mode"], "zero", "auto picks zero copy on this kernel: {}", d.json);
    }
    assert_eq!(devs[1].1.json["queues"], 1, "ram without -q: {}", devs[1].1.json);
    let named: Vec<(&str, &Dev)> = devs.iter().map(|(l, d)| (*l, d)).collect();
    fio_verify_devices(&named, 32 * MIB);
    for (_, d) in &devs {
        del(d.id);
        assert_gone(d);
    }
}

/// Whether process `pid` maps `path` (`/proc/PID/maps`).
fn maps(pid: i32, path: &str) -> bool {
    fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|m| m.lines().any(|l| l.ends_with(path)))
}

/// In zero copy neither the server nor its hot standby maps the RAM store;
/// in user copy the server does (so the check can see a mapping).
#[test]
fn ram_zero_copy_maps_no_store() {
    let Some(_h) = harness() else { return };
    let dev = add(&["ram", "--size", "16M", "--standby"]);
    let store = dev.json["store"].as_str().expect("a store").to_string();
    assert_eq!(dev.json["copy_mode"], "zero", "{}", dev.json);
    run(&mut dd_direct(&dev.block(), 0, MIB)).success();
    // The standby is a second ublk-bench process with a queue thread.
    let q0 = format!("ublk{}q0", dev.id);
    let with_queue =
        || servers().into_iter().filter(|p| threads(p.pid).iter().any(|(_, c)| *c == q0)).count();
    wait_until("the standby's queue thread", Duration::from_secs(60), || with_queue() >= 2);
    for p in servers() {
        assert!(!maps(p.pid, &store), "ublk-bench pid {} ({}) maps the store {store}", p.pid, p.comm);
    }
    let user = add(&["ram", "--size", "16M", "--copy-mode", "user"]);
    let user_store = user.json["store"].as_str().expect("a store").to_string();
    assert!(maps(user.pid, &user_store), "a user-copy server does not map its store");
    for d in [&dev, &user] {
        del(d.id);
        assert_gone(d);
    }
}

/// The io-wq workers of device `id`'s queue threads (`iou-wrk-<tid>` of a
/// `ublk{id}q{q}` thread); the control thread has its own, for control
/// commands, which io_uring always hands to a worker.
fn io_workers(dev: &Dev) -> usize {
    let all = threads(dev.pid);
    let queue = format!("ublk{}q", dev.id);
    let workers: Vec<String> =
        all.iter().filter(|(_, c)| c.starts_with(&queue)).map(|(t, _)| format!("iou-wrk-{t}")).collect();
    all.iter().filter(|(_, c)| workers.contains(c)).count()
}

/// tmpfs READ and WRITE stay in the queue thread: after 4 KiB random
/// writes, then reads, at depth 32 the server has no io-wq worker, where a
/// DISCARD (fallocate, which io_uring always hands to a worker) makes one,
/// so the count can see them. Workers idle for seconds (io-wq's idle
/// timeout is 5 s) before they exit, so one count after both phases (one
/// second each, one fio start) sees a worker either phase made.
#[test]
fn tmpfs_io_runs_inline() {
    let Some(_h) = harness() else { return };
    let dev = add(&["ram", "--size", "64M"]);
    let global =
        ["--ioengine=io_uring", "--direct=1", "--bs=4k", "--iodepth=32", "--runtime=1", "--time_based"];
    let jobs: Vec<(String, Vec<String>)> = ["randwrite", "randread"]
        .iter()
        .map(|rw| (rw.to_string(), vec![format!("--rw={rw}"), "--stonewall".into()]))
        .collect();
    let json = fio_jobs(Some(&dev.block()), &global, &jobs);
    for (rw, dir) in [("randwrite", "write"), ("randread", "read")] {
        assert!(fio_job_bytes(&json, rw, dir) > 0, "fio job {rw} moved nothing: {json}");
    }
    assert_eq!(
        io_workers(&dev),
        0,
        "the server's store I/O (random writes, then reads) went to io-wq workers: {:?}",
        threads(dev.pid)
    );
    run(Command::new(need_tool("blkdiscard")).args(["-o", "0", "-l", "1048576"]).arg(dev.block())).success();
    assert!(
        io_workers(&dev) > 0,
        "a DISCARD made no io-wq worker: the count sees nothing: {:?}",
        threads(dev.pid)
    );
    del(dev.id);
    assert_gone(&dev);
}

// ---------------------------------------------------------------- errors

fn assert_all_rejected(cases: &[(&[&str], &[&str])]) {
    let failures: Vec<String> =
        cases.iter().filter_map(|(args, hints)| check_rejected(args, hints)).collect();
    assert!(
        failures.is_empty(),
        "{} bad input(s) not handled well:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Each bad `add` gets a non-zero exit and a message that names the
/// problem, and makes no device and no process.
#[test]
fn bad_input_is_rejected_and_leaves_nothing() {
    let Some(_h) = harness() else { return };
    assert_all_rejected(&[
        (&["add", "null", "--size", "0"], &["--size", "range"]),
        (&["add", "null", "--size", "2P"], &["--size", "range"]),
        // Below the 1 MiB minimum as well as not a multiple of 512.
        (&["add", "null", "--size", "1000001"], &["--size"]),
        (&["add", "null", "--size", "2000001"], &["multiple", "block size"]),
        (&["add", "null", "--size", "12x"], &["12x", "unit"]),
        (&["add", "null", "--size", "lots"], &["lots", "size"]),
        (&["add", "null", "--size", "99999999999P"], &["too large"]),
        (&["add", "null", "-d", "0"], &["-d", "range"]),
        (&["add", "null", "-d", "5000"], &["-d", "range"]),
        (&["add", "null", "-q", "0"], &["-q", "range"]),
        (&["add", "null", "-q", "4097"], &["-q", "range", "4096"]),
        (&["add", "null", "--scheduler", "No/Such"], &["scheduler name", "keep"]),
        (&["add", "null", "--scheduler", "nosuchsched"], &["nosuchsched", "offers", "keep"]),
        (&["add", "foo"], &["foo", "null", "ram"]),
        (&["add", "null", "--cpus", "99"], &["cpu", "99"]),
        (&["add", "null", "--cpus", "x"], &["cpu"]),
        (&["add", "null", "-n", "2000000"], &["-n", "range"]),
        (&["add", "null", "--gather-wait", "10001"], &["--gather-wait", "10000"]),
        (&["add", "null", "--poll", "--gather-wait", "10"], &["--gather-wait", "--poll"]),
        (&["add", "null", "-b", "3000"], &["block size"]),
        (&["del", "-n", "3"], &["3", "list"]),
    ]);
}

/// `add file` with a file it cannot serve: too small, --size beyond the
/// file, a read-only file (a read-only bind mount, so root cannot write it
/// either), --store. Each is refused with its own message before any device
/// exists, makes nothing (`check_rejected`), and leaves the file as it was.
#[test]
fn file_bad_input_is_rejected_and_leaves_the_file_alone() {
    let Some(_h) = harness() else { return };
    let dir = tempfile::tempdir().expect("a temporary folder");
    let (tiny, img, ro) = (dir.path().join("tiny"), dir.path().join("img"), dir.path().join("ro"));
    fs::write(&tiny, [1u8; 100]).expect("write tiny");
    fs::write(&img, random_bytes(MIB as usize, 3)).expect("write img");
    fs::write(&ro, random_bytes(MIB as usize, 4)).expect("write ro");
    let s = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let (tiny_s, img_s, ro_s) = (s(&tiny), s(&img), s(&ro));
    let mounted = run(Command::new("mount").args(["--bind", &ro_s, &ro_s])).ok()
        && run(Command::new("mount").args(["-o", "remount,bind,ro", &ro_s])).ok();
    let before: Vec<(Vec<u8>, Option<std::time::SystemTime>)> = [&tiny, &img, &ro]
        .iter()
        .map(|p| (fs::read(p).expect("read"), fs::metadata(p).and_then(|m| m.modified()).ok()))
        .collect();
    let cases: &[(&[&str], &[&str])] = &[
        (&["add", "file", "--path", &tiny_s], &["100 bytes", "less than one 512-byte block"]),
        (&["add", "file", "--path", &img_s, "--size", "2M"], &["exceeds", "give at most 1048576"]),
        (&["add", "file", "--path", &ro_s], &["cannot be opened read-write", "writes to it"]),
        (&["add", "file", "--path", &img_s, "--store", "/dev/shm/x"], &["--store", "ram backend"]),
    ];
    let failures: Vec<String> = cases.iter().filter_map(|(a, h)| check_rejected(a, h)).collect();
    let _ = run(Command::new("umount").arg(&ro_s));
    assert!(mounted, "could not make {ro_s} a read-only bind mount");
    assert!(
        failures.is_empty(),
        "{} bad input(s) not handled well:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    for (p, (data, mtime)) in [&tiny, &img, &ro].iter().zip(before) {
        assert!(fs::read(p).expect("read") == data, "{} changed", p.display());
        assert_eq!(fs::metadata(p).and_then(|m| m.modified()).ok(), mtime, "{} was written", p.display());
    }
}

/// A device id that is taken is refused, and the device that has it is
/// left alone, served by the same and only process.
#[test]
fn device_id_in_use_is_rejected() {
    let Some(_h) = harness() else { return };
    let dev = add(&["null", "-n", "5"]);
    let out = ublk(&["add", "null", "-n", "5"]);
    assert!(!out.ok(), "a second `add -n 5` succeeded:\n{}", out.describe());
    let err = out.stderr.to_lowercase();
    assert!(err.contains("in use") && err.contains('5'), "unhelpful message:\n{}", out.describe());
    wait_until("the failed add's server to go", SETTLE, || servers().len() == 1);
    assert_eq!(servers()[0].pid, dev.pid, "the only server left is not device 5's");
    let now = list();
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(now[0]["dev_id"], 5);
    assert_eq!(now[0]["pid"], dev.pid);
    assert_eq!(now[0]["state"], "LIVE");
    del(dev.id);
    assert_gone(&dev);
}

/// Run as uid 65534, every command says it needs root.
#[test]
fn not_root_is_told_to_run_as_root() {
    let Some(_h) = harness() else { return };
    let Some(setpriv) = tool("setpriv") else {
        skip("setpriv (util-linux) not found, cannot drop root");
        return;
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("not running as root, cannot switch to uid 65534");
        return;
    }
    // The build folder may be out of reach of nobody (e.g. under /root).
    let dir = tempfile::Builder::new().prefix("ublk-bench-nobody.").tempdir().expect("temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let bin = dir.path().join("ublk-bench");
    fs::copy(common::bin(), &bin).expect("copy the binary");
    let failures: Vec<String> = [&["list"][..], &["add", "null"], &["del", "-a"], &["features"]]
        .iter()
        .filter_map(|args| {
            let out = run(Command::new(&setpriv)
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(&bin)
                .args(*args));
            let fine = !out.ok() && out.stderr.contains("root") && !out.stderr.contains("panicked");
            (!fine).then(|| format!("`ublk-bench {}` as uid 65534:\n{}", args.join(" "), out.describe()))
        })
        .collect();
    assert!(failures.is_empty(), "not-root not explained:\n{}", failures.join("\n"));
}

/// Without the driver, commands fail non-zero and say how to load it.
/// Where the driver is loaded (the guest) the binary runs where
/// /dev/ublk-control is hidden from it (see [`without_driver`]).
#[test]
fn no_driver_error_says_modprobe() {
    let _h = if have_driver() { harness() } else { None };
    for args in [&["list"][..], &["add", "null", "--size", "1G"], &["del", "-a"]] {
        let out = run(&mut without_driver(args));
        assert!(
            !out.ok(),
            "`ublk-bench {}` succeeded without the driver:\n{}",
            args.join(" "),
            out.describe()
        );
        assert!(
            out.stderr.contains("modprobe ublk_drv") && !out.stderr.contains("panicked"),
            "`ublk-bench {}` without the driver does not say `modprobe ublk_drv`:\n{}",
            args.join(" "),
            out.describe()
        );
    }
}

/// `ublk-bench ARGS` on a machine without /dev/ublk-control. Where the
/// driver is loaded: in a private mount namespace (`unshare -m`, root)
/// with an empty tmpfs over /dev, which hides the control node from this
/// command alone; the shell checks it is gone before running the binary.
fn without_driver(args: &[&str]) -> Command {
    if !have_driver() {
        let mut cmd = Command::new(bin());
        cmd.args(args);
        return cmd;
    }
    let script = format!(
        "mount -t tmpfs -o mode=755 nodev /dev && test ! -e {CONTROL} && exec \"$@\" || \
         {{ echo 'could not hide {CONTROL}' >&2; exit 99; }}"
    );
    let mut cmd = Command::new(need_tool("unshare"));
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c", &script, "sh"]).arg(bin()).args(args);
    cmd
}

/// Static checks come before the root, driver and device checks: on the
/// host (no driver) and in the guest alike, each bad input gets its own
/// message, never `modprobe ublk_drv`, never a panic, and in the guest the
/// harness then checks that no device or process was left.
#[test]
fn static_errors_come_before_driver_checks() {
    // Only with the driver: the harness kills every ublk-bench process, which
    // on a shared host would include other people's.
    let _h = have_driver().then(harness).flatten();
    let cases: &[(&[&str], &[&str])] = &[
        (&["add", "null", "--supervise", "--foreground"], &["drop --foreground"]),
        (&["add", "ram", "--standby", "--foreground"], &["drop --foreground"]),
        (&["add", "file", "--path", "/", "--copy-mode", "user"], &["user copy", "--copy-mode zero"]),
        (&["add", "file"], &["--path"]),
        (&["add", "file", "--path", "/"], &["is a directory"]),
        (&["add", "file", "--path", "/dev/null"], &["neither a regular file nor a block device"]),
        (&["add", "file", "--path", "/nonexistent-ublk-bench"], &["--path", "existing"]),
        (&["add", "ram", "--path", "/etc/passwd"], &["--path", "file backend", "--store"]),
        (&["add", "null", "--direct"], &["--direct", "file backend"]),
        (&["add", "nvme", "--dev", "/dev/null", "--copy-mode", "user"], &["user copy", "--copy-mode zero"]),
        (&["add", "null", "--explicit-buf-reg"], &["--explicit-buf-reg", "zero copy"]),
        (&["add", "ram", "--copy-mode", "user", "--explicit-buf-reg"], &["--explicit-buf-reg", "zero copy"]),
        (&["add", "null", "--cpus", "0-99999999999"], &["cpu 99999999999", "does not exist"]),
        (&["add", "null", "--cpus", "99"], &["cpu 99"]),
        (&["add", "null", "--size", "99999999999999999999"], &["too large"]),
        (&["add", "null", "--size", "2000001"], &["multiple", "block size"]),
        (&["add", "null", "-q", "0"], &["-q", "range"]),
        (&["add", "null", "--scheduler", "Bad/Name"], &["scheduler name", "keep"]),
        (&["add", "null", "-q", "4097"], &["-q", "range", "4096"]),
        (&["add", "null", "-q", "70000"], &["-q", "range"]),
        (&["add", "null", "-d", "70000"], &["-d", "range"]),
        (&["add", "null", "-n", "2000000"], &["-n", "range"]),
        (&["add", "null", "-b", "3000"], &["block size"]),
        (&["downtime", "--cycles", "4000000000"], &["--cycles", "range"]),
        (&["downtime", "--interval", "0"], &["--interval", "range"]),
        (&["downtime", "--jobs", "256", "--iodepth", "4096", "--bs", "1M"], &["client would need", "--jobs"]),
        (&["downtime", "--rwmix", "101"], &["--rwmix"]),
        (&["downtime", "--poll", "--gather-wait", "10"], &["--gather-wait", "--poll"]),
        (&["downtime", "--bs", "1000"], &["--bs"]),
        (&["downtime", "--jobs", "0"], &["--jobs"]),
        (&["downtime", "-q", "70000"], &["-q", "range"]),
        (&["downtime", "--backend", "nvme"], &["nvme", "--dev"]),
        (&["downtime", "--backend", "file", "--path", "/nonexistent/dt"], &["--path", "existing"]),
        (&["downtime", "--reuse", "-n", "3", "--copy-mode", "user"], &["--copy-mode", "--reuse", "drop"]),
        (&["downtime", "--reuse"], &["--number"]),
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(args, hints)| {
            let out = ublk(args);
            let err = out.stderr.to_lowercase();
            let problem = if out.ok() {
                Some("exit status 0".to_string())
            } else if err.contains("panicked") {
                Some("it panicked".to_string())
            } else if err.contains("modprobe") || err.contains("must run as root") {
                Some("a machine check came before the static one".to_string())
            } else {
                hints.iter().find(|h| !err.contains(&h.to_lowercase())).map(|h| format!("no `{h}` in it"))
            };
            problem.map(|p| format!("`ublk-bench {}`: {p}\n{}", args.join(" "), out.describe()))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} static error(s) not handled well:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );

    // One limit and one message for -q, whatever the value.
    let q = |n: &str| ublk(&["add", "null", "-q", n]).stderr.replace(n, "N");
    assert_eq!(q("4097"), q("70000"), "-q 4097 and -q 70000 get different messages");
    let zero = ublk(&["add", "null", "-q", "0"]).stderr;
    assert!(zero.contains("between 1 and 4096"), "-q 0: {zero}");
}

/// `downtime -n ID` creates device ID and refuses one that exists (that
/// takes `--reuse`), and an `--out` that cannot be written is refused
/// before any device is made. Neither touches the existing device.
#[test]
fn downtime_refuses_an_existing_id_and_an_unwritable_out() {
    let Some(_h) = harness() else { return };
    let dev = add(&["null", "-n", "4", "-r"]);
    let tmp = tempfile::tempdir().expect("temp dir");
    let file = tmp.path().join("file");
    fs::write(&file, b"not a folder").expect("write");
    let bad_out = file.join("out");
    let bad_out = bad_out.to_str().expect("utf-8");
    // Not check_rejected: device 4 is meant to stay, and it would count as left over.
    let cases: [(&[&str], &[&str]); 3] = [
        (&["downtime", "-n", "4", "--cycles", "1"], &["device 4", "exists", "--reuse"]),
        (&["downtime", "--cycles", "1", "--out", bad_out], &["--out", "file/out"]),
        (&["downtime", "--reuse", "-n", "4", "--cycles", "1", "--out", bad_out], &["--out"]),
    ];
    for (args, hints) in cases {
        let out = ublk(args);
        let fine =
            !out.ok() && !out.stderr.contains("panicked") && hints.iter().all(|h| out.stderr.contains(h));
        assert!(fine, "`ublk-bench {}` not refused as expected:\n{}", args.join(" "), out.describe());
    }
    let now = list();
    assert_eq!(now.len(), 1, "devices after the refused runs: {now:?}");
    assert_eq!(
        (now[0]["dev_id"].as_u64(), now[0]["pid"].as_i64()),
        (Some(4), Some(dev.pid as i64)),
        "{now:?}"
    );
    assert_eq!(now[0]["state"], "LIVE");
    assert_eq!(fs::read(&file).expect("read"), b"not a folder", "the file under --out was changed");
    del(dev.id);
    assert_gone(&dev);
}

/// `list` and `del -a` with no device: an empty list and exit 0, and on an
/// unreadable sysfs the fallback still finds the device (checked through a
/// private mount namespace with an empty tmpfs over /sys).
#[test]
fn list_and_del_all_without_sysfs_fall_back_to_probing() {
    let Some(_h) = harness() else { return };
    let Some(unshare) = tool("unshare") else {
        skip("unshare (util-linux) not found");
        return;
    };
    let dev = add(&["null", "-n", "6"]);
    let hidden = |args: &str| {
        let script = format!("mount -t tmpfs none /sys && exec {} {args}", bin().display());
        run(Command::new(&unshare).args(["-m", "--propagation", "private", "sh", "-c", &script]))
    };
    let out = hidden("list --json");
    assert!(out.ok(), "list without sysfs:\n{}", out.describe());
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.describe()));
    assert_eq!(v.as_array().map(|a| a.len()), Some(1), "list without sysfs: {v}");
    assert_eq!(v[0]["dev_id"], 6, "{v}");
    assert!(out.stderr.contains("probing"), "no note that sysfs was unreadable:\n{}", out.describe());
    let out = hidden("del -a");
    assert!(out.ok(), "del -a without sysfs:\n{}", out.describe());
    assert_gone(&dev);
    let out = ublk(&["list", "--json"]).success();
    assert_eq!(out.stdout.trim(), "[]", "list with no device");
}

// ---------------------------------------------------------------- ram store on a full tmpfs

/// A tmpfs of a few MiB mounted on a fresh folder; unmounted (lazily, so a
/// failed test with the store still open does not leave it) on drop.
struct SmallTmpfs {
    dir: tempfile::TempDir,
}

impl SmallTmpfs {
    fn new(mib: u64) -> Self {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let size = format!("size={mib}m");
        run(Command::new("mount").args([
            "-t",
            "tmpfs",
            "-o",
            &size,
            "ublk-test",
            &dir.path().to_string_lossy(),
        ]))
        .success();
        SmallTmpfs { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `name` until the file system is full; returns the bytes written.
    fn fill(&self, name: &str) -> u64 {
        let mut f = fs::File::create(self.path(name)).expect("create the filler");
        let chunk = vec![0x5au8; 1 << 20];
        let mut written = 0u64;
        loop {
            match std::io::Write::write(&mut f, &chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling the tmpfs: {e}");
                    break;
                }
            }
        }
        written
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Writes `data` to `dev` at `offset` with O_DIRECT, in 1 MiB requests;
/// the first error, if any, with the offset it came at.
fn write_direct(dev: &std::path::Path, offset: u64, data: &[u8]) -> Result<(), (u64, std::io::Error)> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap_or_else(|e| panic!("open {} O_DIRECT: {e}", dev.display()));
    let chunk = 1usize << 20;
    let mut buf = vec![0u8; chunk + 4096];
    let at = buf.as_ptr().align_offset(4096);
    for (i, part) in data.chunks(chunk).enumerate() {
        let aligned = &mut buf[at..at + part.len()];
        aligned.copy_from_slice(part);
        let pos = offset + (i * chunk) as u64;
        f.write_all_at(aligned, pos).map_err(|e| (pos, e))?;
    }
    Ok(())
}

/// Issue 22 item 6: a RAM store whose tmpfs another file fills after `add`.
/// By default the store was reserved at `add`, so every write still lands
/// and reads back. With `--sparse` a write into a hole fails with ENOSPC,
/// for that request only: the server lives on (no SIGBUS, no crash loop) and
/// serves the same writes once space is freed. Every copy mode, since each
/// reaches the store another way (map, map through pread, the kernel's fd).
#[test]
fn ram_store_on_a_full_tmpfs_fails_a_write_not_the_server() {
    let Some(_h) = harness() else { return };
    let size = 8 * MIB;
    let data = random_bytes(size as usize, 0x5ba2);
    let cases: Vec<(&str, bool)> =
        ["copy", "user", "zero"].into_iter().flat_map(|m| [(m, false), (m, true)]).collect();
    // Each case has its own tmpfs, store and device: all at once.
    side_by_side(&cases, |&(mode, sparse)| {
        let what = format!("--copy-mode {mode}{}", if sparse { " --sparse" } else { "" });
        let fs = SmallTmpfs::new(16);
        let store = fs.path("store");
        let store_arg = store.to_string_lossy().into_owned();
        let mut args = vec!["ram", "--size", "8M", "--store", &store_arg, "--copy-mode", mode];
        if sparse {
            args.push("--sparse");
        }
        let dev = add(&args);
        let filled = fs.fill("filler");
        assert!(filled > 0, "{what}: the filler got no space at all");
        match write_direct(&dev.block(), 0, &data) {
            Ok(()) => {
                assert!(!sparse, "{what}: writes into a sparse store on a full tmpfs all succeeded")
            }
            Err((pos, e)) => {
                assert!(sparse, "{what}: a write at {pos} into the reserved store failed: {e}");
                assert!(
                    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EIO)),
                    "{what}: the write at {pos} failed with {e}, not ENOSPC or EIO"
                );
            }
        }
        // The server lives and serves: after a failed write too.
        sleep_ms(200);
        assert!(alive(dev.pid), "{what}: the server (pid {}) died on the full tmpfs", dev.pid);
        let j = list_one(dev.id).unwrap_or_else(|| panic!("{what}: device {} is gone", dev.id));
        assert_eq!(j["state"], "LIVE", "{what}: {j}");
        assert_eq!(j["pid"], dev.pid, "{what}: another server serves the device now (a restart): {j}");
        if sparse {
            fs::remove_file(fs.path("filler")).expect("remove the filler");
            write_direct(&dev.block(), 0, &data)
                .unwrap_or_else(|(pos, e)| panic!("{what}: write at {pos} with space free again: {e}"));
        }
        assert!(
            read_direct(&dev.block(), 0, size) == data,
            "{what}: the device does not read back its writes"
        );
        del(dev.id);
        assert_gone(&dev);
    });
}

// ---------------------------------------------------------------- devices started side by side

/// Issue 22 item 10: many `add`s at once, each its own server starting while
/// the others do (ADD_DEV, open of `/dev/ublkcN`, FETCH, START_DEV and its
/// partition scan all interleaved): kernel-picked and fixed ids, every copy
/// mode, with and without -r, in the shape of the report (`-q 2 -d 128`).
/// Every one must go LIVE and serve a verify, several rounds in a row; the
/// deletes of a round run side by side too, and each must succeed.
#[test]
fn devices_added_side_by_side_all_go_live_and_serve() {
    let Some(_h) = harness() else { return };
    let size = 4 * MIB;
    for round in 0..3 {
        let mut shapes: Vec<Vec<String>> = vec![];
        let mut fixed = 40 + round * 20;
        for mode in ["copy", "user", "zero"] {
            for recovery in [false, true] {
                for kernel_id in [true, false] {
                    let mut a: Vec<String> = [
                        "add",
                        "ram",
                        "-q",
                        "2",
                        "-d",
                        "128",
                        "--size",
                        "4M",
                        "--part-scan",
                        "--copy-mode",
                        mode,
                    ]
                    .map(String::from)
                    .into();
                    if recovery {
                        a.push("-r".into());
                    }
                    if !kernel_id {
                        a.extend(["-n".into(), fixed.to_string()]);
                        fixed += 1;
                    }
                    shapes.push(a);
                }
            }
        }
        let started: Vec<(String, Running)> =
            shapes.iter().map(|a| (a.join(" "), spawn(Command::new(bin()).args(a)))).collect();
        let mut devs = vec![];
        let mut failed = vec![];
        for (what, r) in started {
            let out = r.finish(CMD_TIMEOUT);
            match parse_dev_id(&out.stdout).filter(|_| out.ok() && out.stdout.contains("state LIVE")) {
                Some(id) => devs.push((what, id)),
                None => failed.push(format!("`{what}`:\n{}", out.describe())),
            }
        }
        if !failed.is_empty() {
            let log = fs::read_to_string(run_dir().join("server.log")).unwrap_or_default();
            panic!(
                "round {round}: {} of {} adds failed:\n{}\nserver log (tail):\n{}",
                failed.len(),
                shapes.len(),
                failed.join("\n"),
                tail(&log, 6000)
            );
        }
        // One `list` for the round: a process start costs a good part of a
        // second under emulation.
        let listed = list();
        let live: Vec<Dev> = devs
            .iter()
            .map(|(what, id)| {
                let j = listed
                    .iter()
                    .find(|d| d["dev_id"] == *id)
                    .cloned()
                    .unwrap_or_else(|| panic!("round {round}: `{what}` made {id}, not listed"));
                assert_eq!(j["state"], "LIVE", "round {round}: `{what}`: {j}");
                let pid = j["pid"].as_i64().expect("pid") as i32;
                assert!(alive(pid), "round {round}: the server of `{what}` (device {id}) is gone");
                Dev { id: *id, pid, json: j }
            })
            .collect();
        let mut ids: Vec<u32> = live.iter().map(|d| d.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), shapes.len(), "round {round}: two adds reported the same device: {devs:?}");
        let labels: Vec<String> = live.iter().map(|d| format!("dev{}", d.id)).collect();
        let pairs: Vec<(&str, &Dev)> = labels.iter().map(String::as_str).zip(&live).collect();
        fio_verify_devices(&pairs, size);
        // The deletes side by side too; each must succeed.
        for d in &live {
            wait_until(&format!("round {round}: fio to let go of device {}", d.id), SETTLE, || {
                openers(&d.block()).is_empty()
            });
        }
        let dels: Vec<Running> =
            live.iter().map(|d| spawn(Command::new(bin()).args(["del", "-n", &d.id.to_string()]))).collect();
        for r in dels {
            r.finish(CMD_TIMEOUT).success();
        }
        assert_all_gone(&live);
    }
}

/// The AUTO_BUF_REG fallback: with the fault hook `auto-buf-reg-fallback`
/// every FETCH and COMMIT names a buffer slot past the queue's table, so
/// the kernel cannot register any request's pages and hands each over with
/// UBLK_IO_F_NEED_REG_BUF; the server registers them itself (a
/// REGISTER/UNREGISTER chain) and fio's verification passes. Without the
/// fallback flag every request would fail with EIO. Per-tag and `--batch`
/// (whose PREP and COMMIT arrays carry UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK).
#[test]
fn auto_buf_reg_fallback_serves_every_request() {
    let Some(_h) = harness() else { return };
    let add_faulty = |extra: &[&str]| {
        let out = run(Command::new(bin())
            .args(["add", "ram", "--size", "16M", "-q", "1"])
            .args(extra)
            .env("UBLK_BENCH_FAULT", "auto-buf-reg-fallback"))
        .success();
        let id = parse_dev_id(&out.stdout).unwrap_or_else(|| panic!("no device:\n{}", out.describe()));
        let json = list_one(id).expect("the device is listed");
        let flags: Vec<&str> = json["flags"].as_array().unwrap().iter().filter_map(|f| f.as_str()).collect();
        assert!(flags.contains(&"AUTO_BUF_REG") && flags.contains(&"ZERO_COPY"), "{extra:?}: {json}");
        Dev { id, pid: json["pid"].as_i64().unwrap() as i32, json }
    };
    let (per_tag, batch) = (add_faulty(&[]), add_faulty(&["--batch"]));
    fio_verify_devices(&[("ram-fallback", &per_tag), ("ram-batch-fallback", &batch)], 16 * MIB);
    for dev in [per_tag, batch] {
        del(dev.id);
        assert_gone(&dev);
    }
}

/// A disk image with an MBR and one partition (sectors 2048-4095).
fn mbr_image(dir: &std::path::Path) -> std::path::PathBuf {
    let mut img = vec![0u8; 4 * MIB as usize];
    let entry = &mut img[446..462];
    entry[4] = 0x83;
    entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
    entry[12..16].copy_from_slice(&2048u32.to_le_bytes());
    img[510] = 0x55;
    img[511] = 0xaa;
    let path = dir.join("disk.img");
    fs::write(&path, img).expect("write the image");
    path
}

/// No partition scan by default (UBLK_F_NO_AUTO_PART_SCAN): an image with
/// a partition table shows no partition; with `--part-scan` the kernel
/// scans at start and `ublkbNp1` appears.
#[test]
fn partitions_are_scanned_only_when_asked() {
    let Some(_h) = harness() else { return };
    let dir = tempfile::tempdir_in("/dev/shm").expect("a folder in /dev/shm");
    let img = mbr_image(dir.path());
    let p = img.to_string_lossy().into_owned();
    for (extra, scanned) in [(&[][..], false), (&["--part-scan"][..], true)] {
        let mut args = vec!["file", "--path", &p];
        args.extend_from_slice(extra);
        let dev = add(&args);
        let flags: Vec<&str> =
            dev.json["flags"].as_array().unwrap().iter().filter_map(|f| f.as_str()).collect();
        assert_eq!(flags.contains(&"NO_AUTO_PART_SCAN"), !scanned, "{args:?}: {}", dev.json);
        let part = format!("/sys/block/ublkb{0}/ublkb{0}p1", dev.id);
        // The kernel scans in a worker after START_DEV: give it time to.
        let wait = Duration::from_secs(if scanned { 10 } else { 2 });
        let seen = eventually(wait, || std::path::Path::new(&part).exists());
        assert_eq!(seen, scanned, "{args:?}: {part} exists: {seen}");
        del(dev.id);
        assert_gone(&dev);
    }
}
