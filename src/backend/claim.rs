//! A device's backing file (`file --path`, a RAM store, an NVMe `--dev`):
//! opened by name only if it is still the file the device was made with,
//! and held by one device at a time.
//!
//! Identity. The device's settings record the file's [`FileId`] (`add`
//! does, or the first server for a store it creates). Every open by name
//! (new server, `recover`, the supervisor's server, a standby, `restart`'s
//! successor) first opens the last component O_PATH|O_NOFOLLOW, compares
//! what it found with the record, and only then opens it for I/O, through
//! `/proc/self/fd`: the same inode, never the name again. A path swapped for
//! a symlink or for another file is refused with both identities, and the
//! wrong file is never opened for I/O (opening a device can have effects).
//!
//! Claim. A server holds [`Claim`] for as long as it serves the device: the
//! inode its backend has open is opened once more (through /proc/self/fd,
//! not by name) and flock(LOCK_EX)ed (a file, a store, an NVMe generic
//! node), or, for a block device, opened O_EXCL
//! (which the kernel also refuses while it is mounted or claimed by anyone
//! else). Both belong to that one open file, so they go with the server
//! that made them; the device's next server takes them again:
//! - a new device's server takes it before the device can be used;
//! - a takeover takes it after the old server is gone (a standby or a
//!   `restart` successor once the process it watches has exited; a cold
//!   one after QUIESCED) and before START_USER_RECOVERY. It waits a little
//!   for the lock, which the old server's exit releases, but never takes a
//!   lock another device holds.
//!
//! Between servers (a QUIESCED device nobody recovered yet) no open file
//! holds it, so the settings do: a new device's claim, and `add`'s check
//! before ADD_DEV, also look for another device that still exists (not
//! DEAD) whose settings record the same file, and refuse if there is one.
//! That is what refuses a second `add` of a file whose device waits to be
//! recovered. A takeover need not look: while its device existed, no other
//! device could claim the file.
//!
//! NVMe namespaces are only identified, not claimed.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::DeviceBackend;
use crate::config::{DeviceConfig, FileId, FileKind};
use crate::ctrl::{self, Ctrl};
use crate::error::{Error, Result};
use crate::{process, run_files, sys};

/// A file found by name: an O_PATH handle on the last component, not followed.
pub struct Found {
    handle: OwnedFd,
    pub id: FileId,
    pub path: PathBuf,
}

impl Found {
    /// The file `file` (opened from `path`) as a [`Found`]: a handle on the same inode.
    pub fn of_open(file: &File, path: &Path) -> std::io::Result<Found> {
        let handle = file.try_clone()?.into();
        let id = FileId::of(&file.metadata()?);
        Ok(Found { handle, id, path: path.to_owned() })
    }
}

/// Finds `path` without following a link in its last component.
pub fn find(path: &Path) -> std::io::Result<Found> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: c is NUL-terminated; O_PATH opens nothing for I/O.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor owned here.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // fstat works on an O_PATH descriptor and does not follow it.
    let id = FileId::of(&file.metadata()?);
    Ok(Found { handle: file.into(), id, path: path.to_owned() })
}

impl Found {
    /// Refuses a file that is not `want` (when there is a record), naming both.
    pub fn check(&self, want: Option<&FileId>, dev_id: Option<u32>) -> Result<()> {
        let Some(want) = want.filter(|w| !w.same(&self.id)) else { return Ok(()) };
        let target = match self.id.kind {
            FileKind::Symlink => {
                std::fs::read_link(&self.path).map(|t| format!(" to {}", t.display())).unwrap_or_default()
            }
            _ => String::new(),
        };
        let device = dev_id.map_or("the device".to_string(), |id| format!("device {id}"));
        Err(Error::Refused(format!(
            "{} is not the file {device} was made with: it was a {want}, it is now a {}{target}; \
             nothing was opened: put that file back at {0}, or delete the device{}",
            self.path.display(),
            self.id,
            dev_id.map_or(String::new(), |id| format!(" with `ublk-bench del -n {id}`")),
        )))
    }

    /// Opens the file found, for I/O, with `flags` (O_RDWR, O_DIRECT, O_EXCL, ...).
    pub fn open(&self, flags: i32) -> std::io::Result<File> {
        let access = flags & libc::O_ACCMODE;
        OpenOptions::new()
            .read(access != libc::O_WRONLY)
            .write(access != libc::O_RDONLY)
            .custom_flags(flags & !libc::O_ACCMODE)
            .open(format!("/proc/self/fd/{}", self.handle.as_raw_fd()))
    }
}

/// A device's hold on its backing file; released when dropped (or when
/// its process exits).
#[derive(Debug)]
pub struct Claim {
    _file: Option<File>,
}

