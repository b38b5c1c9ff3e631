//! A device's plan: what the user asked (a [`DeviceConfig`], its copy mode
//! possibly `auto`) and what the kernel offers (GET_FEATURES) or already has
//! (a device's flags), resolved once into what the device is: how its data
//! moves ([`Transfer`], which has no `auto`), whether the kernel registers
//! each request's pages, batch I/O, and the flags ADD_DEV asks for.
//!
//! A new device's server makes its plan from the features before ADD_DEV
//! ([`Plan::new`]); a takeover reads it from the device's flags
//! ([`Plan::of_device`]), after [`mismatches`] found its settings agree
//! with the device; `features` and `list` show it. Each rule here is
//! written once: what a backend can do comes from its [`CopyRules`], and a
//! new kernel flag is one more field or bit here.

use crate::config::{CopyMode, DeviceConfig, Recovery};
use crate::error::{Error, Result};
use crate::integrity::Integrity;
use crate::sys::{self, DevInfo, Params};

/// How request data travels between the bio and the server, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    /// Per-tag buffers; the kernel copies to and from them.
    Copy,
    /// UBLK_F_USER_COPY: pread/pwrite on /dev/ublkcN.
    User,
    /// Zero copy: the request's pages go straight to the device.
    Zero,
}

impl Transfer {
    pub fn name(self) -> &'static str {
        self.mode().name()
    }

    /// The same mode as `--copy-mode` and the settings file name it.
    pub fn mode(self) -> CopyMode {
        match self {
            Transfer::Copy => CopyMode::Copy,
            Transfer::User => CopyMode::User,
            Transfer::Zero => CopyMode::Zero,
        }
    }

    /// An explicit mode; None for `auto`, which only a plan resolves.
    pub fn of(mode: CopyMode) -> Option<Transfer> {
        match mode {
            CopyMode::Auto => None,
            CopyMode::Copy => Some(Transfer::Copy),
            CopyMode::User => Some(Transfer::User),
            CopyMode::Zero => Some(Transfer::Zero),
        }
    }

    /// The mode a device's flags give.
    pub fn of_flags(flags: u64) -> Transfer {
        if flags & sys::UBLK_F_USER_COPY != 0 {
            Transfer::User
        } else if flags & (sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_SUPPORT_ZERO_COPY) != 0 {
            Transfer::Zero
        } else {
            Transfer::Copy
        }
    }

    /// Whether a kernel with `features` can move data this way, and if not
    /// what it lacks.
    fn kernel_check(self, features: u64) -> Result<()> {
        match self {
            Transfer::User if features & sys::UBLK_F_USER_COPY == 0 => Err(Error::Unsupported {
                feature: "UBLK_F_USER_COPY",
                version: "6.5",
                hint: "use --copy-mode copy",
            }),
            // Before 6.15 GET_FEATURES masked SUPPORT_ZERO_COPY out (and ADD_DEV
            // cleared it); 6.15 added REGISTER_IO_BUF and began to report it. So
            // the bit in GET_FEATURES alone means a working zero copy.
            Transfer::Zero if features & sys::UBLK_F_SUPPORT_ZERO_COPY == 0 => Err(Error::Unsupported {
                feature: "UBLK_F_SUPPORT_ZERO_COPY with REGISTER_IO_BUF",
                version: "6.15",
                hint: "use --copy-mode copy",
            }),
            _ => Ok(()),
        }
    }
}

/// What a backend says about copy modes (each backend's own file holds its rules).
#[derive(Debug)]
pub struct CopyRules {
    /// The backend's name, for messages.
    pub backend: &'static str,
    /// What `auto` takes: the first of these the kernel has. Copy, last,
    /// every kernel has.
    pub auto: &'static [Transfer],
    /// Modes the backend refuses whatever the kernel, and why (the message
    /// goes on with what to use instead).
    pub refused: &'static [(Transfer, &'static str)],
}

impl CopyRules {
    /// Whether the backend can move data this way.
    pub fn allows(&self, t: Transfer) -> bool {
        !self.refused.iter().any(|(r, _)| *r == t)
    }

