//! A device's I/O scheduler (the block queue's elevator): `--scheduler`,
//! what the kernel offers, and putting the queue on one through sysfs.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// `--scheduler`: `keep` leaves the kernel's choice (None); otherwise the
/// name of the scheduler to put the device's queue on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerChoice(pub Option<String>);

impl std::fmt::Display for SchedulerChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_deref().unwrap_or("keep"))
    }
}

/// Longest elevator name the kernel takes (ELV_NAME_MAX 16, with the NUL).
const SCHEDULER_NAME_MAX: usize = 15;

/// Parses `--scheduler`: `keep` (any case) or an elevator name such as
/// `none`, `mq-deadline`, `kyber`, `bfq`.
pub fn parse_scheduler(s: &str) -> std::result::Result<SchedulerChoice, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("keep") {
        return Ok(SchedulerChoice(None));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
    if s.is_empty() || s.len() > SCHEDULER_NAME_MAX || !s.chars().all(ok_char) {
        return Err(format!(
            "'{s}' is not an I/O scheduler name: give keep, or a name such as none, mq-deadline, kyber or bfq"
        ));
    }
    Ok(SchedulerChoice(Some(s.to_string())))
}

/// `/sys/block/ublkbN/queue/scheduler`.
pub fn scheduler_path(dev_id: u32) -> PathBuf {
    format!("/sys/block/ublkb{dev_id}/queue/scheduler").into()
}

/// The names a scheduler file lists (`[mq-deadline] kyber none`) and the
/// active one, the name in brackets.
pub fn scheduler_names(text: &str) -> (Vec<String>, Option<String>) {
    let words = text.split_whitespace();
    let names = words.clone().map(|w| w.trim_matches(['[', ']']).to_string()).collect();
    let active = words.into_iter().find(|w| w.starts_with('[')).map(|w| w.trim_matches(['[', ']']).into());
    (names, active)
}

/// The active scheduler of device `dev_id`'s queue; None without a block device.
pub fn active_scheduler(dev_id: u32) -> Option<String> {
    std::fs::read_to_string(scheduler_path(dev_id)).ok().and_then(|t| scheduler_names(&t).1)
}

/// Every scheduler some block queue of this machine offers (the kernel
/// lists the same registered ones for every blk-mq queue), sorted.
pub fn offered_schedulers() -> Vec<String> {
    let mut all = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        if let Ok(text) = std::fs::read_to_string(entry.path().join("queue/scheduler")) {
            all.extend(scheduler_names(&text).0);
        }
    }
    all.into_iter().collect()
}

/// Refuses, before anything is created, a scheduler no block queue of
/// this machine offers. With no queue to ask, the write after START_DEV
/// is the check.
pub fn check_scheduler(name: &str, offered: &[String]) -> Result<()> {
    if name == "none" || offered.is_empty() || offered.iter().any(|o| o == name) {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "the kernel offers no I/O scheduler '{name}' (it offers {}; one built as a module must be loaded \
         first, e.g. modprobe {name}): give --scheduler with one of them, or keep",
        offered.join(", ")
    )))
}

/// Puts device `dev_id`'s queue on scheduler `name` (after START_DEV,
/// when the block device exists) and checks that it took.
pub fn set_scheduler(dev_id: u32, name: &str) -> Result<()> {
    let path = scheduler_path(dev_id);
    let failed = |why: String| {
        Error::invalid(format!(
            "could not put /dev/ublkb{dev_id} on the I/O scheduler '{name}' ({why}): give --scheduler keep \
             or one of {}",
            offered_schedulers().join(", ")
        ))
    };
    std::fs::write(&path, name).map_err(|e| failed(format!("write {}: {e}", path.display())))?;
    match active_scheduler(dev_id) {
        Some(now) if now == name => Ok(()),
        now => Err(failed(format!("the queue is on {}", now.as_deref().unwrap_or("nothing")))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_names_parse_and_are_checked() {
        assert_eq!(parse_scheduler("keep"), Ok(SchedulerChoice(None)));
        assert_eq!(parse_scheduler("KEEP"), Ok(SchedulerChoice(None)));
        assert_eq!(parse_scheduler("mq-deadline"), Ok(SchedulerChoice(Some("mq-deadline".into()))));
        for bad in ["", "None!", "../x", "a-very-long-scheduler-name"] {
            assert!(parse_scheduler(bad).unwrap_err().contains("not an I/O scheduler name"), "{bad}");
        }
        let text = "[mq-deadline] kyber none\n";
        let (names, active) = scheduler_names(text);
        assert_eq!(
            (names, active.as_deref()),
            (vec!["mq-deadline".into(), "kyber".into(), "none".into()], Some("mq-deadline"))
        );
        let offered: Vec<String> = ["kyber", "mq-deadline", "none"].map(String::from).into();
        assert!(check_scheduler("kyber", &offered).is_ok() && check_scheduler("none", &[]).is_ok());
        let err = check_scheduler("bfq", &offered).unwrap_err().to_string();
        assert!(
            err.contains("'bfq'") && err.contains("kyber, mq-deadline, none") && err.contains("keep"),
            "{err}"
        );
        assert!(check_scheduler("bfq", &[]).is_ok(), "nothing to ask: the write after START_DEV decides");
    }
}
