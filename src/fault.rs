//! Test-only fault hooks, named by `UBLK_BENCH_FAULT` in the environment of
//! the server that creates a device (`add`), of `restart` for the two
//! handover hooks, or of a takeover for the one pause (no other hook
//! reaches a takeover, whose server must serve). Read once per process,
//! before ADD_DEV, QUIESCE_DEV or the takeover, so a bad value is refused
//! before anything exists or is sent.
//!
//! - `queue-panic:N`: each queue thread panics when request N+1 arrives
//!   (`queue` module doc); per request it costs a countdown.
//! - `abort-before-live`: the server aborts once the device is started but
//!   before it tells `add` it is LIVE, as a daemon that dies at the worst
//!   moment would; `add` must notice at once and clean up.
//! - `no-batch-io`: GET_FEATURES is read as if the kernel lacked
//!   UBLK_F_BATCH_IO (as before 7.0), so `add --batch` must refuse before
//!   ADD_DEV and `features` must say so.
//! - `no-update-size`: GET_FEATURES is read as if the kernel lacked
//!   UBLK_F_UPDATE_SIZE (as before 6.16): `add` makes a device without it,
//!   as an older ublk-bench did, and `resize` refuses as on such a kernel.
//! - `no-per-io-daemon`: GET_FEATURES is read as if the kernel lacked
//!   UBLK_F_PER_IO_DAEMON (as before 6.16), so `add --threads N` with N
//!   other than the queue count must refuse before ADD_DEV.
//! - `interrupt-after-quiesce`: `restart` sends itself SIGINT right after
//!   QUIESCE_DEV, as a Ctrl-C at that moment would; the successor it handed
//!   the device to must take over all the same.
//! - `kill-after-quiesce`: `restart` SIGKILLs itself right after
//!   QUIESCE_DEV, as a closed terminal or a `kill -9` would: nothing of it
//!   runs after that, and the successor must take over all the same.
//! - `successor-abort`: `restart`'s successor aborts once the old server is
//!   gone, before START_USER_RECOVERY; `restart` must then recover the
//!   device cold and say so.
//! - `auto-buf-reg-fallback`: with UBLK_F_AUTO_BUF_REG each FETCH and
//!   COMMIT names a buffer slot past the queue's table, so the kernel's
//!   registration fails every time and each request comes with
//!   UBLK_IO_F_NEED_REG_BUF, to be served through the server's own
//!   REGISTER/UNREGISTER chain.
//! - `pause-after-start-recovery:MS`: a takeover server logs that
//!   START_USER_RECOVERY returned, then sleeps MS milliseconds before it
//!   posts its FETCHes, so a test can kill it, provably, between
//!   START_USER_RECOVERY and END_USER_RECOVERY.
//! - `fetch-bufs:N`: each `--batch` queue's FETCH buffer ring has N
//!   buffers (a power of two) instead of one per tag, so under load it runs
//!   dry and the kernel ends a multishot FETCH with -ENOBUFS while
//!   requests wait in its queue (`queue::batch` module doc).

use crate::error::{Error, Result};
use crate::sys;

pub const FAULT_ENV: &str = "UBLK_BENCH_FAULT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    QueuePanic(u64),
    AbortBeforeLive,
    NoBatchIo,
    NoUpdateSize,
    NoPerIoDaemon,
    InterruptAfterQuiesce,
    KillAfterQuiesce,
    SuccessorAbort,
    AutoBufRegFallback,
    PauseAfterStartRecovery(u64),
    FetchBufs(u16),
}

/// The kernel's GET_FEATURES as this server is to see it: the fault hook
/// may hide UBLK_F_BATCH_IO, UBLK_F_UPDATE_SIZE or UBLK_F_PER_IO_DAEMON.
pub fn mask_features(features: u64, fault: Option<Fault>) -> u64 {
    match fault {
        Some(Fault::NoBatchIo) => features & !sys::UBLK_F_BATCH_IO,
        Some(Fault::NoUpdateSize) => features & !sys::UBLK_F_UPDATE_SIZE,
        Some(Fault::NoPerIoDaemon) => features & !sys::UBLK_F_PER_IO_DAEMON,
        _ => features,
    }
}

/// The FETCH buffer count the environment's fault hook asks for, if any
/// (read by each batch queue; a bad value was refused before ADD_DEV).
pub fn fetch_bufs() -> Option<u16> {
    match from_env() {
        Ok(Some(Fault::FetchBufs(n))) => Some(n),
        _ => None,
    }
}