    /// `auto` on a kernel with `features`.
    fn auto_pick(&self, features: u64) -> Transfer {
        self.auto.iter().copied().find(|t| t.kernel_check(features).is_ok()).unwrap_or(Transfer::Copy)
    }

    /// Whether `mode` may end as zero copy on some kernel.
    fn may_be_zero(&self, mode: CopyMode) -> bool {
        match Transfer::of(mode) {
            Some(t) => t == Transfer::Zero,
            None => self.auto.contains(&Transfer::Zero),
        }
    }
}

/// The copy-mode rules that need no kernel, checked before anything is
/// made: what the backend can do, and `--explicit-buf-reg` only where zero
/// copy may come. `auto` may still end as copy (or user) on an old kernel;
/// [`Plan::new`] checks that against the features.
pub fn check_copy_mode(mode: CopyMode, rules: &CopyRules, explicit_buf_reg: bool) -> Result<()> {
    if let Some((t, why)) = rules.refused.iter().find(|(t, _)| Transfer::of(mode) == Some(*t)) {
        let instead: Vec<&str> = [Transfer::Zero, Transfer::Copy, Transfer::User]
            .into_iter()
            .filter(|m| rules.allows(*m))
            .map(Transfer::name)
            .collect();
        return Err(Error::invalid(format!(
            "{} copy {why} for {}: use --copy-mode {}",
            t.name(),
            rules.backend,
            instead.join(" or ")
        )));
    }
    check_buf_reg(rules.may_be_zero(mode), mode.name(), rules.backend, explicit_buf_reg)
}

/// The `--explicit-buf-reg` rule: it chooses how zero copy registers
/// buffers, so a device that will not be zero copy refuses it.
fn check_buf_reg(zero: bool, mode: &str, backend: &str, explicit_buf_reg: bool) -> Result<()> {
    match explicit_buf_reg && !zero {
        true => Err(Error::invalid(format!(
            "--explicit-buf-reg applies to zero copy, but {mode} copy for {backend} is not zero copy: drop it or add --copy-mode zero"
        ))),
        false => Ok(()),
    }
}

/// `mode` on a kernel with `features`: `auto` takes the best the kernel
/// offers for the backend; an explicit mode the kernel cannot do is refused.
/// What the backend cannot do was refused before, by [`check_copy_mode`].
pub fn resolve(mode: CopyMode, rules: &CopyRules, features: u64) -> Result<Transfer> {
    let t = Transfer::of(mode).unwrap_or_else(|| rules.auto_pick(features));
    t.kernel_check(features)?;
    Ok(t)
}

/// A device as it is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub transfer: Transfer,
    /// Zero copy through UBLK_F_AUTO_BUF_REG (6.16+): the kernel registers
    /// each request's pages itself, which saves two commands per request.
    /// Otherwise zero copy registers them with REGISTER_IO_BUF commands.
    pub auto_buf_reg: bool,
    /// UBLK_F_BATCH_IO.
    pub batch: bool,
    /// What ADD_DEV asks for (a takeover: what the device has).
    pub flags: u64,
}

impl Plan {
    /// A new device's plan on a kernel with `features`; what the kernel
    /// lacks is refused here, before ADD_DEV.
    pub fn new(cfg: &DeviceConfig, rules: &CopyRules, features: u64) -> Result<Plan> {
        let mode = match cfg.integrity {
            Some(_) => integrity_mode(cfg.copy_mode)?,
            None => cfg.copy_mode,
        };
        let transfer = resolve(mode, rules, features)?;
        check_buf_reg(transfer == Transfer::Zero, transfer.name(), rules.backend, cfg.explicit_buf_reg)?;
        check_recovery(cfg.recovery, features)?;
        let batch = batch_flag(cfg.batch, features)?;
        check_threads(cfg, features)?;
        let integrity = integrity_flag(cfg.integrity.is_some(), features)?;
        let auto_buf_reg =
            transfer == Transfer::Zero && features & sys::UBLK_F_AUTO_BUF_REG != 0 && !cfg.explicit_buf_reg;
        let copy = match transfer {
            Transfer::User => sys::UBLK_F_USER_COPY,
            // SUPPORT_ZERO_COPY too: a request whose pages the kernel could
            // not register (AUTO_BUF_REG_FALLBACK) is registered by a
            // REGISTER_IO_BUF chain, which the kernel refuses without it.
            Transfer::Zero if auto_buf_reg => sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_SUPPORT_ZERO_COPY,
            Transfer::Zero => sys::UBLK_F_SUPPORT_ZERO_COPY,
            Transfer::Copy => 0,
        };
        let flags = copy
            | cfg.recovery.flags()
            | quiesce_flag(cfg.recovery, features)
            | part_scan_flag(cfg.part_scan, features)
            // `resize` (UPDATE_SIZE) needs the flag on the device; it costs nothing else.
            | features & sys::UBLK_F_UPDATE_SIZE
            | batch
            | integrity;
        Ok(Plan { transfer, auto_buf_reg, batch: batch != 0, flags })
    }

