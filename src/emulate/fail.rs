//! `--fail RULE`: requests the emulated device fails on purpose.
//!
//! A rule is comma-separated `key=value`s, each optional:
//! `rate=0.01` (the fraction of matching requests failed; 1 by default),
//! `op=read|write|flush|discard|write-zeroes|any`, `lba=START-END` (512-byte
//! sectors, both ends included; a request touching the range matches),
//! `err=EIO` (the errno the request completes with; EIO by default) and
//! `after=N` (the first N matching requests of the device pass). Several
//! `--fail` rules may be given; the first that fails a request names its error.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::sys;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailRule {
    /// The fraction of matching requests failed, in parts per billion (1..=10^9).
    pub rate_ppb: u32,
    /// None: every operation.
    pub op: Option<u8>,
    /// Sectors, both ends included.
    pub lba: Option<(u64, u64)>,
    /// Positive errno.
    pub errno: i32,
    pub after: u64,
}

/// The errnos a rule may give, as the block layer maps them to a status
/// (`errno_to_blk_status`): each one a real device reports.
const ERRNOS: &[(&str, i32)] = &[
    ("EIO", libc::EIO),
    ("ENOSPC", libc::ENOSPC),
    ("ENODATA", libc::ENODATA),
    ("ETIMEDOUT", libc::ETIMEDOUT),
    ("ENOLINK", libc::ENOLINK),
    ("EREMOTEIO", libc::EREMOTEIO),
    ("EILSEQ", libc::EILSEQ),
    ("EOPNOTSUPP", libc::EOPNOTSUPP),
    ("EBADE", libc::EBADE),
];

const OPS: &[(&str, u8)] = &[
    ("read", sys::UBLK_IO_OP_READ),
    ("write", sys::UBLK_IO_OP_WRITE),
    ("flush", sys::UBLK_IO_OP_FLUSH),
    ("discard", sys::UBLK_IO_OP_DISCARD),
    ("write-zeroes", sys::UBLK_IO_OP_WRITE_ZEROES),
];

impl FailRule {
    /// Whether a request of `op` over `sectors` from `sector` is one the rule looks at.
    #[inline]
    fn matches(&self, op: u8, sector: u64, sectors: u64) -> bool {
        self.op.is_none_or(|o| o == op)
            && self.lba.is_none_or(|(lo, hi)| {
                // A flush names no sector: it matches only a rule without a range.
                op != sys::UBLK_IO_OP_FLUSH && sector <= hi && sector.saturating_add(sectors.max(1)) > lo
            })
    }

    /// The rule as `list` shows it (and `--fail` takes it back).
    pub fn describe(&self) -> String {
        let mut parts = vec![format!("rate={}", self.rate_ppb as f64 / 1e9)];
        if let Some(op) = self.op {
            parts.push(format!("op={}", OPS.iter().find(|o| o.1 == op).map_or("?", |o| o.0)));
        }
        if let Some((lo, hi)) = self.lba {
            parts.push(format!("lba={lo}-{hi}"));
        }
        parts.push(format!("err={}", ERRNOS.iter().find(|e| e.1 == self.errno).map_or("?", |e| e.0)));
        if self.after > 0 {
            parts.push(format!("after={}", self.after));
        }
        parts.join(",")
    }
}

/// `--fail`'s value parser (clap).
pub fn parse(s: &str) -> Result<FailRule, String> {
    let mut r = FailRule { rate_ppb: PPB, op: None, lba: None, errno: libc::EIO, after: 0 };
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(format!("`{part}`: write key=value (rate, op, lba, err, after)"));
        };
        match k {
            "rate" => r.rate_ppb = parse_rate(v)?,
            "op" if v == "any" => r.op = None,
            "op" => r.op = Some(lookup(OPS, v, "op")?),
            "lba" => r.lba = Some(parse_range(v)?),
            "err" => r.errno = lookup(ERRNOS, &v.to_ascii_uppercase(), "err")?,
            "after" => {
                r.after =
                    v.parse().map_err(|_| format!("after=`{v}`: a count of requests, e.g. after=1000"))?
            }
            _ => return Err(format!("`{k}`: unknown key (rate, op, lba, err, after)")),
        }
    }
    Ok(r)
}

const PPB: u32 = 1_000_000_000;

fn parse_rate(v: &str) -> Result<u32, String> {
    let rate = match v.strip_suffix('%') {
        Some(p) => p.parse::<f64>().map(|x| x / 100.0),
        None => v.parse::<f64>(),
    };
    match rate.map(|x| (x * PPB as f64).round()) {
        Ok(x) if x >= 1.0 && x <= PPB as f64 => Ok(x as u32),
        _ => Err(format!("rate=`{v}`: a fraction of at least 1e-9 and at most 1 (0.01, or 1%)")),
    }
}

