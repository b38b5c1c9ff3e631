//! Errors a person can act on. Each message says what to do next.

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
}

impl Error {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }

    /// The errno to complete an I/O with when this error hits a request.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Invalid(_) => libc::EINVAL,
            Error::Unsupported { .. } => libc::EOPNOTSUPP,
            _ => libc::EIO,
        }
    }
}