/// The fault the environment asks for, or None when the variable is unset.
pub fn from_env() -> Result<Option<Fault>> {
    match std::env::var(FAULT_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Ok(v) => parse(&v).map(Some),
        Err(e) => Err(Error::invalid(format!("{FAULT_ENV}: {e}: unset it"))),
    }
}

fn parse(v: &str) -> Result<Fault> {
    match v {
        "abort-before-live" => return Ok(Fault::AbortBeforeLive),
        "no-batch-io" => return Ok(Fault::NoBatchIo),
        "no-update-size" => return Ok(Fault::NoUpdateSize),
        "no-per-io-daemon" => return Ok(Fault::NoPerIoDaemon),
        "interrupt-after-quiesce" => return Ok(Fault::InterruptAfterQuiesce),
        "kill-after-quiesce" => return Ok(Fault::KillAfterQuiesce),
        "successor-abort" => return Ok(Fault::SuccessorAbort),
        "auto-buf-reg-fallback" => return Ok(Fault::AutoBufRegFallback),
        _ => {}
    }
    let number = |prefix: &str| v.strip_prefix(prefix).and_then(|n| n.parse().ok());
    number("queue-panic:")
        .map(Fault::QueuePanic)
        .or_else(|| number("pause-after-start-recovery:").map(Fault::PauseAfterStartRecovery))
        .or_else(|| {
            let n = number("fetch-bufs:")?;
            (n.is_power_of_two() && n <= 1 << 15).then_some(Fault::FetchBufs(n as u16))
        })
        .ok_or_else(|| {
            Error::invalid(format!(
                "{FAULT_ENV}={v:?} is not understood: give queue-panic:N (each queue thread panics after \
                 serving N requests), abort-before-live, no-batch-io, no-update-size, no-per-io-daemon, \
                 interrupt-after-quiesce, \
                 kill-after-quiesce, successor-abort, auto-buf-reg-fallback, pause-after-start-recovery:MS, \
                 fetch-bufs:N (a power of two), or unset it"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_hook_parses_or_says_what_to_give() {
        assert_eq!(parse("queue-panic:0").unwrap(), Fault::QueuePanic(0));
        assert_eq!(parse("queue-panic:250").unwrap(), Fault::QueuePanic(250));
        assert_eq!(parse("auto-buf-reg-fallback").unwrap(), Fault::AutoBufRegFallback);
        assert_eq!(parse("abort-before-live").unwrap(), Fault::AbortBeforeLive);
        assert_eq!(parse("no-batch-io").unwrap(), Fault::NoBatchIo);
        assert_eq!(parse("no-update-size").unwrap(), Fault::NoUpdateSize);
        assert_eq!(parse("interrupt-after-quiesce").unwrap(), Fault::InterruptAfterQuiesce);
        assert_eq!(parse("kill-after-quiesce").unwrap(), Fault::KillAfterQuiesce);
        assert_eq!(parse("successor-abort").unwrap(), Fault::SuccessorAbort);
        assert_eq!(parse("pause-after-start-recovery:500").unwrap(), Fault::PauseAfterStartRecovery(500));
        assert_eq!(parse("fetch-bufs:1").unwrap(), Fault::FetchBufs(1));
        assert_eq!(parse("fetch-bufs:4").unwrap(), Fault::FetchBufs(4));
        let all = u64::MAX;
        assert_eq!(mask_features(all, Some(Fault::NoBatchIo)), all & !sys::UBLK_F_BATCH_IO);
        assert_eq!(mask_features(all, Some(Fault::NoUpdateSize)), all & !sys::UBLK_F_UPDATE_SIZE);
        assert_eq!(parse("no-per-io-daemon").unwrap(), Fault::NoPerIoDaemon);
        assert_eq!(mask_features(all, Some(Fault::NoPerIoDaemon)), all & !sys::UBLK_F_PER_IO_DAEMON);
        assert_eq!(mask_features(all, Some(Fault::AbortBeforeLive)), all);
        assert_eq!(mask_features(all, None), all);
        for bad in [
            "queue-panic:",
            "queue-panic:-1",
            "queue-panic:x",
            "panic:3",
            "",
            "pause-after-start-recovery:",
            "fetch-bufs:0",
            "fetch-bufs:3",
            "fetch-bufs:65536",
        ] {
            let msg = parse(bad).unwrap_err().to_string();
            assert!(msg.contains("queue-panic:N") && msg.contains(FAULT_ENV), "{bad}: {msg}");
        }
    }
}