/// How long a takeover waits for the old server's lock to go.
const TAKEOVER_PATIENCE: Duration = Duration::from_secs(5);

impl Claim {
    /// `add`'s check before ADD_DEV: the file at `path` (found as every
    /// server finds it) is free. The server's own claim is the one that holds.
    pub fn check_free(path: &Path, want: Option<&FileId>) -> Result<()> {
        let found = find(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        found.check(want, None)?;
        Self::take_found(&found, None, Duration::ZERO, true).map(drop)
    }

    /// A new device `dev_id`'s claim on the file its backend has open (the
    /// very inode, not the name again; none for null): the lock,
    /// and no other device of ours whose settings name the file.
    pub fn take_new(backend: &DeviceBackend, dev_id: u32) -> Result<Claim> {
        Self::take(backend, dev_id, Duration::ZERO, true)
    }

    /// A takeover's claim, once the old server is gone: the lock, waited
    /// for up to [`TAKEOVER_PATIENCE`] while the old server's exit releases
    /// it. The settings need no look: while this device existed, no other
    /// device could claim its file.
    pub fn take_over(backend: &DeviceBackend, dev_id: u32) -> Result<Claim> {
        Self::take(backend, dev_id, TAKEOVER_PATIENCE, false)
    }

    fn take(backend: &DeviceBackend, dev_id: u32, patience: Duration, scan: bool) -> Result<Claim> {
        let Some((file, path)) = backend.served_file() else { return Ok(Claim { _file: None }) };
        let found =
            Found::of_open(file, path).map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        Self::take_found(&found, Some(dev_id), patience, scan)
    }

    fn take_found(found: &Found, dev_id: Option<u32>, patience: Duration, scan: bool) -> Result<Claim> {
        let path = &found.path;
        let deadline = Instant::now() + patience;
        let file = loop {
            match lock(found) {
                Ok(file) => break Some(file),
                // A filesystem without flock (some network ones): the
                // settings still keep a second device of ours away.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOLCK | libc::EOPNOTSUPP)) => {
                    crate::log!(
                        "{}: no lock on this filesystem ({e}); the settings alone guard it",
                        path.display()
                    );
                    break None;
                }
                Err(e) if is_busy(&e) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Err(e) if is_busy(&e) => return Err(busy(found, dev_id)),
                Err(e) => return Err(Error::io(format!("lock {}", path.display()), e)),
            }
        };
        match scan.then(|| other_device(&found.id, path, dev_id)).flatten() {
            Some(other) => Err(served_by(found, other)),
            None => Ok(Claim { _file: file }),
        }
    }
}

/// The file a device of `cfg` holds exclusively: `file`'s path, the RAM
/// store, the NVMe namespace's generic node.
fn claimed_path(cfg: &DeviceConfig) -> Option<&Path> {
    super::of(cfg.backend).claimed_path(cfg)
}

/// An O_EXCL open of a block device, a flock'd open of anything else.
fn lock(found: &Found) -> std::io::Result<File> {
    if found.id.kind == FileKind::Block {
        return found.open(libc::O_RDONLY | libc::O_EXCL | libc::O_CLOEXEC);
    }
    let file = found.open(libc::O_RDONLY | libc::O_CLOEXEC)?;
    // SAFETY: flock on an fd we own.
    match unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } {
        0 => Ok(file),
        _ => Err(std::io::Error::last_os_error()),
    }
}

fn is_busy(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EWOULDBLOCK))
}

/// Another device that exists and whose settings record this file: by
/// identity, or by path in settings from before the identity record.
fn other_device(id: &FileId, path: &Path, me: Option<u32>) -> Option<u32> {
    let mut ctrl = None;
    let entries = std::fs::read_dir(run_files::run_dir()).ok()?;
    let ids = entries.flatten().filter_map(|e| {
        let name = e.file_name();
        name.to_str()?.strip_suffix(".json")?.parse::<u32>().ok()
    });
    ids.filter(|&n| Some(n) != me).find(|&n| {
        let Ok(cfg) = run_files::load(n) else { return false };
        let same = match cfg.backing_id {
            Some(rec) => rec.same(id),
            None => claimed_path(&cfg) == Some(path),
        };
        // A device that is gone or DEAD will never be served again; if the
        // control device cannot be asked, the settings are taken at their word.
        let ctrl = ctrl.get_or_insert_with(|| Ctrl::open().ok());
        same && ctrl.as_mut().is_none_or(|c| c.info(n).is_ok_and(|i| i.state != sys::UBLK_S_DEV_DEAD))
    })
}

fn served_by(found: &Found, dev_id: u32) -> Error {
    Error::Refused(format!(
        "{} is served by ublk device {dev_id} ({}): one file serves one device; delete that one first \
         (`ublk-bench del -n {dev_id}`) or give another file",
        found.path.display(),
        ctrl::block_path(dev_id)
    ))
}

