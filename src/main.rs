//! The `ublk-bench` binary: parse, dispatch, report errors.

use clap::Parser;

use ublk_bench::cli::{Cli, Command};
use ublk_bench::cmd;
use ublk_bench::daemon::{self, Notifier};
use ublk_bench::error::{Error, Result};

fn main() {
    let cli = Cli::parse();
    if let Err(e) = dispatch(cli.cmd) {
        eprintln!("ublk-bench: error: {e}");
        std::process::exit(1);
    }
}

fn dispatch(cmd: Command) -> Result<()> {
    match cmd {
        Command::Features { json } => cmd::features::run(json),
        Command::Add(args) => cmd::add::run(&args),
        Command::List { id, json } => cmd::list::run(id, json),
        Command::Del(d) => cmd::del::run(d.id, d.all),
        Command::Serve { config, notify_fd } => serve_daemon(&config, notify_fd),
    }
}

fn serve_daemon(config: &str, notify_fd: i32) -> Result<()> {
    daemon::detach();
    let cfg = serde_json::from_str(config).map_err(|e| Error::invalid(format!("bad --config: {e}")))?;
    // SAFETY: the parent passed us the write end of its pipe as this fd.
    let notify = unsafe { Notifier::from_fd(notify_fd) };
    cmd::add::serve(cfg, notify, None)
}
