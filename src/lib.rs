//! ublk-bench: a ublk server built to be measured.
//!
//! Layers, lowest first; a module imports only its own layer or below
//! (`tests/layers.rs` checks it, and that there is no import cycle):
//!
//! 1. `sys` (kernel ABI), with `error`, `clock`, `log`, `fault`;
//! 2. `ctrl` (control plane), `process` (pidfds, signals), `cpus` (the
//!    machine's CPUs, CPU lists), `io_scheduler` (a device's elevator, via sysfs);
//! 3. `config` (the validated device configuration), `integrity` (its
//!    protection-information format), `layout` (which thread serves
//!    which tags, `--threads`), `plan` (what was
//!    asked and what the kernel offers, resolved once), `run_files` (its
//!    files and the others under /run/ublk-bench), `teardown` (deleting a
//!    device with its files and processes);
//! 4. `request` (what a backend is handed);
//! 5. `stats` (measurement);
//! 6. `backend` (one module per backend: its options, copy modes and
//!    parameters, and what a request does; no threads);
//! 7. `queue` (data plane: its thread and setup in `queue`, the loop both
//!    planes share in `queue::run_loop`, the per-tag plane in `queue::per_tag`,
//!    UBLK_F_BATCH_IO's in `queue::batch`);
//! 8. `server` (the running device server: its queues and threads);
//! 9. `recovery` (takeover);
//! 10. `daemonize` (starting a server in the background and waiting for
//!     it), `supervisor` (restarting a crashed server), `server_process` (a
//!     server process's life from start to exit);
//! 11. `cli`, `cmd`, `downtime` (the command line; `downtime` uses only
//!     the control plane, run files, a device's plan, process helpers, and `add` to make
//!     its device).

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod backend;
pub mod cli;
pub mod clock;
pub mod cmd;
pub mod config;
pub mod cpus;
pub mod ctrl;
pub mod daemonize;
pub mod downtime;
pub mod emulate;
pub mod error;
pub mod fault;
pub mod integrity;
pub mod io_scheduler;
pub mod layout;
pub mod log;
pub mod plan;
pub mod process;
pub mod queue;
pub mod recovery;
pub mod request;
pub mod run_files;
pub mod server;
pub mod server_process;
pub mod stats;
pub mod supervisor;
pub mod sys;
pub mod teardown;
