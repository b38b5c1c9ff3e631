//! A device's settings: everything needed to serve it, made once by `add`,
//! validated here, and persisted so that `recover -n ID` needs nothing else.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sys;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Null,
    Ram,
    Nvme,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Null => "null",
            BackendKind::Ram => "ram",
            BackendKind::Nvme => "nvme",
        }
    }
}

/// How request data travels between the bio and the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CopyMode {
    /// Pick the best the kernel offers for the backend.
    Auto,
    /// Per-tag buffers; the kernel copies to and from them.
    Copy,
    /// UBLK_F_USER_COPY: pread/pwrite on /dev/ublkcN.
    User,
    /// Zero copy (AUTO_BUF_REG or SUPPORT_ZERO_COPY): the request's pages go straight to the device.
    Zero,
}

impl CopyMode {
    pub fn name(self) -> &'static str {
        match self {
            CopyMode::Auto => "auto",
            CopyMode::Copy => "copy",
            CopyMode::User => "user",
            CopyMode::Zero => "zero",
        }
    }
}

/// What happens to the device when its server dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recovery {
    /// The device is removed.
    #[default]
    None,
    /// USER_RECOVERY: I/O in the server fails, queued I/O waits.
    Plain,
    /// + REISSUE: I/O in the server is requeued.
    Reissue,
    /// + FAIL_IO: new I/O fails fast until a server is back.
    FailIo,
}

impl Recovery {
    pub fn flags(self) -> u64 {
        match self {
            Recovery::None => 0,
            Recovery::Plain => sys::UBLK_F_USER_RECOVERY,
            Recovery::Reissue => sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE,
            Recovery::FailIo => sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_FAIL_IO,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// None asks the kernel to pick.
    pub dev_id: Option<u32>,
    pub backend: BackendKind,
    pub size: u64,
    /// RAM store path (absolute, canonical folder); None for other backends.
    pub store: Option<PathBuf>,
    /// ublk-bench created the store file, so `del` and failed starts may
    /// remove it; false for a store the user brought with `--reuse-store`.
    #[serde(default)]
    pub store_created: bool,
    /// NVMe namespace (`/dev/ngXnY`) for `nvme`.
    #[serde(default)]
    pub nvme_dev: Option<PathBuf>,
    pub queues: u16,
    pub depth: u16,
    /// CPU per queue (queue q uses `cpus[q % len]`); empty: kernel affinity.
    pub cpus: Vec<usize>,
    pub poll: bool,
    pub block_size: u32,
    pub max_io_bytes: u32,
    pub copy_mode: CopyMode,
    /// Zero copy through REGISTER_IO_BUF chains, not AUTO_BUF_REG.
    #[serde(default)]
    pub explicit_buf_reg: bool,
    pub recovery: Recovery,
}

pub const MIN_SIZE: u64 = 1 << 20;
pub const MAX_SIZE: u64 = 1 << 50;
pub const DEFAULT_MAX_IO_BYTES: u32 = 512 << 10;

impl DeviceConfig {
    /// Checks everything that can be checked without the driver.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.block_size, 512 | 1024 | 2048 | 4096) {
            return Err(Error::invalid(format!(
                "block size {} is not supported: use 512, 1024, 2048 or 4096",
                self.block_size
            )));
        }
        if self.size < MIN_SIZE || self.size > MAX_SIZE {
            return Err(Error::invalid(format!(
                "size {} is out of range: give --size between 1M and 1P",
                self.size
            )));
        }
        if !self.size.is_multiple_of(self.block_size as u64) {
            return Err(Error::invalid(format!(
                "size {} is not a multiple of the block size {}: round it, e.g. --size {}",
                self.size,
                self.block_size,
                self.size / self.block_size as u64 * self.block_size as u64
            )));
        }
        if self.depth == 0 || self.depth as u32 > sys::UBLK_MAX_QUEUE_DEPTH {
            return Err(Error::invalid(format!(
                "depth {} is out of range: give -d between 1 and {}",
                self.depth,
                sys::UBLK_MAX_QUEUE_DEPTH
            )));
        }
        let ncpu = online_cpus().len();
        if self.queues == 0 || self.queues as usize > ncpu {
            return Err(Error::invalid(format!(
                "{} queues is out of range: give -q between 1 and {ncpu} (the online CPUs)",
                self.queues
            )));
        }
        self.validate_cpus()
    }

