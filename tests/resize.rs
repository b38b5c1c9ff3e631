//! `resize -n ID --size S` (UPDATE_SIZE, Linux 6.16) against the real
//! driver, black-box through the CLI, sysfs, `blockdev` and dd. What they
//! prove:
//! - a ram device grows (zero copy, and user copy whose server maps the
//!   store): the kernel's size (sysfs, `blockdev --getsize64`) and `list`
//!   change, the new range is written and read back through the server,
//!   and the data below the old size is kept;
//! - a ram device shrinks: the data below the new size is kept, I/O past it
//!   fails, and the store file is cut to the new size;
//! - null takes a new size; file grows up to its file's size, and past it is
//!   refused;
//! - bad sizes are refused with a message and a non-zero exit before
//!   anything changes (the kernel's size and the settings file stay), and
//!   a kernel or device without UPDATE_SIZE is refused the same way;
//! - a takeover after a resize (`recover`, `restart`, a supervised
//!   restart, a hot standby prepared before the resize) comes up at the new
//!   size with the data.
//!
//! They need /dev/ublk-control and root; without the driver each test goes
//! through `common::skip` (a failure in the guest, `UBLK_TEST_NO_SKIP=1`).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const FAULT_ENV: &str = "UBLK_BENCH_FAULT";

/// The kernel's size of device `id` in bytes, from sysfs and from
/// `blockdev --getsize64`, which must agree.
fn kernel_size(id: u32) -> u64 {
    let sysfs = std::fs::read_to_string(format!("/sys/block/ublkb{id}/size"))
        .unwrap_or_else(|e| panic!("read the size of ublkb{id}: {e}"));
    let sectors: u64 = sysfs.trim().parse().expect("sysfs size is a number");
    let out = run(Command::new(need_tool("blockdev")).arg("--getsize64").arg(block_path(id))).success();
    let bytes: u64 = out.stdout.trim().parse().expect("blockdev prints a number");
    assert_eq!(sectors << 9, bytes, "device {id}: sysfs and blockdev disagree");
    bytes
}

/// The size `list --json` and the settings file give device `id`.
fn listed_size(id: u32) -> (u64, u64) {
    let listed = list_one(id).unwrap_or_else(|| panic!("device {id} not listed"))["size"].as_u64().unwrap();
    let text = std::fs::read_to_string(settings_path(id)).expect("settings file");
    let cfg: serde_json::Value = serde_json::from_str(&text).expect("settings are JSON");
    (listed, cfg["size"].as_u64().unwrap())
}

fn resize(id: u32, size: &str) -> Out {
    ublk(&["resize", "-n", &id.to_string(), "--size", size])
}

/// Writes `data` at `offset` of `dev` with O_DIRECT (dd from a file);
/// true if dd wrote it all.
fn try_write(dev: &Path, offset: u64, data: &[u8]) -> bool {
    let src = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(src.path(), data).expect("write temp file");
    let out = run(Command::new(need_tool("dd")).args([
        format!("if={}", src.path().display()),
        format!("of={}", dev.display()),
        "oflag=direct,seek_bytes".into(),
        "bs=64k".into(),
        format!("seek={offset}"),
        "conv=notrunc,fsync".into(),
        "status=none".into(),
    ]));
    out.ok()
}

fn write(dev: &Path, offset: u64, data: &[u8]) {
    assert!(
        try_write(dev, offset, data),
        "write of {} bytes at {offset} to {} failed",
        data.len(),
        dev.display()
    );
}

fn assert_reads(dev: &Path, offset: u64, want: &[u8], when: &str) {
    let got = read_direct(dev, offset, want.len() as u64);
    assert!(
        got == want,
        "{when}: {} bytes at {offset} of {} differ from what was written",
        want.len(),
        dev.display()
    );
}

/// Grows `dev` (made with `size_mib`) to twice that: size, list and
/// settings follow, the new range is served and the old data stays.
fn grows_and_serves(dev: &Dev, size_mib: u64) {
    let (id, block) = (dev.id, dev.block());
    let (old, new) = (size_mib * MIB, 2 * size_mib * MIB);
    let low = random_bytes(MIB as usize, id as u64 + 1);
    write(&block, old - MIB, &low);
    resize(id, &format!("{}M", 2 * size_mib)).success();
    assert_eq!(kernel_size(id), new, "device {id}: the kernel's size after growing");
    assert_eq!(listed_size(id), (new, new), "device {id}: list and settings after growing");
    let high = random_bytes(MIB as usize, id as u64 + 100);
    write(&block, new - MIB, &high);
    assert_reads(&block, new - MIB, &high, "past the old size, after growing");
    assert_reads(&block, old - MIB, &low, "below the old size, after growing");
}

