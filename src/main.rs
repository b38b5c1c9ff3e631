//! The `ublk-bench` binary: parse, dispatch, report errors.

use clap::Parser;

use ublk_bench::cli::{Cli, Command, ServeArgs};
use ublk_bench::cmd;
use ublk_bench::config::DeviceConfig;
use ublk_bench::daemon::{self, Notifier};
use ublk_bench::error::{Error, Result};
use ublk_bench::process::ProcId;
use ublk_bench::{downtime, serve, supervisor};

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
        Command::Del(d) => cmd::del::run(d.which.id, d.which.all, d.force),
        Command::Recover { id } => cmd::recover::run(id),
        Command::Restart { id } => cmd::restart::run(id),
        Command::Stats { id, json } => cmd::stats::run(id, json),
        Command::Downtime(a) => downtime::run(&a),
        Command::Serve(a) => serve_daemon(a),
        Command::Supervise { config, standby, notify_fd } => {
            daemon::detach();
            // SAFETY: the parent passed us the write end of its pipe as this fd.
            let notify = unsafe { Notifier::from_fd(notify_fd) };
            supervisor::run(&parse_config(&config)?, standby, notify)
        }
    }
}

fn serve_daemon(a: ServeArgs) -> Result<()> {
    daemon::detach();
    // SAFETY: the parent passed us the write end of its pipe as this fd.
    let notify = unsafe { Notifier::from_fd(a.notify_fd) };
    match (a.recover, a.config) {
        (Some(id), _) => {
            let watch = a.watch_pid.zip(a.watch_start).map(|(pid, start)| ProcId { pid, start });
            serve::takeover(id, &a.method, a.crash_seen_ns, watch, None, notify)
        }
        (None, Some(c)) => serve::new_device(parse_config(&c)?, notify, |_| Ok(())),
        (None, None) => Err(Error::invalid("__serve needs --config or --recover")),
    }
}

fn parse_config(json: &str) -> Result<DeviceConfig> {
    serde_json::from_str(json).map_err(|e| Error::invalid(format!("bad --config: {e}")))
}
