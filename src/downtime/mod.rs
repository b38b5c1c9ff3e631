//! `downtime`: the recovery-downtime run.

use crate::cli::DowntimeArgs;
use crate::error::{Error, Result};

pub fn run(_args: &DowntimeArgs) -> Result<()> {
    Err(Error::invalid("downtime is not built yet"))
}