#[test]
fn ram_grows_and_serves_the_new_range() {
    let Some(_h) = harness() else { return };
    let devs = [add(&["ram", "--size", "8M"]), add(&["ram", "--size", "8M", "--copy-mode", "user"])];
    side_by_side(&devs, |d| grows_and_serves(d, 8));
    for d in &devs {
        let store = list_one(d.id).unwrap()["store"].as_str().unwrap().to_string();
        assert_eq!(std::fs::metadata(&store).unwrap().len(), 16 * MIB, "device {}: store {store}", d.id);
        del(d.id);
    }
}

#[test]
fn ram_shrinks_keeping_the_data_below() {
    let Some(_h) = harness() else { return };
    let dev = add(&["ram", "--size", "16M"]);
    let block = dev.block();
    let low = random_bytes(MIB as usize, 7);
    write(&block, 7 * MIB, &low);
    write(&block, 12 * MIB, &random_bytes(MIB as usize, 8));
    resize(dev.id, "8M").success();
    assert_eq!(kernel_size(dev.id), 8 * MIB);
    assert_eq!(listed_size(dev.id), (8 * MIB, 8 * MIB));
    assert_reads(&block, 7 * MIB, &low, "below the new size, after shrinking");
    assert!(!try_write(&block, 12 * MIB, &low), "a write past the new size succeeded");
    let past = run(&mut dd_direct(&block, 12 * MIB, 64 << 10));
    assert!(past.raw_stdout.is_empty(), "a read past the new size returned data");
    let store = dev.json["store"].as_str().unwrap();
    assert_eq!(std::fs::metadata(store).unwrap().len(), 8 * MIB, "the store is cut to the new size");
    // Grown again, the range that was cut reads as zeroes, not the old data.
    resize(dev.id, "16M").success();
    assert_reads(&block, 12 * MIB, &vec![0; MIB as usize], "a range cut then grown again");
    del(dev.id);
}

#[test]
fn null_and_file_resize_within_what_they_serve() {
    let Some(_h) = harness() else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 24 * MIB as usize]).unwrap();
    let null = add(&["null", "--size", "1G"]);
    let file = add(&["file", "--path", img.to_str().unwrap(), "--size", "8M"]);
    resize(null.id, "2G").success();
    assert_eq!(kernel_size(null.id), 2 << 30);
    resize(null.id, "512M").success();
    assert_eq!(kernel_size(null.id), 512 * MIB);
    grows_and_serves(&file, 8);
    let whole = resize(file.id, "24M").success();
    assert!(whole.stdout.contains("dev_capacity 49152"), "{}", whole.describe());
    let past = resize(file.id, "25M");
    assert!(
        !past.ok() && past.stderr.contains("exceeds") && past.stderr.contains("at most 25165824"),
        "{}",
        past.describe()
    );
    assert_eq!(kernel_size(file.id), 24 * MIB, "a refused resize changed the size");
    // The file itself is never changed.
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 24 * MIB);
    del(null.id);
    del(file.id);
}

#[test]
fn bad_sizes_are_refused_before_anything_changes() {
    let Some(_h) = harness() else { return };
    let ram = add(&["ram", "--size", "8M", "-b", "4096"]);
    let id = ram.id.to_string();
    let cases: [(&[&str], &str); 6] = [
        (&["--size", "4k"], "give --size between 1M and 1P"),
        (&["--size", "8194k"], "not a multiple of the device's block size 4096"),
        (&["--size", "2P"], "out of range"),
        (&["--size", "100000G"], "does not fit"),
        (&["--size", "12x"], "unknown unit"),
        (&[], "--size"),
    ];
    for (args, want) in cases {
        let mut full = vec!["resize", "-n", &id];
        full.extend_from_slice(args);
        let out = ublk(&full);
        assert!(!out.ok() && out.stderr.contains(want), "{args:?}: want {want:?}\n{}", out.describe());
        assert_eq!(kernel_size(ram.id), 8 * MIB, "{args:?} changed the kernel's size");
        assert_eq!(listed_size(ram.id), (8 * MIB, 8 * MIB), "{args:?} changed the settings");
    }
    let none = resize(9999, "16M");
    assert!(!none.ok() && none.stderr.contains("device 9999 does not exist"), "{}", none.describe());
    // A kernel without UPDATE_SIZE (as the fault hook shows it), then a
    // device made without the flag, as an older ublk-bench made it.
    let old_kernel = run(Command::new(bin())
        .args(["resize", "-n", &id, "--size", "16M"])
        .env(FAULT_ENV, "no-update-size"));
    assert!(
        !old_kernel.ok() && old_kernel.stderr.contains("lacks UBLK_F_UPDATE_SIZE"),
        "{}",
        old_kernel.describe()
    );
    let old = run(Command::new(bin()).args(["add", "null", "--size", "1G"]).env(FAULT_ENV, "no-update-size"))
        .success();
    let old_id = parse_dev_id(&old.stdout).expect("dev id");
    let refused = resize(old_id, "2G");
    assert!(
        !refused.ok() && refused.stderr.contains("was made without UBLK_F_UPDATE_SIZE"),
        "{}",
        refused.describe()
    );
    assert_eq!(kernel_size(old_id), 1 << 30);
    assert_eq!(kernel_size(ram.id), 8 * MIB);
    del(old_id);
    del(ram.id);
}

