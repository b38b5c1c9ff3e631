//! Backends: what a request does once the queue thread has read its
//! descriptor. One module per backend, all behind [`QueueBackend`], which the
//! queue loop takes as a generic parameter so the per-I/O call is static.
//!
//! A backend object is made per queue thread and used only by that thread.
//! The request's data is reached through [`Data`]: a per-tag buffer that the
//! kernel copies to or from the bio (copy mode), the `/dev/ublkcN` file
//! position of the request (user copy), where the backend moves the bytes
//! itself with one pread/pwrite and no copy of its own, or the request's own
//! pages as a fixed buffer of the queue ring (zero copy: nvme, file, ram).
//!
//! Each backend is one room: its module holds a [`Backend`] (its options,
//! default size, copy modes, device parameters, how its device is opened)
//! and the [`Device`] it opens, which makes its queue backend. The rest of
//! the code asks [`of`] for a device's backend. A new backend is one module
//! and one line in the [`registry!`] below (plus its variant of
//! [`BackendKind`], which spells the name users type; the module's
//! [`Backend::name`] says the same, and a test holds them together).

pub mod chain;
pub mod claim;
pub mod emulated;
pub mod file;
pub mod limits;
pub mod live_size;
pub mod null;
pub mod nvme;
pub mod ram;

use std::fs::File;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

use crate::config::{self, BackendKind, CopyMode, DeviceConfig, FileId};
use crate::error::{Error, Result};
use crate::plan::{self, CopyRules, Transfer};
use crate::request::{Data, Request};
use crate::sys::Params;
use io_uring::{SubmissionQueue, cqueue, squeue};
use live_size::Resizing;

/// The per-queue half of a backend, as the queue loop drives it.
///
/// The queue owns the `user_data` encoding of its ring. A backend that
/// pushes commands gives each the `user_data` `ud | kind`, where `ud` is
/// what the queue passed to `submit` for this tag and `kind` is the
/// backend's own, within [`KIND_MASK`]; the queue hands each such CQE to
/// `complete` with the tag and that `kind`.
pub trait QueueBackend {
    /// The queue ring's SQE size: 64 bytes (`squeue::Entry`) unless the
    /// backend sends commands that need 128 (NVMe passthrough). The ublk
    /// FETCH and COMMIT fit either.
    type Sqe: squeue::EntryMarker;
    /// The ring's CQE size: 16 bytes unless the backend's commands return 32.
    type Cqe: cqueue::EntryMarker;
    /// The most commands `submit` pushes for one request (the queue sizes
    /// its rings by it): 0 for a backend that finishes in the call.
    const MAX_COMMANDS: u32 = 1;

    /// Starts one request. Some(result) if it finished at once; None if it
    /// pushed commands into `sq` (tagged as above), to end in [`Self::complete`].
    fn submit(
        &mut self,
        tag: u16,
        req: &Request,
        data: Data<'_>,
        sq: &mut SubmissionQueue<'_, Self::Sqe>,
        ud: u64,
    ) -> Option<i32>;

    /// Takes the CQE of a command `submit` queued; the COMMIT result once
    /// the request is done (a request may need several commands).
    fn complete(&mut self, _tag: u16, _kind: u64, res: i32) -> Option<i32> {
        Some(res)
    }

    /// The earliest monotonic time (ns) a request held back is due at:
    /// a blocking queue sleeps no longer. None: nothing held (every
    /// backend but [`emulated::Emulated`]).
    #[inline]
    fn next_due(&self) -> Option<u64> {
        None
    }

    /// A held request due by `now` and its COMMIT result, earliest first.
    #[inline]
    fn pop_due(&mut self, _now: u64) -> Option<(u16, i32)> {
        None
    }
}

/// The `user_data` bits a backend may use to tell its commands apart.
pub const KIND_MASK: u64 = 0xffff << 16;