fn parse_range(v: &str) -> Result<(u64, u64), String> {
    let bad = || format!("lba=`{v}`: START-END in 512-byte sectors, both included (e.g. lba=0-2047)");
    let (lo, hi) = v.split_once('-').ok_or_else(bad)?;
    let (lo, hi): (u64, u64) = (lo.parse().map_err(|_| bad())?, hi.parse().map_err(|_| bad())?);
    if lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

fn lookup<T: Copy>(table: &[(&str, T)], v: &str, key: &str) -> Result<T, String> {
    table.iter().find(|e| e.0 == v).map(|e| e.1).ok_or_else(|| {
        let names: Vec<&str> = table.iter().map(|e| e.0).collect();
        format!("{key}=`{v}`: one of {}", names.join(", "))
    })
}

/// The device's rules with their counts of matching requests, shared by
/// its queue threads (`after` counts the device's requests, not a queue's).
#[derive(Debug)]
pub struct Failer {
    rules: Vec<FailRule>,
    seen: Vec<AtomicU64>,
}

impl Failer {
    pub fn new(rules: Vec<FailRule>) -> Self {
        let seen = rules.iter().map(|_| AtomicU64::new(0)).collect();
        Failer { rules, seen }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The negative errno to fail this request with, if a rule hits it;
    /// `u` is a uniform draw.
    #[inline]
    pub fn check(&self, op: u8, sector: u64, sectors: u64, u: u64) -> Option<i32> {
        for (rule, seen) in self.rules.iter().zip(&self.seen) {
            if !rule.matches(op, sector, sectors) {
                continue;
            }
            if seen.fetch_add(1, Ordering::Relaxed) < rule.after {
                continue;
            }
            // u's top 32 bits against the rate scaled to 2^32.
            if rule.rate_ppb >= PPB || (u >> 32) < rule.rate_ppb as u64 * (1 << 32) / PPB as u64 {
                return Some(-rule.errno);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_describe_themselves() {
        let r = parse("rate=0.5,op=write,lba=100-199,err=enospc,after=3").unwrap();
        assert_eq!(
            r,
            FailRule {
                rate_ppb: 500_000_000,
                op: Some(1),
                lba: Some((100, 199)),
                errno: libc::ENOSPC,
                after: 3
            }
        );
        assert_eq!(r.describe(), "rate=0.5,op=write,lba=100-199,err=ENOSPC,after=3");
        assert_eq!(parse(&r.describe()).unwrap(), r);
        assert_eq!(parse("").unwrap().describe(), "rate=1,err=EIO");
        assert_eq!(parse("rate=1%").unwrap().rate_ppb, 10_000_000);
    }

    #[test]
    fn bad_rules_are_refused_with_what_to_write() {
        for (bad, says) in [
            ("rate=0", "at least 1e-9"),
            ("rate=1.5", "at most 1"),
            ("rate=-0.1", "at least"),
            ("rate=x", "a fraction"),
            ("op=trim", "one of read, write"),
            ("err=EPERM", "one of EIO"),
            ("lba=9-3", "START-END"),
            ("lba=7", "START-END"),
            ("after=-1", "a count"),
            ("often", "key=value"),
            ("when=now", "unknown key"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    /// Exactly what was asked fails: the range's edges, the op, `after`.
    #[test]
    fn failures_hit_exactly_what_was_asked() {
        let f = Failer::new(vec![parse("op=write,lba=100-199,after=2,err=ENOSPC").unwrap()]);
        let w = sys::UBLK_IO_OP_WRITE;
        assert_eq!(f.check(w, 100, 8, 0), None, "the first match passes (after=2)");
        assert_eq!(f.check(w, 100, 8, 0), None, "and the second");
        assert_eq!(f.check(w, 100, 8, 0), Some(-libc::ENOSPC));
        assert_eq!(f.check(w, 92, 8, 0), None, "92..=99 ends before the range");
        assert_eq!(f.check(w, 92, 9, 0), Some(-libc::ENOSPC), "92..=100 touches it");
        assert_eq!(f.check(w, 199, 1, 0), Some(-libc::ENOSPC));
        assert_eq!(f.check(w, 200, 8, 0), None, "past the range");
        assert_eq!(f.check(sys::UBLK_IO_OP_READ, 150, 8, 0), None, "another op");
        let flush = Failer::new(vec![parse("op=flush").unwrap()]);
        assert_eq!(flush.check(sys::UBLK_IO_OP_FLUSH, u64::MAX, 0, 0), Some(-libc::EIO));
    }

    #[test]
    fn a_rate_fails_that_fraction() {
        let f = Failer::new(vec![parse("rate=0.25").unwrap()]);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let failed = (0..100_000)
            .filter(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                f.check(sys::UBLK_IO_OP_READ, 0, 8, x).is_some()
            })
            .count();
        assert!((24_000..=26_000).contains(&failed), "{failed}");
    }
}