/// Grows a recoverable ram device with data past the old size, kills its
/// server (or hands it over with `restart`), lets `how` bring a new one,
/// and checks size and data.
fn takeover_keeps_the_new_size(dev: &Dev, how: &str) {
    let (id, block) = (dev.id, dev.block());
    // The standby must be prepared at the old size, before the resize.
    let mut standby = None;
    if how == "standby" {
        wait_until("a prepared standby", Duration::from_secs(60), || {
            standby = standby_of(id, dev.pid).filter(|&p| has_queue_thread(p, id));
            standby.is_some()
        });
    }
    grows_and_serves(dev, 8);
    let high = read_direct(&block, 15 * MIB, MIB);
    match how {
        "restart" => {
            ublk(&["restart", "-n", &id.to_string()]).success();
        }
        _ => signal(dev.pid, libc::SIGKILL),
    }
    if how == "recover" {
        wait_until("QUIESCED", Duration::from_secs(30), || {
            list_one(id).is_some_and(|d| d["state"] == "QUIESCED")
        });
        ublk(&["recover", "-n", &id.to_string()]).success();
    }
    wait_until(&format!("device {id} LIVE under a new server ({how})"), Duration::from_secs(60), || {
        list_one(id).is_some_and(|d| {
            d["state"] == "LIVE" && d["pid"].as_i64().is_some_and(|p| p as i32 != dev.pid && alive(p as i32))
        })
    });
    if let Some(sb) = standby {
        assert_eq!(list_one(id).unwrap()["pid"].as_i64(), Some(sb as i64), "the standby took over");
    }
    assert_eq!(kernel_size(id), 16 * MIB, "{how}: the kernel's size");
    assert_eq!(listed_size(id), (16 * MIB, 16 * MIB), "{how}: list and settings");
    assert_reads(&block, 15 * MIB, &high, &format!("past the old size, after {how}"));
    let more = random_bytes(MIB as usize, id as u64 + 200);
    write(&block, 14 * MIB, &more);
    assert_reads(&block, 14 * MIB, &more, &format!("written past the old size after {how}"));
}

/// The hot standby of device `id` watching server `server` (its command
/// line names both), if one runs.
fn standby_of(id: u32, server: i32) -> Option<i32> {
    let words = ["--recover".to_string(), id.to_string(), "--method".into(), "standby".into()];
    let watch = ["--watch-pid".to_string(), server.to_string()];
    std::fs::read_dir("/proc").ok()?.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).find(
        |&p: &i32| {
            let c: Vec<String> = std::fs::read(format!("/proc/{p}/cmdline"))
                .unwrap_or_default()
                .split(|&b| b == 0)
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            c.windows(4).any(|w| w == words) && c.windows(2).any(|w| w == watch) && alive(p)
        },
    )
}

/// Whether `pid` has device `id`'s first queue thread: it is prepared.
fn has_queue_thread(pid: i32, id: u32) -> bool {
    threads(pid).iter().any(|(_, name)| *name == format!("ublk{id}q0"))
}

#[test]
fn takeovers_after_a_resize_come_up_at_the_new_size() {
    let Some(_h) = harness() else { return };
    let cases = [
        (add(&["ram", "--size", "8M", "-r", "-i"]), "recover"),
        (add(&["ram", "--size", "8M", "-r"]), "restart"),
        (add(&["ram", "--size", "8M", "--copy-mode", "user", "--supervise"]), "supervise"),
        (add(&["ram", "--size", "8M", "--copy-mode", "user", "--standby"]), "standby"),
    ];
    side_by_side(&cases, |(d, how)| takeover_keeps_the_new_size(d, how));
    for (d, _) in &cases {
        del(d.id);
    }
}