/// A backend that finishes every request in the call.
pub trait SyncBackend {
    /// Serves one request and returns bytes done (READ/WRITE) or 0, or -errno.
    fn serve(&mut self, req: &Request, data: Data<'_>) -> i32;
}

impl<T: SyncBackend> QueueBackend for T {
    type Sqe = squeue::Entry;
    type Cqe = cqueue::Entry;
    const MAX_COMMANDS: u32 = 0;

    fn submit(
        &mut self,
        _tag: u16,
        req: &Request,
        data: Data<'_>,
        _sq: &mut SubmissionQueue<'_, squeue::Entry>,
        _ud: u64,
    ) -> Option<i32> {
        Some(self.serve(req, data))
    }
}

/// Completion value for a request that moved `len` bytes.
pub fn done(len: u32) -> i32 {
    len as i32
}

/// `pwrite` all of `buf` to `fd` at `pos`; -errno on failure.
///
/// # Safety
/// `[buf, buf+len)` must be readable memory for the whole call.
pub unsafe fn pwrite_all(fd: RawFd, buf: *const u8, len: usize, pos: u64) -> i32 {
    // SAFETY: the caller guarantees [buf, buf+len) is readable for the call.
    all(len, |off| unsafe { libc::pwrite(fd, buf.add(off).cast(), len - off, (pos + off as u64) as i64) })
}

/// `pread` all of `len` bytes from `fd` at `pos` into `buf`; -errno on failure.
///
/// # Safety
/// `[buf, buf+len)` must be writable memory for the whole call.
pub unsafe fn pread_all(fd: RawFd, buf: *mut u8, len: usize, pos: u64) -> i32 {
    // SAFETY: the caller guarantees [buf, buf+len) is writable for the call.
    all(len, |off| unsafe { libc::pread(fd, buf.add(off).cast(), len - off, (pos + off as u64) as i64) })
}

/// A page of metadata as never written ([`crate::integrity::UNWRITTEN`]).
pub static UNWRITTEN_META: [u8; 4096] = [crate::integrity::UNWRITTEN; 4096];

/// Writes `[pos, pos+len)` of `fd` from the repeated `pattern`; 0 or -errno.
pub fn fill_fd(fd: RawFd, pattern: &'static [u8; 4096], mut pos: u64, len: u64) -> i32 {
    let end = pos + len;
    while pos < end {
        let n = (end - pos).min(pattern.len() as u64) as usize;
        // SAFETY: pattern is static and readable for n <= its length.
        let r = unsafe { pwrite_all(fd, pattern.as_ptr(), n, pos) };
        if r < 0 {
            return r;
        }
        pos += n as u64;
    }
    0
}

/// Repeats a partial transfer `step(done_so_far)` until `len` bytes moved.
fn all(len: usize, mut step: impl FnMut(usize) -> isize) -> i32 {
    let mut off = 0usize;
    while off < len {
        let n = step(off);
        if n <= 0 {
            return neg_errno(n);
        }
        off += n as usize;
    }
    len as i32
}

fn neg_errno(n: isize) -> i32 {
    if n == 0 { -libc::EIO } else { -std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO) }
}

/// A backend before any device exists: what `add` asks it, what a new
/// device's server asks it, and how a server opens a device of it.
pub trait Backend: Sync {
    fn kind(&self) -> BackendKind;

    /// The name users type (`--backend`, `add NAME`) and run files hold:
    /// the kind's as clap and serde spell it (checked by a test).
    fn name(&self) -> &'static str;

    /// `add`'s size without `--size`; None: the size of what it serves.
    fn default_size(&self) -> Option<u64>;

    /// Which copy modes it takes, and which `auto` prefers.
    fn copy_rules(&self) -> &'static CopyRules;

