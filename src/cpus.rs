//! CPUs: the machine's possible and online CPUs (sysfs, the affinity
//! mask), and CPU lists as `--cpus` takes them and `list` shows them.

use crate::sys;

/// CPU ids a list may name: the kernel's largest CONFIG_NR_CPUS (MAXSMP) is
/// 8192, so no machine has a CPU 8192 or above; the cap also keeps a typo
/// such as `0-99999999999` from sizing a huge list.
pub const MAX_CPUS: usize = 8192;

/// nr_cpu_ids: one more than the highest possible CPU (sysfs).
pub fn possible_cpus() -> Option<usize> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").ok()?;
    // "0-5119" or "0,2-7": the last number is the highest.
    let last = s.trim().rsplit([',', '-']).next()?;
    last.parse::<usize>().ok().map(|m| m + 1)
}

/// nr_cpu_ids, for sizing CPU masks; MAX_CPUS where sysfs cannot say.
pub fn nr_cpu_ids() -> usize {
    possible_cpus().unwrap_or(MAX_CPUS)
}

/// Parses `0,1`, `2-5` and mixes of both.
pub fn parse_cpus(s: &str) -> std::result::Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("'{part}' is not a CPU or range: write e.g. 0,1 or 2-3");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (cpu_id(a, &bad)?, cpu_id(b, &bad)?);
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(cpu_id(part, &bad)?),
        }
        if out.len() > MAX_CPUS {
            return Err(format!("the CPU list '{s}' names more than {MAX_CPUS} CPUs: give each CPU once"));
        }
    }
    if out.is_empty() {
        return Err("the CPU list is empty: write e.g. 0,1".into());
    }
    Ok(out)
}

/// One CPU id of a list, below MAX_CPUS.
fn cpu_id(s: &str, bad: &dyn Fn() -> String) -> std::result::Result<usize, String> {
    let all_digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match s.parse::<usize>() {
        Ok(c) if c < MAX_CPUS => Ok(c),
        _ if all_digits => {
            Err(format!("CPU {s} does not exist: CPU ids run from 0 to at most {} (see nproc)", MAX_CPUS - 1))
        }
        _ => Err(bad()),
    }
}

/// CPUs this process may run on.
pub fn online_cpus() -> Vec<usize> {
    // A mask of nr_cpu_ids bits: a fixed cpu_set_t (1024) is refused
    // (EINVAL) on larger machines.
    let mut mask = vec![0u64; sys::cpu_mask_words(nr_cpu_ids())];
    // SAFETY: mask is writable for its whole length in bytes.
    let r = unsafe { libc::sched_getaffinity(0, mask.len() * 8, mask.as_mut_ptr().cast()) };
    match sys::mask_cpus(&mask) {
        cpus if r == 0 && !cpus.is_empty() => cpus,
        _ => vec![0],
    }
}

pub fn format_cpus(cpus: &[usize]) -> String {
    cpus.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_ranges() {
        assert_eq!(parse_cpus("0,1"), Ok(vec![0, 1]));
        assert_eq!(parse_cpus("2-4,7"), Ok(vec![2, 3, 4, 7]));
        assert!(parse_cpus("3-1").is_err());
        assert!(parse_cpus("a").is_err());
    }

    #[test]
    fn cpu_ids_are_capped_without_building_the_list() {
        for s in ["0-99999999999", "8192", "0-99999999999999999999999", "1,9000"] {
            let err = parse_cpus(s).unwrap_err();
            assert!(err.contains("does not exist") && err.contains("8191"), "{s}: {err}");
        }
        assert_eq!(parse_cpus("8191"), Ok(vec![8191]));
        assert!(parse_cpus("0-8191,0-8191").unwrap_err().contains("more than"));
    }
}
