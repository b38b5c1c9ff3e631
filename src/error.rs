//! Errors a person can act on. Each message says what to do next.
//!
//! The variant says what kind of failure it is, so a caller can tell them
//! apart: [`Error::Invalid`] is bad input only (refused before any kernel
//! state is touched); a control command the kernel failed is
//! [`Error::Kernel`]; a takeover that cannot go on is [`Error::Recovery`];
//! a queue that broke is [`Error::Queue`], or [`Error::RingFull`] when its
//! ring had no room for a command on the hot path.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "/dev/ublk-control is missing: load the driver with `modprobe ublk_drv` (or run inside the guest: bench-scripts/vm -- ...)"
    )]
    NoDriver,
    #[error("permission denied on /dev/ublk-control: ublk-bench must run as root")]
    NotRoot,
    #[error("device id {0} is already in use: pick another -n, or remove it with `ublk-bench del -n {0}`")]
    IdInUse(u32),
    #[error("device {0} does not exist: see `ublk-bench list`")]
    NoDevice(u32),
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// An operation refused or failed, in words that say what to do.
    #[error("{0}")]
    Refused(String),
    /// A message already worded for the user, passed on from another process.
    #[error("{0}")]
    Relayed(String),
    #[error("the running kernel lacks {feature} (needs Linux {version} or newer): {hint}")]
    Unsupported { feature: &'static str, version: &'static str, hint: &'static str },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// A ublk control command the kernel failed (ADD_DEV, START_DEV, ...).
    #[error("{cmd}: {source}")]
    Kernel { cmd: String, source: io::Error },
    /// A takeover cannot go on: the device's state, or its settings against the kernel's.
    #[error("{0}")]
    Recovery(String),
    /// A queue thread could not run as set up, or saw the kernel break the protocol.
    #[error("{0}")]
    Queue(String),
    /// A ring's submission queue had no room for a command on the hot path
    /// (rings are sized so that it never happens).
    #[error("{0}")]
    RingFull(String),
}

impl Error {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }

    /// The control command `cmd` failed with `source`.
    pub fn kernel(cmd: impl Into<String>, source: io::Error) -> Self {
        Error::Kernel { cmd: cmd.into(), source }
    }

    /// The errno to complete an I/O with when this error hits a request.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } | Error::Kernel { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            Error::RingFull(_) => libc::EBUSY,
            Error::Invalid(_) => libc::EINVAL,
            Error::Unsupported { .. } => libc::EOPNOTSUPP,
            _ => libc::EIO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed control command reads as before and is told apart from bad
    /// input; its errno is the kernel's.
    #[test]
    fn a_kernel_failure_is_not_bad_input() {
        let e = Error::kernel("ADD_DEV", io::Error::from_raw_os_error(libc::ENOMEM));
        assert_eq!(
            e.to_string(),
            Error::io("ADD_DEV", io::Error::from_raw_os_error(libc::ENOMEM)).to_string()
        );
        assert!(matches!(e, Error::Kernel { .. }) && e.errno() == libc::ENOMEM);
        assert!(!Error::RingFull("full".into()).to_string().starts_with("invalid argument"));
    }
}