    /// The `add` options that are its own (other backends refuse them).
    fn options(&self) -> &'static [&'static str] {
        &[]
    }

    /// What a user who gave another backend's option is told about this one.
    fn instead(&self) -> &'static str {
        ""
    }

    /// Whether it serves `--integrity`: keeps a device's metadata (or, for
    /// null, hands back unwritten metadata).
    fn keeps_metadata(&self) -> bool {
        false
    }

    /// The options it cannot do without.
    fn needs(&self, _o: &Options<'_>) -> Result<()> {
        Ok(())
    }

    /// `add`: completes the settings from what the device will serve
    /// (probed here, never changed), before anything is created.
    fn configure(&self, _cfg: &mut DeviceConfig, _o: &Options<'_>) -> Result<()> {
        Ok(())
    }

    /// The checks of whole settings that need no driver.
    fn validate(&self, cfg: &DeviceConfig) -> Result<()> {
        cfg.validate(config::MIN_SIZE, "1M")
    }

    /// `add`, before ADD_DEV: what the machine must have for the device.
    fn preflight(&self, _cfg: &DeviceConfig) -> Result<()> {
        Ok(())
    }

    /// The file a device of it holds exclusively (`claim`).
    fn claimed_path<'a>(&self, _cfg: &'a DeviceConfig) -> Option<&'a Path> {
        None
    }

    /// Its part of a new device's parameters (cache and FUA, discard,
    /// limits, DMA alignment), over the common ones.
    fn params(&self, _cfg: &DeviceConfig, _p: &mut Params) -> Result<()> {
        Ok(())
    }

    /// `resize`: the room a device of it has and what follows its size;
    /// an error where its size cannot change. (Default: anything in range,
    /// nothing to tell, as for null.)
    fn resizing(&self, _dev_id: u32, _cfg: &DeviceConfig) -> Result<Resizing> {
        Ok(Resizing::default())
    }

    /// Opens a device's backend: with `create` a new device's (whose
    /// settings it may complete, e.g. a RAM store's path), else an existing
    /// one's, keeping its data (recovery).
    fn open(&self, cfg: &mut DeviceConfig, transfer: Transfer, create: bool) -> Result<DeviceBackend>;
}

/// The device-wide half of a backend, opened: made once per server
/// process; it makes one [`QueueBackend`] per queue thread.
pub trait Device: Send + Sync {
    /// The file the device serves, as opened, and its path (None: nothing).
    fn served_file(&self) -> Option<(&File, &Path)>;

    /// Hands the queue backend of one queue of `depth` tags to `m`.
    fn with_queue<M: QueueMaker>(&self, depth: u16, m: M) -> M::Out;
}

/// What a queue thread is started with: given the concrete queue backend,
/// so the queue loop stays generic over it (static calls per request).
pub trait QueueMaker {
    type Out;
    fn make<B: QueueBackend + Send + 'static>(self, backend: B) -> Self::Out;
}

/// The `add` options that belong to one backend or another, as given.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options<'a> {
    pub size: Option<u64>,
    pub store: Option<&'a Path>,
    pub reuse_store: bool,
    pub sparse: bool,
    pub path: Option<&'a Path>,
    pub direct: bool,
    pub dev: Option<&'a Path>,
    pub copy_mode: CopyMode,
    pub explicit_buf_reg: bool,
    /// `--integrity` was given.
    pub integrity: bool,
}

impl Options<'_> {
    /// The backend options given, as flags.
    fn given(&self) -> Vec<&'static str> {
        let set = [
            ("--store", self.store.is_some()),
            ("--sparse", self.sparse),
            ("--path", self.path.is_some()),
            ("--direct", self.direct),
            ("--dev", self.dev.is_some()),
        ];
        set.iter().filter(|(_, on)| *on).map(|(flag, _)| *flag).collect()
    }
}

/// The checks of `add`'s backend options that need neither the driver nor
/// the file: each option belongs to the backend, the copy mode fits it, and
/// what it needs is given. Opening `--path` or `--dev` is `configure`'s.
pub fn check_options(b: &dyn Backend, o: &Options<'_>) -> Result<()> {
    for flag in o.given() {
        if let Some(owner) = ALL.iter().find(|x| x.options().contains(&flag)).filter(|x| x.kind() != b.kind())
        {
            return Err(Error::invalid(format!(
                "{flag} is an option of the {} backend, not {}: drop it{}",
                owner.name(),
                b.name(),
                b.instead()
            )));
        }
    }
    plan::check_copy_mode(o.copy_mode, b.copy_rules(), o.explicit_buf_reg)?;
    if o.integrity {
        check_integrity(b, o.copy_mode)?;
    }
    b.needs(o)
}

