//! One module per subcommand; each takes parsed arguments and returns a
//! process exit status through `Result`.

pub mod add;
pub mod del;
pub mod features;
pub mod list;
pub mod recover;
pub mod resize;
pub mod restart;
pub mod stats;
