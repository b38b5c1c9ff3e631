//! `features`: what the running kernel's ublk driver supports.

use crate::ctrl::Ctrl;
use crate::error::Result;
use crate::sys;

pub fn run(json: bool) -> Result<()> {
    let f = Ctrl::open()?.features()?;
    let names: Vec<&str> = sys::FEATURES.iter().filter(|(b, _, _)| f & b != 0).map(|(_, n, _)| *n).collect();
    if json {
        let v = serde_json::json!({ "raw": format!("{f:#x}"), "features": names });
        println!("{}", serde_json::to_string_pretty(&v).expect("serializes"));
    } else {
        println!("ublk features {f:#x}");
        for (bit, name, since) in sys::FEATURES {
            let mark = if f & bit != 0 { "yes" } else { "no " };
            println!("  {mark} {name:<24} (Linux {since})");
        }
    }
    Ok(())
}