    /// The plan of a device the kernel has, from its flags (GET_DEV_INFO).
    pub fn of_device(flags: u64) -> Plan {
        Plan {
            transfer: Transfer::of_flags(flags),
            auto_buf_reg: flags & sys::UBLK_F_AUTO_BUF_REG != 0,
            batch: flags & sys::UBLK_F_BATCH_IO != 0,
            flags,
        }
    }

    /// QUIESCE_DEV can hand the device over (UBLK_F_QUIESCE, `restart`).
    pub fn quiesce(&self) -> bool {
        self.flags & sys::UBLK_F_QUIESCE != 0
    }

    /// A takeover reissues the requests the old server held
    /// (UBLK_F_USER_RECOVERY_REISSUE, `-i`).
    pub fn reissue(&self) -> bool {
        self.flags & sys::UBLK_F_USER_RECOVERY_REISSUE != 0
    }
}

/// A takeover's settings against the device as the kernel has it
/// (GET_DEV_INFO, GET_PARAMS): each setting the kernel also knows that
/// differs, as "NAME X in the file, Y in the kernel". `max_io_bytes` is left out: ADD_DEV may round it, and a takeover sizes
/// its buffers from the kernel's value alone.
pub fn mismatches(cfg: &DeviceConfig, info: &DevInfo, params: &Params) -> Vec<String> {
    let mut wrong = vec![];
    let mut check = |name: &str, file: String, kernel: String| {
        if file != kernel {
            wrong.push(format!("{name} {file} in the file, {kernel} in the kernel"));
        }
    };
    check("device id", cfg.dev_id.map_or("none".into(), |i| i.to_string()), info.dev_id.to_string());
    check("queues", cfg.queues.to_string(), info.nr_hw_queues.to_string());
    check("depth", cfg.depth.to_string(), info.queue_depth.to_string());
    check("size", cfg.size.to_string(), (params.basic.dev_sectors << 9).to_string());
    check("block size", cfg.block_size.to_string(), (1u64 << params.basic.logical_bs_shift).to_string());
    check("copy mode", cfg.copy_mode.name().into(), Transfer::of_flags(info.flags).name().into());
    let rec_bits =
        sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE | sys::UBLK_F_USER_RECOVERY_FAIL_IO;
    check("recovery flags", format!("{:#x}", cfg.recovery.flags()), format!("{:#x}", info.flags & rec_bits));
    check("batch", cfg.batch.to_string(), (info.flags & sys::UBLK_F_BATCH_IO != 0).to_string());
    if !Integrity::same_as_kernel(cfg.integrity.as_ref(), info.flags, params) {
        let kernel = match info.flags & sys::UBLK_F_INTEGRITY {
            0 => "none".into(),
            _ => format!("{} bytes per block", params.integrity.metadata_size),
        };
        let file = cfg.integrity.map_or("none".into(), |i| i.describe());
        wrong.push(format!("integrity {file} in the file, {kernel} in the kernel"));
    }
    if cfg.explicit_buf_reg && info.flags & sys::UBLK_F_AUTO_BUF_REG != 0 {
        wrong.push("explicit buffer registration in the file, AUTO_BUF_REG in the kernel".into());
    }
    wrong
}