/// `--integrity` needs a backend that keeps metadata, and user copy: the
/// kernel moves metadata no other way.
fn check_integrity(b: &dyn Backend, mode: CopyMode) -> Result<()> {
    if !b.keeps_metadata() {
        let with: Vec<&str> = ALL.iter().filter(|x| x.keeps_metadata()).map(|x| x.name()).collect();
        return Err(Error::invalid(format!(
            "--integrity is served by {} (which keep the metadata), not {}: drop it or use one of those",
            with.join(" and "),
            b.name()
        )));
    }
    plan::integrity_mode(mode).map(|_| ())
}

macro_rules! registry {
    ($($kind:ident => $spec:path, $device:ty;)*) => {
        /// Every backend, in the order `features` lists them.
        pub const ALL: &[&dyn Backend] = &[$(&$spec),*];

        /// The backend of a kind.
        pub fn of(kind: BackendKind) -> &'static dyn Backend {
            match kind {
                $(BackendKind::$kind => &$spec,)*
            }
        }

        /// A device's backend, opened ([`Backend::open`]).
        pub enum DeviceBackend {
            $($kind($device),)*
        }

        impl DeviceBackend {
            /// The file the device serves, as opened, and its path: a
            /// `file`'s, a RAM store, or an NVMe namespace's generic node.
            pub fn served_file(&self) -> Option<(&File, &Path)> {
                match self {
                    $(DeviceBackend::$kind(d) => d.served_file(),)*
                }
            }

            /// Hands one queue's backend to `m`.
            pub fn with_queue<M: QueueMaker>(&self, depth: u16, m: M) -> M::Out {
                match self {
                    $(DeviceBackend::$kind(d) => d.with_queue(depth, m),)*
                }
            }
        }
    };
}

registry! {
    Null => null::Null, null::NullDevice;
    Ram => ram::Ram, Arc<ram::RamStore>;
    File => file::FileBackend, Arc<file::Backing>;
    Nvme => nvme::Nvme, nvme::NvmeDevice;
}

