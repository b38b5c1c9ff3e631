//! ublk-bench: a ublk server built to be measured.
//!
//! Layers, one module each: `sys` (kernel ABI), `ctrl` (control plane),
//! `queue` (data plane), `backend` (what a request does), `server` (a
//! device's life), `daemon`/`process` (processes), `config`/`settings`
//! (device settings), `stats` (measurement), `cli`/`cmd` (the command line).

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod backend;
pub mod cli;
pub mod clock;
pub mod cmd;
pub mod config;
pub mod ctrl;
pub mod daemon;
pub mod downtime;
pub mod error;
pub mod fault;
pub mod log;
pub mod process;
pub mod queue;
pub mod recovery;
pub mod request;
pub mod run_files;
pub mod serve;
pub mod server;
pub mod stats;
pub mod supervisor;
pub mod sys;
pub mod teardown;
