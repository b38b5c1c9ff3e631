//! `--threads N` (UBLK_F_PER_IO_DAEMON, 6.16): a device's tags served by N
//! threads instead of one per hardware queue. What these tests prove:
//! - more threads than queues (a queue's tags split over several threads)
//!   and fewer (several queues on one thread) serve fio's CRC32C verify on
//!   ram (user and zero copy, one with --poll), file (zero copy through
//!   explicit REGISTER/UNREGISTER chains) and nvme (copy), and null serves
//!   reads; each server has exactly N queue threads (/proc/PID/task), and
//!   `list` and `stats` show N;
//! - a queue's threads are spread over its affinity set;
//! - a crash then `recover`, a planned `restart`, and a `--standby` and a
//!   `--supervise` takeover each bring the device back with the same layout (N threads), its data
//!   intact, serving a verify;
//! - `--threads 0`, more threads than tags, and `--threads` with `--batch`
//!   are refused before any device exists.
//!
//! They need /dev/ublk-control and root (the guest: `bench-scripts/test`);
//! elsewhere each goes through `common::skip`.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const NG: &str = "/dev/ng0n1";
const MIB: u64 = 1 << 20;
const FAULT_ENV: &str = "UBLK_BENCH_FAULT";

/// The queue threads of device `id`'s server `pid`: `ublk{id}q{Q}` for a
/// thread serving one whole queue, `ublk{id}t{T}` otherwise.
fn queue_threads(id: u32, pid: i32) -> Vec<(i32, String)> {
    let (q, t) = (format!("ublk{id}q"), format!("ublk{id}t"));
    threads(pid).into_iter().filter(|(_, c)| c.starts_with(&q) || c.starts_with(&t)).collect()
}

/// The server of `dev` has `n` queue threads; `list` and `stats` say `n`.
fn assert_threads(id: u32, pid: i32, n: usize, what: &str) {
    let got = queue_threads(id, pid);
    assert_eq!(got.len(), n, "{what}: device {id} server {pid} has queue threads {got:?}, want {n}");
    let listed = list_one(id).unwrap_or_else(|| panic!("{what}: device {id} not listed"));
    assert_eq!(listed["threads"], n as u64, "{what}: list --json: {listed}");
    let out = ublk(&["stats", "-n", &id.to_string(), "--json", "--window", "0"]).success();
    let stats: serde_json::Value = serde_json::from_str(&out.stdout).expect("stats --json is JSON");
    assert_eq!(stats["threads"], n as u64, "{what}: stats --json: {stats}");
}

/// Polls `list` until device `id` is `state` under a server other than
/// `old` (LIVE) or with none (QUIESCED); returns its pid.
fn wait_state(id: u32, state: &str, old: i32) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = list_one(id).unwrap_or_else(|| panic!("device {id} vanished"));
        let pid = d["pid"].as_i64().unwrap_or(-1) as i32;
        let ok = match state {
            "LIVE" => d["state"] == "LIVE" && pid > 0 && pid != old && alive(pid),
            _ => d["state"] == state && (pid <= 0 || !alive(pid)),
        };
        if ok {
            return pid;
        }
        assert!(Instant::now() < deadline, "device {id}: no {state} (old server {old}) in 30 s: {d}");
        sleep_ms(30);
    }
}

/// Writes `data` at offset 0 of `dev` with O_DIRECT (dd from a tmpfs file).
fn write_pattern(dev: &Path, data: &[u8], tmp: &Path) {
    fs::write(tmp, data).unwrap();
    run(Command::new(need_tool("dd")).args([
        format!("if={}", tmp.display()),
        format!("of={}", dev.display()),
        "oflag=direct".into(),
        "bs=64k".into(),
        "conv=notrunc".into(),
        "status=none".into(),
    ]))
    .success();
    let _ = fs::remove_file(tmp);
}

