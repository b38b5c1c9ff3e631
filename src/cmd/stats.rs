//! `stats -n ID`: the server's own per-queue figures.

use crate::error::{Error, Result};

pub fn run(_id: u32, _json: bool) -> Result<()> {
    Err(Error::invalid("stats is not built yet"))
}
