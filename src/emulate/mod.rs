//! Device emulation: service times (`--latency`) and failures (`--fail`)
//! a real disk has, on top of any backend. Both are device settings, kept
//! in the run file, so every takeover serves with the same model.
//!
//! Per queue, an [`Emulator`] decides at arrival what each request will
//! complete with and when; the queue holds the finished request in a
//! [`Due`] heap until then. Requests complete by due time, never by
//! arrival, and no request's timer blocks another's.

pub mod due;
pub mod fail;
pub mod latency;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use due::Due;
pub use fail::{FailRule, Failer};
pub use latency::Latency;

/// What the user asked the device to emulate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Emulation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<Latency>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fail: Vec<FailRule>,
}

impl Emulation {
    pub fn is_on(&self) -> bool {
        self.latency.is_some() || !self.fail.is_empty()
    }

    pub fn is_off(&self) -> bool {
        !self.is_on()
    }

    /// `list`'s words for it: `latency read=100us write=100us fail [...]`.
    pub fn describe(&self) -> String {
        let mut out = Vec::new();
        if let Some(l) = &self.latency {
            match l.read == l.write {
                true => out.push(format!("latency {}", l.read.describe())),
                false => out.push(format!("latency read={} write={}", l.read.describe(), l.write.describe())),
            }
        }
        out.extend(self.fail.iter().map(|r| format!("fail {}", r.describe())));
        out.join(" ")
    }
}

/// One queue's emulation: its draws, and the device's shared failer.
#[derive(Debug)]
pub struct Emulator {
    latency: Option<Latency>,
    failer: Arc<Failer>,
    rng: u64,
}

/// What the emulator decided for one arriving request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Nanoseconds of service time from arrival.
    pub delay_ns: u64,
    /// Some(-errno): complete with this instead of serving the request.
    pub fail: Option<i32>,
}

impl Emulator {
    /// `seed` differs per queue so queues do not draw in lockstep.
    pub fn new(e: &Emulation, failer: Arc<Failer>, seed: u64) -> Self {
        Emulator { latency: e.latency.clone(), failer, rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1 }
    }

    /// xorshift64*: cheap, and good enough for draws of times and failures.
    #[inline]
    fn draw(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// The verdict for a request of `op` over `sectors` sectors from `sector`.
    #[inline]
    pub fn arrive(&mut self, op: u8, sector: u64, sectors: u64) -> Verdict {
        let u = match self.latency.is_some() {
            true => self.draw(),
            false => 0,
        };
        let delay_ns = self.latency.as_ref().map_or(0, |l| l.dist(op).sample(u));
        let fail = match self.failer.is_empty() {
            true => None,
            false => {
                let u = self.draw();
                self.failer.check(op, sector, sectors, u)
            }
        };
        Verdict { delay_ns, fail }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys;

    #[test]
    fn settings_round_trip_through_the_run_file_and_describe_themselves() {
        let e = Emulation {
            latency: Some(latency::parse("read=100us,write=1ms").unwrap()),
            fail: vec![fail::parse("rate=0.5,op=write").unwrap()],
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Emulation>(&json).unwrap(), e);
        assert_eq!(e.describe(), "latency read=100us write=1ms fail rate=0.5,op=write,err=EIO");
        assert_eq!(serde_json::from_str::<Emulation>("{}").unwrap(), Emulation::default());
        assert!(!Emulation::default().is_on());
    }

    #[test]
    fn verdicts_follow_the_model_per_op() {
        let e = Emulation { latency: Some(latency::parse("read=100us,write=1ms").unwrap()), fail: vec![] };
        let mut q = Emulator::new(&e, Arc::new(Failer::new(e.fail.clone())), 1);
        assert_eq!(q.arrive(sys::UBLK_IO_OP_READ, 0, 8), Verdict { delay_ns: 100_000, fail: None });
        assert_eq!(q.arrive(sys::UBLK_IO_OP_WRITE, 0, 8).delay_ns, 1_000_000);
        assert_eq!(q.arrive(sys::UBLK_IO_OP_FLUSH, 0, 0).delay_ns, 1_000_000, "flush takes write's");
    }
}
