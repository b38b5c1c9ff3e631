//! Server log lines: a monotonic timestamp (seconds since boot) and the pid,
//! so phases of a recovery can be lined up across processes.

/// Seconds on CLOCK_MONOTONIC.
pub fn mono_secs() -> f64 {
    crate::clock::now_ns() as f64 / 1e9
}

#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("[{:.6}] ublk-bench[{}]: {}", $crate::log::mono_secs(), std::process::id(), format_args!($($arg)*))
    };
}