    fn validate_cpus(&self) -> Result<()> {
        let online = online_cpus();
        match self.cpus.iter().find(|c| !online.contains(c)) {
            Some(c) => Err(Error::invalid(format!(
                "CPU {c} does not exist or is offline: pick from {}",
                format_cpus(&online)
            ))),
            None => Ok(()),
        }
    }

    /// The CPU for queue `qid` if the user gave a list.
    pub fn cpu_for(&self, qid: u16) -> Option<usize> {
        (!self.cpus.is_empty()).then(|| self.cpus[qid as usize % self.cpus.len()])
    }

    pub fn dev_sectors(&self) -> u64 {
        self.size >> 9
    }
}

/// Parses `4096`, `4k`, `512M`, `1G`, `2T` (binary units).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let mult = match s[i..].to_ascii_lowercase().trim_end_matches("ib").trim_end_matches('b') {
                "" => 1,
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                "p" => 1 << 50,
                u => return Err(format!("unknown unit '{u}' in size '{s}': use k, M, G, T or P")),
            };
            (&s[..i], mult)
        }
    };
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size: write e.g. 4096, 64M or 1G"))?;
    n.checked_mul(mult).ok_or_else(|| format!("size '{s}' is too large"))
}

/// Parses `0,1`, `2-5` and mixes of both.
pub fn parse_cpus(s: &str) -> std::result::Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("'{part}' is not a CPU or range: write e.g. 0,1 or 2-3");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    if out.is_empty() {
        return Err("the CPU list is empty: write e.g. 0,1".into());
    }
    Ok(out)
}

/// CPUs this process may run on.
pub fn online_cpus() -> Vec<usize> {
    core_affinity::get_core_ids()
        .map(|ids| ids.into_iter().map(|c| c.id).collect())
        .unwrap_or_else(|| vec![0])
}

pub fn format_cpus(cpus: &[usize]) -> String {
    cpus.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample() -> DeviceConfig {
        DeviceConfig {
            dev_id: None,
            backend: BackendKind::Ram,
            size: 64 << 20,
            store: None,
            store_created: false,
            nvme_dev: None,
            queues: 1,
            depth: 64,
            cpus: vec![],
            poll: false,
            block_size: 512,
            max_io_bytes: DEFAULT_MAX_IO_BYTES,
            copy_mode: CopyMode::Auto,
            explicit_buf_reg: false,
            recovery: Recovery::None,
        }
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("12x").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn cpu_lists_parse_ranges() {
        assert_eq!(parse_cpus("0,1"), Ok(vec![0, 1]));
        assert_eq!(parse_cpus("2-4,7"), Ok(vec![2, 3, 4, 7]));
        assert!(parse_cpus("3-1").is_err());
        assert!(parse_cpus("a").is_err());
    }

    #[test]
    fn validation_rejects_bad_values() {
        assert!(sample().validate().is_ok());
        let bad = [
            DeviceConfig { size: 1000 << 20 | 100, ..sample() },
            DeviceConfig { size: 4096, ..sample() },
            DeviceConfig { depth: 0, ..sample() },
            DeviceConfig { depth: 5000, ..sample() },
            DeviceConfig { queues: 0, ..sample() },
            DeviceConfig { queues: 9999, ..sample() },
            DeviceConfig { cpus: vec![100_000], ..sample() },
            DeviceConfig { block_size: 3000, ..sample() },
        ];
        for cfg in bad {
            assert!(matches!(cfg.validate(), Err(Error::Invalid(_))), "{cfg:?}");
        }
    }

    #[test]
    fn recovery_flags() {
        assert_eq!(Recovery::None.flags(), 0);
        assert_eq!(Recovery::Reissue.flags(), sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE);
    }
}