fn assert_pattern(dev: &Path, data: &[u8], what: &str) {
    let got = read_direct(dev, 0, data.len() as u64);
    let bad = got.iter().zip(data).position(|(a, b)| a != b);
    assert!(bad.is_none(), "{what}: byte {} of {} differs", bad.unwrap_or(0), dev.display());
}

/// Layouts of every shape side by side, on every backend, one polling.
#[test]
fn threads_serve_every_backend_side_by_side() {
    let Some(_h) = harness() else { return };
    const SIZE: u64 = 16 * MIB;
    let file = Path::new("/dev/shm/ublk-threads-file");
    fs::write(file, vec![0u8; SIZE as usize]).unwrap();
    let cases: [(&str, Vec<&str>, usize); 4] = [
        ("ram-user-q2t1-poll", vec!["ram", "--copy-mode", "user", "-q", "2", "--threads", "1", "--poll"], 1),
        ("ram-zero-q2t3", vec!["ram", "--copy-mode", "zero", "-q", "2", "--threads", "3"], 3),
        (
            "file-zero-explicit-q1t2",
            vec![
                "file",
                "--path",
                file.to_str().unwrap(),
                "--copy-mode",
                "zero",
                "--explicit-buf-reg",
                "-q",
                "1",
                "--threads",
                "2",
            ],
            2,
        ),
        ("nvme-copy-q2t3", vec!["nvme", "--dev", NG, "--copy-mode", "copy", "-q", "2", "--threads", "3"], 3),
    ];
    let size = SIZE.to_string();
    let mut devs = vec![];
    for (label, args, n) in &cases {
        let mut args = args.clone();
        args.extend(["--size", &size, "-d", "64"]);
        let dev = add(&args);
        assert_threads(dev.id, dev.pid, *n, label);
        devs.push((*label, dev));
    }
    let null = add(&["null", "-q", "1", "--threads", "2", "--size", &size]);
    assert_threads(null.id, null.pid, 2, "null-q1t2");
    // One queue on two threads: spread over its affinity set (two CPUs in the guest).
    if online_cpus() >= 2 {
        let cpus: Vec<String> = queue_threads(null.id, null.pid)
            .iter()
            .map(|(tid, _)| task_status(null.pid, *tid, "Cpus_allowed_list").unwrap_or_default())
            .collect();
        assert_ne!(cpus[0], cpus[1], "one queue's two threads pinned to the same CPU: {cpus:?}");
    }
    let pairs: Vec<(&str, &Dev)> = devs.iter().map(|(l, d)| (*l, d)).collect();
    fio_verify_devices(&pairs, SIZE);
    let json = fio(
        &null.block(),
        &["--ioengine=io_uring", "--direct=1", "--rw=randread", "--bs=4k", "--iodepth=32", "--io_size=8M"],
    );
    assert_eq!(fio_bytes(&json, "read"), 8 * MIB, "null q1t2: reads");
    for (_, d) in &devs {
        del(d.id);
    }
    del(null.id);
    let _ = fs::remove_file(file);
}

/// A crash then `recover`, and a planned `restart`, keep the layout.
#[test]
fn threads_layout_survives_recover_and_restart() {
    let Some(_h) = harness() else { return };
    let dev = add(&["ram", "--size", "16M", "-q", "1", "--threads", "2", "-r"]);
    let id = dev.id;
    assert_threads(id, dev.pid, 2, "added");
    let data = random_bytes(4 * MIB as usize, 0x7e4d ^ id as u64);
    write_pattern(&dev.block(), &data, Path::new("/dev/shm/ublk-threads-pattern"));
    signal(dev.pid, libc::SIGKILL);
    wait_state(id, "QUIESCED", dev.pid);
    ublk(&["recover", "-n", &id.to_string()]).success();
    let second = wait_state(id, "LIVE", dev.pid);
    assert_threads(id, second, 2, "after recover");
    assert_pattern(&dev.block(), &data, "after recover");
    fio_verify_devices(&[("recovered", &dev)], 16 * MIB);

    ublk(&["restart", "-n", &id.to_string()]).success();
    let third = wait_state(id, "LIVE", second);
    assert_threads(id, third, 2, "after restart");
    fio_verify_devices(&[("restarted", &dev)], 16 * MIB);
    del(id);
}

