//! Trust tests: ublk-bench touches only what it made, signals only its own
//! processes, refuses to delete a device in use unless forced, keeps a
//! device's files when DEL_DEV fails, and `del` returns only once the
//! device's processes are gone. They need the driver (run in the guest by
//! `bench-scripts/test`); each holds the harness from `common`.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A folder for one test's files, removed at the end (outside /tmp, which
/// the guest hides behind a tmpfs of its own: that is fine, but /run is root's).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p = PathBuf::from(format!("/run/ublk-bench-trust-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("scratch folder");
        Scratch(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mnt = self.path("mnt");
        if mnt.exists() {
            let _ = Command::new("umount").arg("-l").arg(&mnt).stderr(std::process::Stdio::null()).status();
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn ok_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The error of a refused command: non-zero exit and each of `hints` in stderr.
fn refused(args: &[&str], hints: &[&str]) -> Out {
    let out = ublk(args);
    assert!(!out.ok(), "`ublk-bench {}` succeeded but must be refused:\n{}", args.join(" "), out.describe());
    for h in hints {
        assert!(
            out.stderr.contains(h),
            "`ublk-bench {}`: no `{h}` in the error:\n{}",
            args.join(" "),
            out.describe()
        );
    }
    println!("`ublk-bench {}` refused: {}", args.join(" "), out.stderr.trim_end());
    out
}

// ---------------------------------------------------------------- stores

/// `--store` on another backend, on an existing file, or in a missing folder
/// is refused before any device exists, and the file is left as it was.
#[test]
fn store_rules_protect_files_we_did_not_make() {
    let Some(_h) = harness() else { return };
    let dir = Scratch::new("store-rules");
    let precious = dir.path("precious");
    fs::write(&precious, b"not yours").unwrap();
    let p = ok_str(&precious);
    refused(&["add", "null", "--store", p], &["ram backend"]);
    refused(&["add", "ram", "--size", "16M", "--store", p], &["already exists", "--reuse-store"]);
    refused(&["add", "ram", "--store", ok_str(&dir.path("nowhere/store"))], &["must exist"]);
    let link = dir.path("link");
    std::os::unix::fs::symlink(&precious, &link).unwrap();
    refused(
        &["add", "ram", "--size", "16M", "--store", ok_str(&link), "--reuse-store"],
        &["not a regular file"],
    );
    assert_eq!(fs::read(&precious).unwrap(), b"not yours", "a refused add touched the file");
    assert!(list_ids().is_empty(), "a refused add left a device: {:?}", list_ids());
}

/// A relative `--store` is made absolute at add, so `del` from another
/// folder removes the file ublk-bench created; the file is mode 0600.
#[test]
fn relative_store_is_found_from_anywhere_and_removed() {
    let Some(_h) = harness() else { return };
    let dir = Scratch::new("relative");
    let out =
        run(Command::new(bin()).current_dir(&dir.0).args(["add", "ram", "--size", "16M", "--store", "s1"]));
    let id = parse_dev_id(&out.success().stdout).expect("dev id");
    let json = list_one(id).expect("listed");
    let want = dir.0.canonicalize().unwrap().join("s1");
    assert_eq!(json["store"].as_str(), Some(ok_str(&want)), "store not absolute: {json}");
    let mode = fs::metadata(&want).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "store {} has mode {mode:o}", want.display());
    run(Command::new(bin()).current_dir("/").args(["del", "-n", &id.to_string()])).success();
    assert!(!want.exists(), "del left the store {} it created", want.display());
}

/// `--reuse-store` serves an existing store with its contents, checks its
/// size, and `del` keeps the file.
#[test]
fn reused_store_keeps_its_data_and_survives_del() {
    let Some(_h) = harness() else { return };
    let dir = Scratch::new("reuse");
    let store = dir.path("store");
    let data = random_bytes(1 << 20, 7);
    let mut bytes = vec![0u8; 16 << 20];
    bytes[4 << 20..5 << 20].copy_from_slice(&data);
    fs::write(&store, &bytes).unwrap();
    let s = ok_str(&store);
    refused(&["add", "ram", "--store", s, "--reuse-store", "--size", "32M"], &["holds 16777216 bytes"]);
    let dev = add(&["ram", "--store", s, "--reuse-store"]);
    assert_eq!(dev.json["size"], 16 << 20, "size not taken from the store: {}", dev.json);
    assert_eq!(read_direct(&dev.block(), 4 << 20, 1 << 20), data, "the reused store's data is not served");
    del(dev.id);
    assert_eq!(fs::read(&store).unwrap().len(), 16 << 20, "del removed or cut a store it did not create");
}

// ---------------------------------------------------------------- daemons

/// A daemon that dies after START_DEV but before it reports LIVE: `add`
/// sees its pipe close at once (no server or standby inherited the write
/// end), says what happened, and deletes the half-made device with every
/// process; the same when the daemon is a supervisor's server.
#[test]
fn add_notices_a_daemon_that_dies_before_live() {
    let Some(_h) = harness() else { return };
    for extra in [&[][..], &["--supervise"], &["--standby"]] {
        let mut args = vec!["add", "ram", "--size", "16M"];
        args.extend_from_slice(extra);
        let t = Instant::now();
        let out = run(Command::new(bin()).args(&args).env("UBLK_BENCH_FAULT", "abort-before-live"));
        let took = t.elapsed();
        assert!(!out.ok(), "add {extra:?} succeeded although its server aborted:\n{}", out.describe());
        assert!(
            out.stderr.contains("before the device went LIVE") && out.stderr.contains("SIGABRT"),
            "add {extra:?} does not say that its server died:\n{}",
            out.describe()
        );
        // START_TIMEOUT is 120 s: an inherited pipe end would have made add wait for it.
        assert!(took < Duration::from_secs(60), "add {extra:?} took {took:?} to notice");
        println!("add {extra:?} noticed the dead daemon after {took:?}");
        assert!(list_ids().is_empty(), "add {extra:?} left a device: {:?}", list_ids());
        let left = settled_leftovers();
        assert!(left.is_empty(), "add {extra:?} left: {left:?}");
    }
}

// ---------------------------------------------------------------- run files and pids

/// Every run file of a supervised device with a standby (settings,
/// supervisor record, stats, events, log) is mode 0600 in a 0700 folder.
#[test]
fn run_files_are_private() {
    let Some(_h) = harness() else { return };
    let dev = add(&["ram", "--standby", "--size", "16M"]);
    let dir = run_dir();
    let t = Instant::now();
    wait_until("the supervisor record", SETTLE, || run_dir().join(format!("{}.supervisor", dev.id)).exists());
    let mut seen = vec![];
    for e in fs::read_dir(&dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        if m.is_file() {
            assert_eq!(m.mode() & 0o077, 0, "{} is mode {:o}", e.path().display(), m.mode() & 0o777);
            seen.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o077, 0, "{} is open to others", dir.display());
    for want in [format!("{}.json", dev.id), format!("{}.supervisor", dev.id), "server.log".into()] {
        assert!(seen.contains(&want), "no {want} in {}: {seen:?} ({:?})", dir.display(), t.elapsed());
    }
    del(dev.id);
}

/// A stale supervisor record (the supervisor was SIGKILLed and its pid now
/// names another process) makes neither `del` nor `restart` signal that
/// process or treat the device as supervised.
#[test]
fn stale_supervisor_record_never_signals_a_stranger() {
    let Some(_h) = harness() else { return };
    let dev = add(&["ram", "-r", "-i", "--supervise", "--size", "16M"]);
    let sup = supervisor_pid(dev.id);
    signal(sup, libc::SIGKILL);
    wait_dead(sup);
    let mut stranger = Command::new("sleep").arg("300").spawn().expect("sleep");
    let pid = stranger.id() as i32;
    // The record now names the stranger's pid with another start time, as
    // after pid reuse.
    let record = run_dir().join(format!("{}.supervisor", dev.id));
    fs::write(&record, format!("{{\"pid\":{pid},\"start\":1}}")).unwrap();
    let id = dev.id.to_string();
    ublk(&["restart", "-n", &id]).success();
    assert!(stranger.try_wait().unwrap().is_none(), "restart signalled pid {pid}, a stranger");
    del(dev.id);
    assert!(stranger.try_wait().unwrap().is_none(), "del signalled pid {pid}, a stranger");
    let _ = stranger.kill();
    let _ = stranger.wait();
    assert!(!record.exists(), "del left the stale record {}", record.display());
}

// ---------------------------------------------------------------- delete

/// `del` of an open device (held by a process, then mounted) is refused
/// with a message naming `--force`, and the device stays LIVE; `del -a`
/// refuses it too but deletes an unused device; `--force` deletes it. The
/// same refusal holds where the kernel lacks TRY_STOP_DEV (forced here).
#[test]
fn del_refuses_an_open_device_unless_forced() {
    let Some(_h) = harness() else { return };
    let scratch = Scratch::new("del-open");
    let busy = add(&["ram", "--size", "32M"]);
    let idle = add(&["null", "--size", "1G"]);
    let id = busy.id.to_string();
    let mut holder = Command::new("sleep")
        .arg("300")
        .stdin(OpenOptions::new().read(true).open(busy.block()).unwrap())
        .spawn()
        .unwrap();
    let holder_pid = holder.id().to_string();
    let err = refused(&["del", "-n", &id], &["in use", "--force", &holder_pid]);
    assert!(err.stderr.contains("TRY_STOP_DEV"), "{}", err.describe());
    let out =
        Command::new(bin()).args(["del", "-n", &id]).env("UBLK_BENCH_NO_SAFE_STOP", "1").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("no TRY_STOP_DEV"), "fallback check: {stderr}");
    assert_eq!(list_one(busy.id).expect("still there")["state"], "LIVE");
    let _ = holder.kill();
    let _ = holder.wait();

    let mkfs = need_tool("mkfs.ext4");
    run(Command::new(mkfs).args(["-q", "-F", ok_str(&busy.block())])).success();
    let mnt = scratch.path("mnt");
    fs::create_dir(&mnt).unwrap();
    run(Command::new("mount").args([ok_str(&busy.block()), ok_str(&mnt)])).success();
    refused(&["del", "-n", &id], &["mounted at", "--force"]);
    let out = refused(&["del", "-a"], &["not deleted"]);
    assert!(out.stderr.contains(&format!("deleted device {}", idle.id)), "{}", out.describe());
    assert_eq!(list_ids(), vec![busy.id as u64], "del -a must delete only the unused device");
    run(Command::new("umount").arg(&mnt)).success();
    let t = Instant::now();
    ublk(&["del", "-n", &id, "--force"]).success();
    println!("del --force took {:?}", t.elapsed());
    assert!(list_ids().is_empty());
}

/// `del --force` of a mounted device stops and deletes it at once (the
/// server exits, the files go) without waiting for the unmount; the kernel
/// frees the device when the filesystem lets go.
#[test]
fn del_force_deletes_a_mounted_device() {
    let Some(_h) = harness() else { return };
    let scratch = Scratch::new("del-force");
    let dev = add(&["ram", "--size", "32M"]);
    run(Command::new(need_tool("mkfs.ext4")).args(["-q", "-F", ok_str(&dev.block())])).success();
    let mnt = scratch.path("mnt");
    fs::create_dir(&mnt).unwrap();
    run(Command::new("mount").args([ok_str(&dev.block()), ok_str(&mnt)])).success();
    let out = ublk(&["del", "-n", &dev.id.to_string(), "--force"]).success();
    assert!(out.stderr.contains("mounted at"), "del --force does not say who held it:\n{}", out.describe());
    assert!(!alive(dev.pid) || proc_state(dev.pid) == Some('Z'), "the server outlived del --force");
    assert!(!settings_path(dev.id).exists(), "del --force left the settings");
    run(Command::new("umount").arg(&mnt)).success();
    wait_until("the kernel to free the device after the unmount", SETTLE, || list_ids().is_empty());
}

/// `del -a` returns only once every server, supervisor and standby has
/// exited: nothing runs the moment it returns.
#[test]
fn del_all_leaves_no_process() {
    let Some(_h) = harness() else { return };
    add(&["null", "--size", "1G"]);
    add(&["ram", "--supervise", "--size", "16M"]);
    let sb = add(&["ram", "--standby", "--size", "16M"]);
    wait_until("the standby", Duration::from_secs(60), || servers().len() >= 6);
    let before: Vec<i32> = servers().iter().map(|p| p.pid).collect();
    assert!(before.len() >= 6, "expected 3 servers, 2 supervisors, 1 standby: {before:?}");
    ublk(&["del", "-a"]).success();
    let running: Vec<String> = servers()
        .iter()
        .filter(|p| p.state != 'Z')
        .map(|p| format!("{} {} ({})", p.pid, p.comm, p.state))
        .collect();
    assert!(running.is_empty(), "del -a returned with processes running: {running:?}");
    assert!(!run_dir().join(format!("{}.json", sb.id)).exists());
}

/// DEL_DEV that does not finish (a process still holds `/dev/ublkcN`) and
/// is interrupted: `del` exits non-zero, says so, and keeps the settings
/// and the store; once the holder lets go, `del` again cleans up.
#[test]
fn interrupted_del_keeps_settings_and_store() {
    let Some(_h) = harness() else { return };
    let dev = add(&["ram", "-r", "--size", "16M"]);
    let store = PathBuf::from(dev.json["store"].as_str().expect("store"));
    signal(dev.pid, libc::SIGKILL);
    wait_dead(dev.pid);
    let char_dev = format!("/dev/ublkc{}", dev.id);
    let mut held = None;
    wait_until("to open the dead server's /dev/ublkcN", SETTLE, || {
        held = OpenOptions::new().read(true).write(true).open(&char_dev).ok();
        held.is_some()
    });
    let id = dev.id.to_string();
    let mut del = spawn(Command::new(bin()).args(["del", "-n", &id]));
    sleep_ms(1500);
    assert!(del.child.try_wait().unwrap().is_none(), "del returned while /dev/ublkc{id} was held");
    signal(del.pid(), libc::SIGINT);
    let out = del.finish(Duration::from_secs(30));
    assert!(!out.ok(), "an interrupted del must fail:\n{}", out.describe());
    assert!(out.stderr.contains("kept"), "{}", out.describe());
    assert!(settings_path(dev.id).exists(), "settings removed although DEL_DEV failed");
    assert!(store.exists(), "store removed although DEL_DEV failed");
    drop(held);
    wait_until("the interrupted delete to finish in the kernel", SETTLE, || {
        let out = ublk(&["del", "-n", &id]);
        out.ok()
    });
    assert!(!settings_path(dev.id).exists() && !store.exists(), "files left after the second del");
}

// ---------------------------------------------------------------- what a device serves

/// The state of device `id` and the pid `list` shows for it (0: none).
fn state_of(id: u32) -> (String, i64) {
    let json = list_one(id).unwrap_or_else(|| panic!("device {id} is not listed"));
    (json["state"].as_str().unwrap_or("?").to_string(), json["pid"].as_i64().unwrap_or(0))
}

/// Kills the server of device `id` (pid `pid`) and waits for QUIESCED with no server.
fn crash(id: u32, pid: i32) {
    signal(pid, libc::SIGKILL);
    wait_dead(pid);
    wait_until(&format!("device {id} QUIESCED with no server"), Duration::from_secs(30), || {
        let (s, p) = state_of(id);
        s == "QUIESCED" && (p <= 0 || !alive(p as i32))
    });
}

/// Waits until device `id` is LIVE under a server other than `old`; its pid.
fn live_again(id: u32, old: i32) -> i32 {
    let mut pid = 0;
    wait_until(&format!("device {id} LIVE under a new server"), Duration::from_secs(120), || {
        let (s, p) = state_of(id);
        pid = p as i32;
        s == "LIVE" && pid > 0 && pid != old && alive(pid)
    });
    pid
}

/// A `size`-byte file whose first 64 KiB are `head`, the rest zeros.
fn image(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let head = random_bytes(64 << 10, seed);
    let mut bytes = vec![0u8; size];
    bytes[..head.len()].copy_from_slice(&head);
    fs::write(path, &bytes).unwrap();
    head
}

/// `inode N` as the messages name a regular file.
fn inode_of(p: &Path) -> String {
    format!("inode {}", fs::symlink_metadata(p).unwrap().ino())
}

/// `file --path` is opened again by name at every takeover. A path that now
/// names another file (a symlink to another file, another file renamed over
/// it) is refused with both identities in the message, before the device is
/// touched: it stays QUIESCED and serves nothing. With its file back, the
/// device recovers and serves that file's data.
#[test]
fn a_swapped_file_path_is_refused_at_recover() {
    let Some(_h) = harness() else { return };
    let dir = Scratch::new("swap");
    let (img, kept, other) = (dir.path("img"), dir.path("img.kept"), dir.path("other"));
    let mine = image(&img, 16 << 20, 3);
    image(&other, 16 << 20, 4);
    let was = inode_of(&img);
    let dev = add(&["file", "--path", ok_str(&img), "-r", "-i"]);
    let id = dev.id.to_string();
    crash(dev.id, dev.pid);
    fs::rename(&img, &kept).unwrap();
    std::os::unix::fs::symlink(&other, &img).unwrap();
    refused(&["recover", "-n", &id], &[ok_str(&img), &was, &inode_of(&img), "symbolic link"]);
    assert_eq!(state_of(dev.id).0, "QUIESCED", "a refused recover must leave the device QUIESCED");
    fs::remove_file(&img).unwrap();
    fs::copy(&other, &img).unwrap();
    refused(&["recover", "-n", &id], &[ok_str(&img), &was, &inode_of(&img)]);
    assert_eq!(state_of(dev.id).0, "QUIESCED", "a refused recover must leave the device QUIESCED");
    fs::rename(&kept, &img).unwrap();
    ublk(&["recover", "-n", &id]).success();
    assert_eq!(read_direct(&dev.block(), 0, 64 << 10), mine, "the recovered device does not serve its file");
    del(dev.id);
}

/// The same under `--supervise`: the supervisor's new server refuses a path
/// that is now a symlink to a block device, and the device stays QUIESCED
/// instead of coming back LIVE on that disk.
#[test]
fn a_swapped_file_path_is_refused_by_the_supervisor() {
    let Some(_h) = harness() else { return };
    let dir = Scratch::new("swap-sup");
    let (img, kept) = (dir.path("img"), dir.path("img.kept"));
    let mine = image(&img, 16 << 20, 5);
    let dev = add(&["file", "--path", ok_str(&img), "-r", "-i", "--supervise"]);
    let sup = supervisor_pid(dev.id);
    fs::rename(&img, &kept).unwrap();
    std::os::unix::fs::symlink("/dev/nullb0", &img).unwrap();
    signal(dev.pid, libc::SIGKILL);
    wait_dead(dev.pid);
    let settled = eventually(Duration::from_secs(60), || {
        let (s, p) = state_of(dev.id);
        let sup_gone = !alive(sup) || proc_state(sup) == Some('Z');
        sup_gone || (s == "LIVE" && p as i32 != dev.pid && alive(p as i32))
    });
    let (state, pid) = state_of(dev.id);
    if state == "LIVE" {
        let head = read_direct(&dev.block(), 0, 64 << 10);
        panic!(
            "device {} came back LIVE (pid {pid}) on the swapped path; its block 0 is {} its file's",
            dev.id,
            if head == mine { "still" } else { "no longer" }
        );
    }
    assert!(settled, "the supervisor neither refused nor recovered within 60 s (state {state})");
    assert_eq!(state, "QUIESCED", "device {}", dev.id);
    let log = fs::read_to_string(run_dir().join("server.log")).unwrap_or_default();
    assert!(
        log.lines().any(|l| l.contains(ok_str(&img)) && l.contains("not the file")),
        "the server log does not say why the takeover was refused"
    );
    fs::remove_file(&img).unwrap();
    fs::rename(&kept, &img).unwrap();
    ublk(&["recover", "-n", &dev.id.to_string()]).success();
    assert_eq!(read_direct(&dev.block(), 0, 64 << 10), mine, "the recovered device does not serve its file");
    del(dev.id);
}

/// A file, a RAM store or a block device serves one device at a time: a
/// second `add` of it (by the same path, or another path to the same file)
/// is refused with the device that holds it, also while that device is
/// QUIESCED with no server; the holder still recovers.
#[test]
fn a_file_or_store_serves_one_device() {
    let Some(_h) = harness() else { return };
    let dir = Scratch::new("one-user");
    let img = dir.path("img");
    image(&img, 16 << 20, 6);
    let link = dir.path("link");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    let a = add(&["file", "--path", ok_str(&img), "-r"]);
    let (holder, node) = (format!("ublk device {}", a.id), format!("/dev/ublkb{}", a.id));
    refused(&["add", "file", "--path", ok_str(&img)], &[&holder, &node]);
    refused(&["add", "file", "--path", ok_str(&link)], &[&holder, &node]);
    crash(a.id, a.pid);
    refused(&["add", "file", "--path", ok_str(&img)], &[&holder, &node]);
    ublk(&["recover", "-n", &a.id.to_string()]).success();
    refused(&["add", "file", "--path", ok_str(&img)], &[&holder, &node]);

    let store = dir.path("store");
    let b = add(&["ram", "--size", "16M", "--store", ok_str(&store)]);
    let holder = format!("ublk device {}", b.id);
    refused(&["add", "ram", "--store", ok_str(&store), "--reuse-store"], &[&holder]);
    assert_eq!(list_ids().len(), 2, "a refused add left a device: {:?}", list_ids());
    del(a.id);
    del(b.id);
    // Free again once its device is gone.
    let c = add(&["file", "--path", ok_str(&img)]);
    del(c.id);
}

/// An NVMe namespace serves one device at a time: a second `add` on it, by
/// its generic node or its block node, is refused naming the device that
/// holds it, also while that device is QUIESCED; once the holder is
/// deleted the namespace is free again.
#[test]
fn a_namespace_serves_one_device() {
    let Some(_h) = harness() else { return };
    let a = add(&["nvme", "--dev", "/dev/ng0n1", "--size", "64M", "-r"]);
    let (holder, node) = (format!("ublk device {}", a.id), format!("/dev/ublkb{}", a.id));
    refused(&["add", "nvme", "--dev", "/dev/ng0n1", "--size", "64M"], &[&holder, &node]);
    refused(&["add", "nvme", "--dev", "/dev/nvme0n1", "--size", "64M"], &[&holder, &node]);
    crash(a.id, a.pid);
    refused(&["add", "nvme", "--dev", "/dev/ng0n1", "--size", "64M"], &[&holder, &node]);
    ublk(&["recover", "-n", &a.id.to_string()]).success();
    refused(&["add", "nvme", "--dev", "/dev/ng0n1", "--size", "64M"], &[&holder, &node]);
    assert_eq!(list_ids().len(), 1, "a refused add left a device: {:?}", list_ids());
    del(a.id);
    let b = add(&["nvme", "--dev", "/dev/ng0n1", "--size", "64M"]);
    del(b.id);
}

/// A block device given as `--path` is opened exclusively: one that another
/// program holds exclusively or that is mounted is refused, and a second
/// device on it is refused naming the first.
#[test]
fn a_block_device_in_use_is_refused() {
    use std::os::unix::fs::OpenOptionsExt;
    let Some(_h) = harness() else { return };
    let scratch = Scratch::new("bdev-busy");
    let nullb = "/dev/nullb0";
    let held =
        OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(nullb).expect("O_EXCL /dev/nullb0");
    let me = std::process::id().to_string();
    refused(&["add", "file", "--path", nullb, "--size", "64M"], &[nullb, "in use", &me]);
    drop(held);
    let a = add(&["file", "--path", nullb, "--size", "64M"]);
    refused(&["add", "file", "--path", nullb, "--size", "64M"], &[&format!("ublk device {}", a.id)]);
    del(a.id);

    let disk = add(&["ram", "--size", "32M"]);
    run(Command::new(need_tool("mkfs.ext4")).args(["-q", "-F", ok_str(&disk.block())])).success();
    let mnt = scratch.path("mnt");
    fs::create_dir(&mnt).unwrap();
    run(Command::new("mount").args([ok_str(&disk.block()), ok_str(&mnt)])).success();
    refused(&["add", "file", "--path", ok_str(&disk.block())], &["mounted at", ok_str(&mnt)]);
    assert_eq!(list_ids(), vec![disk.id as u64], "a refused add left a device");
    run(Command::new("umount").arg(&mnt)).success();
    del(disk.id);
}

/// The claim on a file moves with the device across every takeover (a
/// standby's, `restart`'s successor's, the supervisor's new server's,
/// `recover`'s): each serves the file, and another device is still refused.
#[test]
fn takeovers_keep_the_file_and_its_claim() {
    use std::os::unix::fs::OpenOptionsExt;
    let Some(_h) = harness() else { return };
    let dir = Scratch::new("claim-moves");
    let img = dir.path("img");
    let mine = image(&img, 16 << 20, 7);
    // The device's server holds the file's lock itself, not only its settings.
    let second = |id: u32| {
        refused(&["add", "file", "--path", ok_str(&img)], &[&format!("ublk device {id}")]);
        assert!(flocked(&img), "no server of device {id} holds the lock on {}", img.display());
    };
    let dev = add(&["file", "--path", ok_str(&img), "-r", "-i", "--standby"]);
    let id = dev.id.to_string();
    wait_until("the standby", Duration::from_secs(60), || servers().len() >= 3);
    signal(dev.pid, libc::SIGKILL);
    let pid = live_again(dev.id, dev.pid);
    println!("standby took over as pid {pid}");
    second(dev.id);
    assert_eq!(read_direct(&dev.block(), 0, 64 << 10), mine, "after the standby's takeover");
    ublk(&["restart", "-n", &id]).success();
    let pid = live_again(dev.id, pid);
    println!("restart: pid {pid}");
    second(dev.id);
    assert_eq!(read_direct(&dev.block(), 0, 64 << 10), mine, "after restart");
    del(dev.id);

    let dev = add(&["file", "--path", ok_str(&img), "-r", "-i", "--supervise"]);
    signal(dev.pid, libc::SIGKILL);
    live_again(dev.id, dev.pid);
    second(dev.id);
    let id = dev.id.to_string();
    ublk(&["restart", "-n", &id]).success();
    second(dev.id);
    assert_eq!(read_direct(&dev.block(), 0, 64 << 10), mine, "after the supervisor's takeovers");
    del(dev.id);

    // A block device stays opened exclusively across takeovers.
    let excl = || OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open("/dev/nullb0");
    let nb = add(&["file", "--path", "/dev/nullb0", "--size", "64M", "-r", "-i", "--supervise"]);
    signal(nb.pid, libc::SIGKILL);
    live_again(nb.id, nb.pid);
    let e = excl().err().map(|e| e.raw_os_error());
    assert_eq!(e, Some(Some(libc::EBUSY)), "/dev/nullb0 is not held exclusively after the takeover");
    del(nb.id);
    assert!(excl().is_ok(), "/dev/nullb0 still held after del");

    let dev = add(&["file", "--path", ok_str(&img), "-r", "-i"]);
    let id = dev.id.to_string();
    ublk(&["restart", "-n", &id]).success();
    let pid = live_again(dev.id, dev.pid);
    second(dev.id);
    crash(dev.id, pid);
    ublk(&["recover", "-n", &id]).success();
    second(dev.id);
    assert_eq!(read_direct(&dev.block(), 0, 64 << 10), mine, "after restart and recover");
    del(dev.id);
}

/// Whether another process holds a flock on `path` (ours is refused).
fn flocked(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(path).unwrap();
    // SAFETY: flock on a file we hold open; closing it drops a lock we got.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
}

/// `--direct` on a regular file of a filesystem on a 4 KiB-sector disk: the
/// device takes 4 KiB blocks, the smallest O_DIRECT I/O the file takes.
#[test]
fn direct_file_takes_the_block_size_of_its_disk() {
    let Some(_h) = harness() else { return };
    let scratch = Scratch::new("direct-4k");
    let disk = add(&["ram", "--size", "64M", "-b", "4096"]);
    run(Command::new(need_tool("mkfs.ext4")).args(["-q", "-F", ok_str(&disk.block())])).success();
    let mnt = scratch.path("mnt");
    fs::create_dir(&mnt).unwrap();
    run(Command::new("mount").args([ok_str(&disk.block()), ok_str(&mnt)])).success();
    let img = mnt.join("img");
    let head = image(&img, 8 << 20, 8);
    let out = ublk(&["add", "file", "--path", ok_str(&img), "--direct"]);
    let dev = parse_dev_id(&out.stdout).and_then(list_one);
    let bs = dev.as_ref().map(|d| d["block_size"].clone());
    let served =
        dev.as_ref().map(|d| read_direct(&block_path(d["dev_id"].as_u64().unwrap() as u32), 0, 64 << 10));
    if let Some(d) = &dev {
        ublk(&["del", "-n", &d["dev_id"].to_string()]).success();
    }
    run(Command::new("umount").arg(&mnt)).success();
    del(disk.id);
    assert!(out.ok(), "add file --direct on a 4 KiB-sector filesystem failed:\n{}", out.describe());
    assert_eq!(bs, Some(serde_json::json!(4096)), "block size of the --direct device");
    assert_eq!(served, Some(head), "the --direct device does not serve its file");
}

/// Puts a node back where a test moved it, even when the test fails.
struct Restore {
    moved: PathBuf,
    to: PathBuf,
}

impl Drop for Restore {
    fn drop(&mut self) {
        if self.moved.exists() {
            let _ = fs::remove_file(&self.to);
            let _ = fs::rename(&self.moved, &self.to);
        }
    }
}

/// An NVMe device's `--dev` is reopened by name at a takeover: another
/// character device at that name (here /dev/null's number) is refused with
/// both device numbers, and the namespace back in place recovers.
#[test]
fn a_swapped_nvme_node_is_refused_at_recover() {
    let Some(_h) = harness() else { return };
    let ng = Path::new("/dev/ng0n1");
    if !ng.exists() {
        return skip("/dev/ng0n1 absent (the guest's emulated NVMe: run inside bench-scripts/vm)");
    }
    let rdev = fs::metadata(ng).unwrap().rdev();
    let was = format!("character device {}:{}", libc::major(rdev), libc::minor(rdev));
    let dev = add(&["nvme", "--dev", ok_str(ng), "-r", "-i"]);
    let id = dev.id.to_string();
    crash(dev.id, dev.pid);
    let kept = PathBuf::from("/dev/ng0n1.trust-kept");
    fs::rename(ng, &kept).unwrap();
    let restore = Restore { moved: kept, to: ng.to_owned() };
    run(Command::new(need_tool("mknod")).args([ok_str(ng), "c", "1", "3"])).success();
    refused(&["recover", "-n", &id], &[ok_str(ng), &was, "character device 1:3"]);
    assert_eq!(state_of(dev.id).0, "QUIESCED", "a refused recover must leave the device QUIESCED");
    drop(restore);
    ublk(&["recover", "-n", &id]).success();
    del(dev.id);
}