fn check_recovery(rec: Recovery, features: u64) -> Result<()> {
    let need = [
        (sys::UBLK_F_USER_RECOVERY, "UBLK_F_USER_RECOVERY", "6.1"),
        (sys::UBLK_F_USER_RECOVERY_REISSUE, "UBLK_F_USER_RECOVERY_REISSUE", "6.1"),
        (sys::UBLK_F_USER_RECOVERY_FAIL_IO, "UBLK_F_USER_RECOVERY_FAIL_IO", "6.13"),
    ];
    for (flag, feature, version) in need {
        if rec.flags() & flag != 0 && features & flag == 0 {
            return Err(Error::Unsupported { feature, version, hint: "drop the recovery flag or upgrade" });
        }
    }
    Ok(())
}

/// `--threads` other than one per queue: a tag then belongs to the thread
/// that fetched it, which only UBLK_F_PER_IO_DAEMON (6.16) allows; before
/// it all tags of a queue had one daemon. Refused with `--batch`, whose
/// devices the kernel gives no per-I/O daemon and whose plane serves one
/// queue per thread.
fn check_threads(cfg: &DeviceConfig, features: u64) -> Result<()> {
    let queues = crate::config::kernel_queues(cfg.queues);
    let threads = cfg.threads_for(queues);
    if threads == queues {
        return Ok(());
    }
    if cfg.batch {
        return Err(Error::invalid(format!(
            "--threads {threads} with --batch: the kernel gives batch devices no per-I/O daemon \
             (UBLK_F_PER_IO_DAEMON), so each of the {queues} queue(s) is served by one thread: drop --threads"
        )));
    }
    if features & sys::UBLK_F_PER_IO_DAEMON == 0 {
        return Err(Error::Unsupported {
            feature: "UBLK_F_PER_IO_DAEMON",
            version: "6.16",
            hint: "drop --threads (one thread per queue) or upgrade (see `ublk-bench features`)",
        });
    }
    Ok(())
}

/// UBLK_F_BATCH_IO for `--batch`, refused before ADD_DEV where the kernel lacks it.
fn batch_flag(batch: bool, features: u64) -> Result<u64> {
    match (batch, features & sys::UBLK_F_BATCH_IO) {
        (false, _) => Ok(0),
        (true, 0) => Err(Error::Unsupported {
            feature: "UBLK_F_BATCH_IO",
            version: "7.0",
            hint: "drop --batch (see `ublk-bench features`)",
        }),
        (true, f) => Ok(f),
    }
}

/// `--integrity`'s copy mode: the kernel moves metadata by user copy only,
/// so `auto` means user and any other mode is refused.
pub fn integrity_mode(mode: CopyMode) -> Result<CopyMode> {
    match mode {
        CopyMode::Auto | CopyMode::User => Ok(CopyMode::User),
        _ => Err(Error::invalid(format!(
            "--integrity moves metadata by user copy, the only way the kernel offers: use --copy-mode user \
             (or leave --copy-mode out), not {}",
            mode.name()
        ))),
    }
}

/// UBLK_F_INTEGRITY for `--integrity`, refused before ADD_DEV where the
/// kernel lacks it (the copy mode is [`integrity_mode`]'s).
fn integrity_flag(integrity: bool, features: u64) -> Result<u64> {
    if !integrity {
        return Ok(0);
    }
    if features & sys::UBLK_F_INTEGRITY == 0 {
        return Err(Error::Unsupported {
            feature: "UBLK_F_INTEGRITY",
            version: "7.0",
            hint: "drop --integrity (it also needs CONFIG_BLK_DEV_INTEGRITY; see `ublk-bench features`)",
        });
    }
    Ok(sys::UBLK_F_INTEGRITY)
}

