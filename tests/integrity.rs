//! Protection information through the kernel (`--integrity`), in the guest:
//! - the block layer sees the format asked for (sysfs `integrity/`), and
//!   data written through it reads back with its verify on;
//! - `ram` keeps the PI the block layer generated beside the data in its
//!   store (the tuples are there, in block order, with type 1's reference
//!   tags), and blocks never written stay unwritten metadata;
//! - a corrupted tuple in the store fails the read of that block with an
//!   integrity error (EILSEQ), not silently; its neighbours still read, and
//!   writing the block again heals it;
//! - the metadata survives a crash and `recover`;
//! - `null` serves reads and writes with PI on (its metadata unwritten);
//! - bad combinations are refused before any device is made.
//!
//! Like the other driver tests they skip without the driver, through
//! `common::skip` (a failure in the guest, where `UBLK_TEST_NO_SKIP=1`).

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;
/// Bytes written at the device's start.
const WRITTEN: usize = MIB as usize;

/// A device shape: its `add` arguments and what the kernel should show.
struct Case {
    args: &'static [&'static str],
    block: u64,
    meta: u64,
    tuple: u64,
    /// sysfs `integrity/format`.
    format: &'static str,
    /// Type 1: the tuple's reference tag is the block's number.
    ref_tag: bool,
}

const CASES: [Case; 3] = [
    Case {
        args: &["--integrity", "t10dif-type1"],
        block: 512,
        meta: 8,
        tuple: 8,
        format: "T10-DIF-TYPE1-CRC",
        ref_tag: true,
    },
    Case {
        args: &["--integrity", "nvme-type3", "-b", "4096"],
        block: 4096,
        meta: 16,
        tuple: 16,
        format: "EXT-DIF-TYPE3-CRC64",
        ref_tag: false,
    },
    Case {
        args: &["--integrity", "t10dif-type1", "--metadata-size", "16", "-b", "4096"],
        block: 4096,
        meta: 16,
        tuple: 8,
        format: "T10-DIF-TYPE1-CRC",
        ref_tag: true,
    },
];

fn open_direct(dev: &Path, write: bool) -> fs::File {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap_or_else(|e| panic!("open {} O_DIRECT: {e}", dev.display()))
}

/// A 4 KiB-aligned copy of `len` bytes, for O_DIRECT.
fn aligned(len: usize) -> (Vec<u8>, usize) {
    let buf = vec![0u8; len + 4096];
    let at = buf.as_ptr().align_offset(4096);
    (buf, at)
}

fn write_direct(dev: &Path, offset: u64, data: &[u8]) {
    let (mut buf, at) = aligned(data.len());
    buf[at..at + data.len()].copy_from_slice(data);
    open_direct(dev, true)
        .write_all_at(&buf[at..at + data.len()], offset)
        .unwrap_or_else(|e| panic!("write {} bytes at {offset} of {}: {e}", data.len(), dev.display()));
}

fn read_direct_at(dev: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let (mut buf, at) = aligned(len);
    open_direct(dev, false).read_exact_at(&mut buf[at..at + len], offset)?;
    Ok(buf[at..at + len].to_vec())
}

fn sysfs(id: u32, name: &str) -> String {
    let p = format!("/sys/block/ublkb{id}/integrity/{name}");
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}")).trim().to_string()
}

/// The metadata of block `n` as the store holds it (after the data).
fn stored_meta(store: &Path, c: &Case, n: u64) -> Vec<u8> {
    let mut m = vec![0u8; c.meta as usize];
    fs::File::open(store).unwrap().read_exact_at(&mut m, SIZE + n * c.meta).unwrap();
    m
}

/// The reference tag of a tuple: bytes 4-7 of T10-DIF, bytes 10-15 of NVMe's 16-byte PI.
fn ref_tag(c: &Case, m: &[u8]) -> u64 {
    let bytes = if c.tuple == 8 { &m[4..8] } else { &m[10..16] };
    bytes.iter().fold(0, |a, &b| a << 8 | b as u64)
}