/// A standby, and a supervisor, that take over a crashed server serve
/// with the same layout.
#[test]
fn threads_layout_survives_standby_and_supervise_takeovers() {
    let Some(_h) = harness() else { return };
    for (method, queues, n) in [("--standby", "2", 1), ("--supervise", "1", 2)] {
        let dev = add(&["ram", "--size", "16M", "-q", queues, "--threads", &n.to_string(), method]);
        let id = dev.id;
        assert_threads(id, dev.pid, n, &format!("{method}: added"));
        let data = random_bytes(4 * MIB as usize, 0x5b ^ id as u64);
        write_pattern(&dev.block(), &data, Path::new("/dev/shm/ublk-threads-pattern"));
        signal(dev.pid, libc::SIGKILL);
        let next = wait_state(id, "LIVE", dev.pid);
        let what = format!("{method}: after the takeover");
        assert_threads(id, next, n, &what);
        assert_pattern(&dev.block(), &data, &what);
        fio_verify_devices(&[(method.trim_start_matches('-'), &dev)], 16 * MIB);
        del(id);
    }
}

/// Bad thread counts and `--threads` with `--batch` leave nothing behind.
#[test]
fn bad_thread_counts_are_refused_before_any_device() {
    let Some(_h) = harness() else { return };
    let cases: [(&[&str], &[&str]); 4] = [
        (&["add", "null", "--threads", "0"], &["--threads 0 is out of range"]),
        (&["add", "null", "-d", "2", "--threads", "3"], &["--threads 3", "1 to 2"]),
        (&["add", "null", "-q", "1", "--threads", "2", "--batch"], &["--batch", "drop --threads"]),
        (&["downtime", "--backend", "null", "--threads", "0"], &["--threads 0"]),
    ];
    let problems: Vec<String> = cases.iter().filter_map(|(a, h)| check_rejected(a, h)).collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Where the kernel lacks UBLK_F_PER_IO_DAEMON (forced: the fault hook
/// `no-per-io-daemon` hides it from GET_FEATURES), `--threads` other than
/// one per queue fails before ADD_DEV, naming the feature and its kernel,
/// and leaves nothing; one per queue, said outright, still works.
#[test]
fn threads_are_refused_where_the_kernel_lacks_the_per_io_daemon() {
    let Some(_h) = harness() else { return };
    let hidden = [(FAULT_ENV, "no-per-io-daemon")];
    let ids_before = list_ids();
    for args in
        [&["add", "null", "-q", "1", "--threads", "2"][..], &["add", "null", "-q", "2", "--threads", "1"]]
    {
        let out = run(Command::new(bin()).args(args).envs(hidden));
        let cmd = args.join(" ");
        assert!(!out.ok(), "`{cmd}` succeeded without UBLK_F_PER_IO_DAEMON:\n{}", out.describe());
        for hint in ["UBLK_F_PER_IO_DAEMON", "6.16", "drop --threads"] {
            assert!(out.stderr.contains(hint), "`{cmd}`: no {hint} in the message:\n{}", out.describe());
        }
        assert!(!out.stderr.contains("panicked"), "`{cmd}` panicked:\n{}", out.describe());
        let left = settled_leftovers();
        assert!(left.is_empty(), "`{cmd}` left behind: {}", left.join("; "));
        assert_eq!(list_ids(), ids_before, "`{cmd}` made a device");
    }
    let out =
        run(Command::new(bin()).args(["add", "null", "-q", "1", "--threads", "1"]).envs(hidden)).success();
    let id = parse_dev_id(&out.stdout).expect("a device");
    del(id);
}