/// A new device's parameters, as every backend has them: block size,
/// size, request size (`max_io_buf_bytes`, as ADD_DEV left it), discard
/// and protection information.
/// Its backend adds or narrows its own (`backend::Backend::params`).
pub fn params(cfg: &DeviceConfig, max_io_buf_bytes: u32) -> Params {
    let bs_shift = cfg.block_size.trailing_zeros() as u8;
    let mut p =
        Params { types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD, ..Default::default() };
    p.basic.logical_bs_shift = bs_shift;
    p.basic.physical_bs_shift = bs_shift.max(12);
    p.basic.io_min_shift = bs_shift;
    p.basic.io_opt_shift = bs_shift.max(12);
    p.basic.max_sectors = max_io_buf_bytes >> 9;
    p.basic.dev_sectors = cfg.dev_sectors();
    p.discard.discard_granularity = cfg.block_size.max(4096);
    p.discard.max_discard_sectors = u32::MAX >> 9;
    p.discard.max_write_zeroes_sectors = u32::MAX >> 9;
    p.discard.max_discard_segments = 1;
    if let Some(i) = &cfg.integrity {
        p.types |= sys::UBLK_PARAM_TYPE_INTEGRITY;
        p.integrity = i.param(cfg.block_size);
    }
    p
}

/// No partition scan unless asked (`--part-scan`), where the kernel can
/// leave it out (UBLK_F_NO_AUTO_PART_SCAN, 7.0); before that it always scans.
fn part_scan_flag(part_scan: bool, features: u64) -> u64 {
    if part_scan { 0 } else { features & sys::UBLK_F_NO_AUTO_PART_SCAN }
}