/// One device of `c`: written, read back verified, its store's tuples
/// checked, one corrupted and healed, then a crash and `recover`.
fn case(c: &Case) {
    let mut args = vec!["ram", "--size", "8M", "-r"];
    args.extend_from_slice(c.args);
    let dev = add(&args);
    let what = format!("{:?}", c.args);
    assert_eq!(dev.json["copy_mode"], "user", "{what}: {}", dev.json);
    assert!(dev.json["integrity"].as_str().is_some_and(|s| s.contains(&c.meta.to_string())), "{}", dev.json);
    assert_eq!(sysfs(dev.id, "format"), c.format, "{what}");
    assert_eq!(sysfs(dev.id, "protection_interval_bytes"), c.block.to_string(), "{what}");
    assert_eq!((sysfs(dev.id, "read_verify"), sysfs(dev.id, "write_generate")), ("1".into(), "1".into()));

    let data = random_bytes(WRITTEN, 0x1e9 + c.block + c.meta);
    write_direct(&dev.block(), 0, &data);
    assert!(read_direct_at(&dev.block(), 0, WRITTEN).unwrap() == data, "{what}: data read back differs");

    let store = Path::new(dev.json["store"].as_str().expect("a ram device has a store")).to_path_buf();
    let blocks = WRITTEN as u64 / c.block;
    for n in [0, 1, blocks - 1] {
        let m = stored_meta(&store, c, n);
        assert!(m[..c.tuple as usize].iter().any(|&b| b != 0xff), "{what}: block {n} has no PI in the store");
        if c.ref_tag {
            assert_eq!(ref_tag(c, &m), n, "{what}: block {n}'s reference tag");
        }
    }
    let never = stored_meta(&store, c, blocks + 1);
    assert!(never.iter().all(|&b| b == 0xff), "{what}: an unwritten block's metadata is {never:x?}");

    // Corrupt block 3's guard in the store: its read fails, its neighbour's does not.
    let at = SIZE + 3 * c.meta;
    let f = OpenOptions::new().write(true).open(&store).unwrap();
    let mut guard = stored_meta(&store, c, 3);
    guard[0] ^= 0x5a;
    f.write_all_at(&guard[..1], at).unwrap();
    let bad = read_direct_at(&dev.block(), 3 * c.block, c.block as usize);
    let errno = bad.as_ref().err().and_then(|e| e.raw_os_error());
    assert_eq!(errno, Some(libc::EILSEQ), "{what}: a corrupted tuple read as {:?}", bad.map(|_| "data"));
    let next = read_direct_at(&dev.block(), 4 * c.block, c.block as usize).unwrap();
    assert!(next[..] == data[4 * c.block as usize..5 * c.block as usize], "{what}: block 4");
    let block3 = &data[3 * c.block as usize..4 * c.block as usize];
    write_direct(&dev.block(), 3 * c.block, block3);
    assert!(read_direct_at(&dev.block(), 3 * c.block, c.block as usize).unwrap() == block3, "{what}: healed");

    signal(dev.pid, libc::SIGKILL);
    wait_dead(dev.pid);
    wait_until("QUIESCED", Duration::from_secs(30), || {
        list_one(dev.id).is_some_and(|d| d["state"] == "QUIESCED")
    });
    ublk(&["recover", "-n", &dev.id.to_string()]).success();
    assert!(
        read_direct_at(&dev.block(), 0, WRITTEN).unwrap() == data,
        "{what}: data or its PI changed across recover"
    );
    del(dev.id);
    assert!(!store.exists(), "{what}: del left the store {}", store.display());
}

#[test]
fn ram_keeps_pi_beside_the_data_and_a_corrupt_tuple_fails_its_read() {
    let Some(_h) = harness() else { return };
    side_by_side(&CASES, case);
}

/// null with PI: writes and reads both pass the block layer's generate and
/// verify (its metadata comes back unwritten, which verify skips).
#[test]
fn null_serves_pi_devices() {
    let Some(_h) = harness() else { return };
    let dev = add(&["null", "--size", "64M", "--integrity", "nvme-type1"]);
    assert_eq!(sysfs(dev.id, "format"), "EXT-DIF-TYPE1-CRC64");
    write_direct(&dev.block(), 0, &random_bytes(WRITTEN, 7));
    let r = read_direct_at(&dev.block(), 0, WRITTEN);
    assert!(r.is_ok(), "a null read with PI on failed: {:?}", r.err());
    del(dev.id);
}

/// What cannot be served is refused before any device is made, saying what to do.
#[test]
fn integrity_that_cannot_be_served_is_refused_first() {
    let Some(_h) = harness() else { return };
    let img = std::env::temp_dir().join(format!("ublk-integrity-{}", std::process::id()));
    fs::write(&img, vec![0u8; MIB as usize]).unwrap();
    let img_s = img.display().to_string();
    let problems: Vec<String> = [
        (
            vec!["add", "file", "--path", &img_s, "--integrity", "t10dif-type1"],
            vec!["served by null and ram"],
        ),
        (vec!["add", "ram", "--integrity", "t10dif-type1", "--copy-mode", "zero"], vec!["--copy-mode user"]),
        (vec!["add", "null", "--integrity", "nvme-type1", "--metadata-size", "8"], vec!["--metadata-size"]),
        (vec!["add", "ram", "--integrity", "dif1"], vec!["t10dif-type1"]),
        (vec!["add", "ram", "--metadata-size", "16"], vec!["--integrity"]),
    ]
    .iter()
    .filter_map(|(args, hints)| check_rejected(args, hints))
    .collect();
    fs::remove_file(&img).unwrap();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
