//! `del`: delete one device or all of them, each with its processes and
//! files (see `teardown`). A device that is open is refused unless
//! `--force`; `-a` applies that rule to each device and reports each.
//!
//! Ctrl-C (or SIGTERM) while the kernel waits in DEL_DEV for the last user
//! of `/dev/ublkcN` cancels that wait (see `Ctrl::cancel_when`): `del` then says so and exits
//! non-zero with the device's settings and store kept, instead of dying.

use crate::ctrl::{self, Ctrl};
use crate::error::{Error, Result};
use crate::{process, teardown};

pub fn run(id: Option<u32>, all: bool, force: bool) -> Result<()> {
    let mut ctrl = Ctrl::open()?;
    process::catch_interrupts();
    ctrl.cancel_when(&process::INTERRUPTED);
    let Some(id) = id.filter(|_| !all) else { return del_all(&mut ctrl, force) };
    teardown::delete(&mut ctrl, id, force)
}

fn del_all(ctrl: &mut Ctrl, force: bool) -> Result<()> {
    let mut failed = 0;
    for id in ctrl::device_ids(ctrl)? {
        if process::interrupted() {
            eprintln!("ublk-bench: del -a interrupted before device {id}");
            failed += 1;
            break;
        }
        match teardown::delete(ctrl, id, force) {
            Ok(()) => eprintln!("ublk-bench: deleted device {id}"),
            Err(e) => {
                eprintln!("ublk-bench: device {id} not deleted: {e}");
                failed += 1;
            }
        }
    }
    match failed {
        0 => Ok(()),
        n => Err(Error::Refused(format!("{n} device(s) not deleted (see above)"))),
    }
}