/// QUIESCE_DEV (planned restart) comes free with recovery where the kernel has it.
fn quiesce_flag(rec: Recovery, features: u64) -> u64 {
    if rec != Recovery::None { features & sys::UBLK_F_QUIESCE } else { 0 }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use Transfer::*;

    /// Bits 0-9 as GET_FEATURES reports them on 6.15 (ZERO_COPY, no UPDATE_SIZE).
    pub(crate) const LINUX_6_15: u64 = (1 << 10) - 1;
    /// 6.14 masks ZERO_COPY out of GET_FEATURES.
    pub(crate) const LINUX_6_14: u64 = LINUX_6_15 & !sys::UBLK_F_SUPPORT_ZERO_COPY;

    /// Rules shaped like a passthrough backend's and a memory backend's.
    const PASS: CopyRules =
        CopyRules { backend: "nvme", auto: &[Zero, Copy], refused: &[(User, "would add a bounce copy")] };
    const MEM: CopyRules = CopyRules { backend: "ram", auto: &[Zero, User, Copy], refused: &[] };
    const NONE: CopyRules = CopyRules { backend: "null", auto: &[User, Copy], refused: &[] };

    #[test]
    fn zero_copy_is_allowed_on_6_15_and_refused_before() {
        assert_eq!(resolve(CopyMode::Zero, &PASS, LINUX_6_15).unwrap(), Zero);
        assert_eq!(resolve(CopyMode::Auto, &PASS, LINUX_6_15).unwrap(), Zero);
        assert!(matches!(
            resolve(CopyMode::Zero, &PASS, LINUX_6_14),
            Err(Error::Unsupported { version: "6.15", .. })
        ));
        assert_eq!(resolve(CopyMode::Auto, &PASS, LINUX_6_14).unwrap(), Copy);
        assert_eq!(resolve(CopyMode::Auto, &MEM, LINUX_6_15).unwrap(), Zero);
        assert_eq!(resolve(CopyMode::Auto, &MEM, LINUX_6_14).unwrap(), User);
        assert_eq!(resolve(CopyMode::Auto, &NONE, LINUX_6_15).unwrap(), User);
        assert_eq!(resolve(CopyMode::Auto, &NONE, 0).unwrap(), Copy);
        assert_eq!(resolve(CopyMode::User, &MEM, LINUX_6_15).unwrap(), User);
    }

    #[test]
    fn copy_modes_a_backend_cannot_do_are_refused() {
        let refused = [
            (
                CopyMode::User,
                &PASS,
                false,
                "user copy would add a bounce copy for nvme: use --copy-mode zero or copy",
            ),
            (CopyMode::Copy, &PASS, true, "--explicit-buf-reg applies to zero copy"),
            (CopyMode::User, &MEM, true, "--explicit-buf-reg applies to zero copy"),
            (CopyMode::Auto, &NONE, true, "--explicit-buf-reg applies to zero copy"),
        ];
        for (mode, rules, ebr, want) in refused {
            let err = check_copy_mode(mode, rules, ebr).unwrap_err().to_string();
            assert!(err.contains(want), "{mode:?} {} {ebr}: {err}", rules.backend);
        }
        for (mode, rules, ebr) in [
            (CopyMode::Zero, &PASS, true),
            (CopyMode::Auto, &PASS, true),
            (CopyMode::Zero, &NONE, true),
            (CopyMode::User, &MEM, false),
            (CopyMode::Auto, &MEM, true),
            (CopyMode::Copy, &PASS, false),
        ] {
            assert!(check_copy_mode(mode, rules, ebr).is_ok(), "{mode:?} {} {ebr}", rules.backend);
        }
    }

    #[test]
    fn a_plan_has_no_auto_and_asks_for_what_it_resolved() {
        let cfg = |copy_mode, explicit_buf_reg| DeviceConfig {
            copy_mode,
            explicit_buf_reg,
            ..crate::config::tests::sample()
        };
        let all = u64::MAX;
        let p = Plan::new(&cfg(CopyMode::Auto, false), &MEM, all).unwrap();
        assert_eq!((p.transfer, p.auto_buf_reg), (Zero, true));
        assert_eq!(
            p.flags & (sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_SUPPORT_ZERO_COPY),
            sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_SUPPORT_ZERO_COPY,
            "AUTO_BUF_REG with SUPPORT_ZERO_COPY, for its fallback"
        );
        assert_ne!(p.flags & sys::UBLK_F_NO_AUTO_PART_SCAN, 0, "no partition scan by default");
        let scan = DeviceConfig { part_scan: true, ..cfg(CopyMode::Auto, false) };
        assert_eq!(Plan::new(&scan, &MEM, all).unwrap().flags & sys::UBLK_F_NO_AUTO_PART_SCAN, 0);
        let p = Plan::new(&cfg(CopyMode::Zero, true), &MEM, all).unwrap();
        assert_eq!((p.transfer, p.auto_buf_reg), (Zero, false));
        assert_eq!(p.flags & sys::UBLK_F_AUTO_BUF_REG, 0);
        assert_ne!(p.flags & sys::UBLK_F_SUPPORT_ZERO_COPY, 0);
        // auto resolved to user on a kernel without zero copy: the explicit
        // registration it was asked with has nothing to apply to.
        let err = Plan::new(&cfg(CopyMode::Auto, true), &MEM, LINUX_6_14).unwrap_err().to_string();
        assert!(err.contains("--explicit-buf-reg applies to zero copy, but user copy"), "{err}");
        for flags in [p.flags, Plan::new(&cfg(CopyMode::User, false), &MEM, all).unwrap().flags, 0] {
            let seen = Plan::of_device(flags);
            assert_eq!(seen.flags, flags);
            assert_eq!(seen.transfer, Transfer::of_flags(flags));
        }
    }

    /// `--integrity` resolves `auto` to user copy, asks for the flag and
    /// the parameters, is refused where the kernel lacks the flag or with
    /// another copy mode, and a takeover sees a device without it as another.
    #[test]
    fn integrity_is_user_copy_with_its_flag_and_parameters() {
        use crate::integrity::{Integrity, PiFormat};
        let pi = Integrity::new(PiFormat::T10difType1, None).unwrap();
        let cfg = DeviceConfig { integrity: Some(pi), ..crate::config::tests::sample() };
        let p = Plan::new(&cfg, &MEM, u64::MAX).unwrap();
        assert_eq!(p.transfer, User);
        assert_ne!(p.flags & sys::UBLK_F_INTEGRITY, 0);
        let plain = crate::config::tests::sample();
        assert_eq!(Plan::new(&plain, &MEM, u64::MAX).unwrap().flags & sys::UBLK_F_INTEGRITY, 0);
        let err = Plan::new(&cfg, &MEM, !sys::UBLK_F_INTEGRITY).unwrap_err().to_string();
        assert!(err.contains("UBLK_F_INTEGRITY") && err.contains("drop --integrity"), "{err}");
        let zero = DeviceConfig { copy_mode: CopyMode::Zero, ..cfg.clone() };
        let err = Plan::new(&zero, &MEM, u64::MAX).unwrap_err().to_string();
        assert!(err.contains("--copy-mode user"), "{err}");
        let params = params(&cfg, 1 << 20);
        assert_ne!(params.types & sys::UBLK_PARAM_TYPE_INTEGRITY, 0);
        assert_eq!(params.integrity.metadata_size, 8);
        let info = DevInfo { flags: p.flags, ..Default::default() };
        assert!(!mismatches(&cfg, &info, &params).iter().any(|m| m.contains("integrity")));
        let wrong = mismatches(&plain, &info, &params);
        assert!(wrong.iter().any(|m| m.contains("integrity none in the file")), "{wrong:?}");
    }

    /// What `restart` reads of a device: whether QUIESCE_DEV applies, and
    /// whether a batch device reissues (and so is handed over by SIGKILL).
    #[test]
    fn a_device_plan_says_quiesce_reissue_and_batch() {
        let all = sys::UBLK_F_QUIESCE | Recovery::Reissue.flags() | sys::UBLK_F_BATCH_IO;
        let p = Plan::of_device(all);
        assert!(p.quiesce() && p.reissue() && p.batch);
        let p = Plan::of_device(Recovery::Reissue.flags() & !sys::UBLK_F_USER_RECOVERY_REISSUE);
        assert!(!p.quiesce() && !p.reissue() && !p.batch);
        assert!(Plan::of_device(sys::UBLK_F_USER_RECOVERY_REISSUE).reissue());
        assert!(Plan::of_device(sys::UBLK_F_QUIESCE).quiesce());
    }

    #[test]
    fn update_size_is_asked_for_where_the_kernel_has_it() {
        let cfg = crate::config::tests::sample();
        let with = Plan::new(&cfg, &MEM, u64::MAX).unwrap();
        assert_ne!(with.flags & sys::UBLK_F_UPDATE_SIZE, 0, "resize needs it at ADD_DEV");
        let without = Plan::new(&cfg, &MEM, LINUX_6_15).unwrap();
        assert_eq!(without.flags & sys::UBLK_F_UPDATE_SIZE, 0, "6.15 has no UPDATE_SIZE");
    }

    #[test]
    fn batch_is_asked_for_only_where_the_kernel_has_it() {
        assert_eq!(batch_flag(false, u64::MAX).unwrap(), 0);
        assert_eq!(batch_flag(true, u64::MAX).unwrap(), sys::UBLK_F_BATCH_IO);
        let err = batch_flag(true, LINUX_6_15).unwrap_err().to_string();
        assert!(
            err.contains("UBLK_F_BATCH_IO") && err.contains("7.0") && err.contains("drop --batch"),
            "{err}"
        );
    }

    /// Threads other than one per queue need the per-I/O daemon and no
    /// --batch; one per queue, said or not, needs nothing.
    #[test]
    fn threads_need_the_per_io_daemon_and_no_batch() {
        let all = !sys::UBLK_F_BATCH_IO;
        let cfg = |threads, batch| DeviceConfig { threads, batch, ..crate::config::tests::sample() };
        assert!(Plan::new(&cfg(Some(2), false), &NONE, all).is_ok());
        assert!(Plan::new(&cfg(Some(1), true), &NONE, u64::MAX).is_ok(), "one per queue with --batch");
        assert!(Plan::new(&cfg(Some(1), false), &NONE, LINUX_6_15).is_ok());
        let old = Plan::new(&cfg(Some(2), false), &NONE, LINUX_6_15).unwrap_err().to_string();
        assert!(
            old.contains("UBLK_F_PER_IO_DAEMON") && old.contains("6.16") && old.contains("drop --threads"),
            "{old}"
        );
        let batch = Plan::new(&cfg(Some(2), true), &NONE, u64::MAX).unwrap_err().to_string();
        assert!(batch.contains("--threads 2 with --batch") && batch.contains("drop --threads"), "{batch}");
    }
}
