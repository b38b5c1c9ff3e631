//! The `ublk-bench` binary: parse, dispatch, report errors.

use clap::Parser;

use ublk_bench::cli::{Cli, Command, ServeArgs};
use ublk_bench::cmd;
use ublk_bench::config::DeviceConfig;
use ublk_bench::daemonize::{self, Notifier};
use ublk_bench::error::{Error, Result};
use ublk_bench::process::ProcId;
use ublk_bench::{downtime, server_process, supervisor};

fn main() {
    let cmd = quick_recover(std::env::args()).unwrap_or_else(|| Cli::parse().cmd);
    if let Err(e) = dispatch(cmd) {
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
        Command::Resize { id, size } => cmd::resize::run(id, size),
        Command::Stats { id, json, window } => cmd::stats::run(id, json, window),
        Command::Downtime(a) => downtime::run(&a),
        Command::Serve(a) => serve_daemon(a),
        Command::Supervise { config, standby, notify_fd } => {
            daemonize::detach();
            // SAFETY: the parent passed us the write end of its pipe as this fd.
            let notify = unsafe { Notifier::from_fd(notify_fd) };
            supervisor::run(&parse_config(&config)?, standby, notify)
        }
    }
}

fn serve_daemon(a: ServeArgs) -> Result<()> {
    daemonize::detach();
    // SAFETY: the parent passed us the write end of its pipe as this fd.
    let notify = unsafe { Notifier::from_fd(a.notify_fd) };
    match (a.recover, a.config) {
        (Some(id), _) => {
            let watch = a.watch_pid.zip(a.watch_start).map(|(pid, start)| ProcId { pid, start });
            server_process::takeover(id, &a.method, a.crash_seen_ns, watch, None, notify)
        }
        (None, Some(c)) => server_process::new_device(parse_config(&c)?, notify, |_| Ok(())),
        (None, None) => Err(Error::invalid("__serve needs --config or --recover")),
    }
}

/// `recover -n ID` exactly, parsed without building the whole command
/// line parser: it runs right after a crash while the client waits, and
/// under emulation clap's set-up is a measurable part of a process start.
/// Any other form (and any bad id) goes to clap, which has the messages.
fn quick_recover(args: impl Iterator<Item = String>) -> Option<Command> {
    let args: Vec<String> = args.skip(1).collect();
    match args.as_slice() {
        [cmd, flag, id] if cmd == "recover" && (flag == "-n" || flag == "--number") => {
            Some(Command::Recover { id: id.parse().ok()? })
        }
        _ => None,
    }
}

fn parse_config(json: &str) -> Result<DeviceConfig> {
    serde_json::from_str(json).map_err(|e| Error::invalid(format!("bad --config: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick(argv: &[&str]) -> Option<u32> {
        match quick_recover(argv.iter().map(|s| s.to_string()))? {
            Command::Recover { id } => Some(id),
            _ => None,
        }
    }

    fn clap_id(argv: &[&str]) -> Option<u32> {
        match Cli::try_parse_from(argv).ok()?.cmd {
            Command::Recover { id } => Some(id),
            _ => None,
        }
    }

    #[test]
    fn quick_recover_agrees_with_clap_or_leaves_it_to_clap() {
        let cases: [&[&str]; 9] = [
            &["ublk-bench", "recover", "-n", "3"],
            &["ublk-bench", "recover", "--number", "12"],
            &["ublk-bench", "recover", "-n", "-1"],
            &["ublk-bench", "recover", "-n", "x"],
            &["ublk-bench", "recover", "-n3"],
            &["ublk-bench", "recover", "--number=4"],
            &["ublk-bench", "recover", "-n", "3", "extra"],
            &["ublk-bench", "restart", "-n", "3"],
            &["ublk-bench", "recover"],
        ];
        // Whatever the quick path takes, clap would have read the same way.
        for argv in cases {
            if let Some(id) = quick(argv) {
                assert_eq!(Some(id), clap_id(argv), "{argv:?}");
            }
        }
        assert_eq!(quick(&["ublk-bench", "recover", "-n", "3"]), Some(3));
        assert_eq!(quick(&["ublk-bench", "recover", "--number", "12"]), Some(12));
        assert_eq!(quick(&["ublk-bench", "recover", "-n", "x"]), None, "a bad id is clap's to refuse");
    }
}