/// Who holds a file whose lock was refused: a device of ours if its
/// settings say so, else what the system shows.
fn busy(found: &Found, me: Option<u32>) -> Error {
    if let Some(other) = other_device(&found.id, &found.path, me) {
        return served_by(found, other);
    }
    let path = found.path.display();
    let users: Vec<String> = match found.id.kind {
        FileKind::Block => {
            let mut u = mount_points(found.id.rdev);
            u.extend(holders(found.id.rdev));
            u.extend(openers(&found.path));
            u
        }
        _ => flock_holders(&found.id),
    };
    let who = match users.is_empty() {
        true => String::new(),
        false => format!(" ({})", users.join(", ")),
    };
    let what = match found.id.kind {
        FileKind::Block => "mounted or open exclusively by another program",
        _ => "locked by another program (flock)",
    };
    Error::Refused(format!(
        "{path} is in use: it is {what}{who}; ublk-bench serves a file only while nothing else may \
         change it: unmount or close it first"
    ))
}

fn devno(d: u64) -> String {
    format!("{}:{}", libc::major(d), libc::minor(d))
}

/// Where the block device `rdev` is mounted, from mountinfo (field 3 is maj:min).
fn mount_points(rdev: u64) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = devno(rdev);
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&want.as_str())).then(|| format!("mounted at {}", f.get(4).unwrap_or(&"?")))
        })
        .collect()
}

/// Devices stacked on the block device `rdev` (dm, md, ...).
fn holders(rdev: u64) -> Vec<String> {
    let dir = format!("/sys/dev/block/{}/holders", devno(rdev));
    let names = std::fs::read_dir(dir).into_iter().flatten().flatten();
    names.map(|h| format!("held by {}", h.file_name().to_string_lossy())).collect()
}

/// Processes other than this one (which holds it O_PATH) that have `path` open.
fn openers(path: &Path) -> Vec<String> {
    let me = std::process::id() as i32;
    let pids = process::openers(&path.to_string_lossy()).into_iter().filter(|&p| p != me);
    pids.map(|p| format!("open by pid {p} {}", process::comm(p))).collect()
}

/// The processes that hold a flock on the file, from /proc/locks
/// (`1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF`).
fn flock_holders(id: &FileId) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let want = format!("{:02x}:{:02x}:{}", libc::major(id.dev), libc::minor(id.dev), id.ino);
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let pid: i32 = f.get(4)?.parse().ok()?;
            (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
                .then(|| format!("pid {pid} {}", process::comm(pid)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finds `path`, checks it against `want` and opens it with `flags`, as
    /// the backends do.
    fn open_checked(
        path: &Path,
        want: Option<&FileId>,
        dev_id: Option<u32>,
        flags: i32,
    ) -> Result<(File, FileId)> {
        let found = find(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        found.check(want, dev_id)?;
        let file = found.open(flags).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        Ok((file, found.id))
    }

    #[test]
    fn a_link_in_place_of_the_file_is_refused_without_following_it() {
        let dir = tempfile::tempdir().unwrap();
        let (img, other) = (dir.path().join("img"), dir.path().join("other"));
        std::fs::write(&img, b"mine").unwrap();
        std::fs::write(&other, b"theirs").unwrap();
        let (_, id) = open_checked(&img, None, None, libc::O_RDWR).unwrap();
        assert!(open_checked(&img, Some(&id), Some(3), libc::O_RDWR).is_ok());
        std::fs::rename(&img, dir.path().join("kept")).unwrap();
        std::os::unix::fs::symlink(&other, &img).unwrap();
        let err = open_checked(&img, Some(&id), Some(3), libc::O_RDWR).unwrap_err().to_string();
        let want = [&format!("inode {}", id.ino), "symbolic link", "other", "device 3", "del -n 3"];
        assert!(want.iter().all(|w| err.contains(w)), "{err}");
        std::fs::remove_file(&img).unwrap();
        std::fs::copy(&other, &img).unwrap();
        let err = open_checked(&img, Some(&id), Some(3), libc::O_RDWR).unwrap_err().to_string();
        assert!(err.contains("is now a regular file") && err.contains(&format!("inode {}", id.ino)), "{err}");
    }

    #[test]
    fn a_flocked_file_is_busy_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        std::fs::write(&img, b"x").unwrap();
        let found = find(&img).unwrap();
        let held = lock(&found).unwrap();
        let err = lock(&found).unwrap_err();
        assert!(is_busy(&err), "{err}");
        let who = flock_holders(&found.id);
        assert!(who.iter().any(|w| w.contains(&std::process::id().to_string())), "{who:?}");
        drop(held);
        assert!(lock(&found).is_ok(), "free again once the holder closed it");
    }
}
