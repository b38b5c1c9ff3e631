# shellcheck shell=bash
# Sourced by the benchmark scripts: every device a comparison measures runs
# under one I/O scheduler, BENCH_SCHEDULER (UBLK_BENCH_SCHEDULER, default
# none). `ublk-bench add` itself puts its devices on none (--scheduler);
# the scripts still force one scheduler on every device they compare, the
# kernel's own and other servers' included (perf-null's default round
# records each device's own instead).
#
# Why: the kernel gives a block device with one hardware queue mq-deadline
# and a multi-queue one none. A 1-queue ublk device would otherwise be
# compared with null_blk (2 submit queues) and NVMe through a different
# scheduler. Measured in one guest boot (Linux 7.3.4, TCG, fio 4k randread
# qd32, fio on CPU 0, queue on CPU 1): ublk null --poll reached 0.29-0.36 of
# null_blk under mq-deadline and 0.58 under none; with mq-deadline, kblockd
# dispatch work and its context switches took a quarter of fio's CPU.
BENCH_SCHEDULER=${UBLK_BENCH_SCHEDULER:-none}

# use_scheduler DEV [keep]: puts DEV (/dev/NAME) under BENCH_SCHEDULER where
# the kernel allows it (with keep: leaves it as it is) and prints the
# scheduler now active ("n/a" without one).
use_scheduler() {
	local f=/sys/block/${1#/dev/}/queue/scheduler
	if [[ ! -e $f ]]; then
		echo n/a
		return 0
	fi
	if [[ ${2:-} != keep ]]; then echo "$BENCH_SCHEDULER" 2>/dev/null >"$f" || true; fi
	sed -n 's/.*\[\(.*\)\].*/\1/p' "$f"
}
