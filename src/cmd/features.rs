//! `features`: what the running kernel's ublk driver supports, and which
//! copy mode each backend gets from `--copy-mode auto`.

use serde_json::json;

use crate::backend;
use crate::config::CopyMode;
use crate::ctrl::Ctrl;
use crate::error::Result;
use crate::fault;
use crate::plan::{self, Transfer};
use crate::sys;

const MODES: [Transfer; 3] = [Transfer::Copy, Transfer::User, Transfer::Zero];

/// (backend, auto's pick, every mode this kernel allows for it)
fn copy_modes(f: u64) -> Vec<(&'static str, &'static str, Vec<&'static str>)> {
    backend::ALL
        .iter()
        .map(|b| {
            let rules = b.copy_rules();
            let auto = plan::resolve(CopyMode::Auto, rules, f).map_or("none", |m| m.name());
            let ok = MODES
                .iter()
                .filter(|&&m| rules.allows(m) && plan::resolve(m.mode(), rules, f).is_ok())
                .map(|m| m.name())
                .collect();
            (b.name(), auto, ok)
        })
        .collect()
}

pub fn run(json: bool) -> Result<()> {
    let f = fault::mask_features(Ctrl::open()?.features()?, fault::from_env()?);
    let batch = f & sys::UBLK_F_BATCH_IO != 0;
    let names = sys::flag_names(f);
    let modes = copy_modes(f);
    if json {
        let copy: serde_json::Map<String, serde_json::Value> = modes
            .iter()
            .map(|(b, auto, ok)| (b.to_string(), json!({ "auto": auto, "available": ok })))
            .collect();
        let v = json!({ "raw": format!("{f:#x}"), "features": names, "copy_modes": copy, "batch": batch });
        println!("{}", serde_json::to_string_pretty(&v).expect("serializes"));
        return Ok(());
    }
    println!("ublk features {f:#x}");
    for (bit, name, since) in sys::FEATURES {
        let mark = if f & bit != 0 { "yes" } else { "no " };
        println!("  {mark} {name:<24} (Linux {since})");
    }
    let known = sys::FEATURES.iter().fold(0, |acc, (bit, _, _)| acc | bit);
    for name in sys::flag_names(f & !known) {
        println!("  yes {name:<24} (not known to this ublk-bench)");
    }
    println!("copy modes (auto picks the first):");
    for (b, auto, ok) in modes {
        println!("  {b:<5} auto={auto:<5} available: {}", ok.join(", "));
    }
    match batch {
        true => println!("batch I/O (add --batch): available, with every backend and copy mode"),
        false => println!("batch I/O (add --batch): not available (needs UBLK_F_BATCH_IO, Linux 7.0)"),
    }
    Ok(())
}