impl DeviceBackend {
    /// What [`Self::served_file`] is.
    pub fn file_id(&self) -> Option<FileId> {
        self.served_file().and_then(|(f, _)| f.metadata().ok()).map(|m| FileId::of(&m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::{LINUX_6_14, LINUX_6_15};
    use crate::plan::{Transfer::*, resolve};

    /// Each kind has one backend, and `features` lists them in this order.
    #[test]
    fn the_registry_has_every_kind_once() {
        let kinds: Vec<BackendKind> = ALL.iter().map(|b| b.kind()).collect();
        assert_eq!(kinds, [BackendKind::Null, BackendKind::Ram, BackendKind::File, BackendKind::Nvme]);
        for b in ALL {
            assert_eq!(of(b.kind()).kind(), b.kind());
            assert_eq!(b.copy_rules().backend, b.name());
            // The name is the one users type and run files hold.
            let typed = clap::ValueEnum::to_possible_value(&b.kind()).unwrap();
            assert_eq!(typed.get_name(), b.name());
            assert_eq!(serde_json::to_string(&b.kind()).unwrap(), format!("\"{}\"", b.name()));
        }
    }

    /// What `auto` takes for each backend on a kernel with zero copy and on
    /// one without, and the backend rules whatever the kernel.
    #[test]
    fn each_backend_resolves_auto_to_its_best() {
        let want = [
            (BackendKind::Null, User, User),
            (BackendKind::Ram, Zero, User),
            (BackendKind::File, Zero, Copy),
            (BackendKind::Nvme, Zero, Copy),
        ];
        for (kind, new, old) in want {
            let rules = of(kind).copy_rules();
            assert_eq!(resolve(CopyMode::Auto, rules, LINUX_6_15).unwrap(), new, "{kind:?} on 6.15");
            assert_eq!(resolve(CopyMode::Auto, rules, LINUX_6_14).unwrap(), old, "{kind:?} on 6.14");
        }
        for kind in [BackendKind::Nvme, BackendKind::File] {
            let err = plan::check_copy_mode(CopyMode::User, of(kind).copy_rules(), false).unwrap_err();
            assert!(err.to_string().contains("would add a bounce copy"), "{kind:?}: {err}");
        }
        for kind in [BackendKind::Ram, BackendKind::Null] {
            assert!(plan::check_copy_mode(CopyMode::User, of(kind).copy_rules(), false).is_ok());
        }
        let err =
            plan::check_copy_mode(CopyMode::Auto, of(BackendKind::Null).copy_rules(), true).unwrap_err();
        assert!(err.to_string().contains("--explicit-buf-reg applies to zero copy"), "{err}");
    }

    /// An option of one backend given to another is refused, naming both.
    #[test]
    fn integrity_needs_a_backend_that_keeps_metadata_and_user_copy() {
        let pi = Options { integrity: true, ..Default::default() };
        for kind in [BackendKind::Null, BackendKind::Ram] {
            check_options(of(kind), &pi).unwrap();
            let user = Options { copy_mode: CopyMode::User, ..pi };
            check_options(of(kind), &user).unwrap();
        }
        let dev = Path::new("/dev/ng0n1");
        for (kind, o) in [(BackendKind::File, pi), (BackendKind::Nvme, Options { dev: Some(dev), ..pi })] {
            let err = check_options(of(kind), &o).unwrap_err().to_string();
            assert!(err.contains("--integrity is served by null and ram"), "{err}");
        }
        let copy = Options { copy_mode: CopyMode::Copy, ..pi };
        let err = check_options(of(BackendKind::Ram), &copy).unwrap_err().to_string();
        assert!(err.contains("use --copy-mode user"), "{err}");
    }

    #[test]
    fn options_belong_to_their_backend() {
        let p = Path::new("/x");
        let cases = [
            (
                BackendKind::Null,
                Options { store: Some(p), ..Default::default() },
                "--store is an option of the ram backend, not null",
            ),
            (
                BackendKind::File,
                Options { path: Some(p), store: Some(p), ..Default::default() },
                "--store is an option of the ram backend, not file: drop it (file serves --path)",
            ),
            (
                BackendKind::Ram,
                Options { path: Some(p), ..Default::default() },
                "--path is an option of the file backend, not ram: drop it (ram keeps its data in --store)",
            ),
            (
                BackendKind::Nvme,
                Options { direct: true, dev: Some(p), ..Default::default() },
                "--direct is an option of the file backend, not nvme",
            ),
            (
                BackendKind::Ram,
                Options { dev: Some(p), ..Default::default() },
                "--dev is an option of the nvme backend, not ram",
            ),
            (
                BackendKind::Null,
                Options { sparse: true, ..Default::default() },
                "--sparse is an option of the ram backend, not null",
            ),
            (BackendKind::Nvme, Options::default(), "the nvme backend needs --dev"),
            (BackendKind::File, Options::default(), "the file backend needs --path FILE"),
        ];
        for (kind, o, want) in cases {
            let err = check_options(of(kind), &o).unwrap_err().to_string();
            assert!(err.contains(want), "{kind:?} {o:?}: {err}");
        }
        let ok = [
            (BackendKind::Ram, Options { store: Some(p), sparse: true, ..Default::default() }),
            (BackendKind::File, Options { path: Some(p), direct: true, ..Default::default() }),
            (BackendKind::Nvme, Options { dev: Some(p), ..Default::default() }),
            (BackendKind::Null, Options::default()),
        ];
        for (kind, o) in ok {
            assert!(check_options(of(kind), &o).is_ok(), "{kind:?} {o:?}");
        }
    }
}
