# shellcheck shell=bash
# The bench runner's shell core: perf-null, perf-nvme and matrix are presets
# of it (what to measure, which report module writes the JSON). It holds what
# they used to repeat: messages and usage errors, the common options, the
# host build, entry into the guest, a fio run that cleanup can stop, adding a
# ublk device and deleting it, and the teardown every run ends with.
# Sourced, not run; the preset sets NAME and ROOT and defines usage() first.
# It also needs lib/strays.sh (teardown_servers).

RUNTIME=10
RAMP=2
BUILD=1
NOTE=""
RESULTS=$ROOT/results
FIO_PID=""     # the fio run in progress, stopped by bench_teardown
DEVS=()        # ublk device ids we created and have not deleted
SERVER_PIDS=() # their server processes
FAILED=0
DEV_WAIT_TENTHS=100 # how long bench_add waits for the block device to appear

log() { printf '%s: %s\n' "$NAME" "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}
usage_error() {
	log "$*"
	usage >&2
	exit 2
}

# bench_option "$@": when the first argument is a common option (--runtime,
# --ramp, --results, --note, each also as --opt=V; --no-build; -h/--help),
# applies it, sets SHIFT to the number of arguments it used and returns 0;
# otherwise returns 1. The preset's own loop handles the rest.
bench_option() {
	local value=""
	SHIFT=1
	case $1 in
	--runtime | --ramp | --results | --note)
		[[ $# -ge 2 ]] || usage_error "$1 needs a value"
		value=$2
		SHIFT=2 ;;
	--runtime=* | --ramp=* | --results=* | --note=*) value=${1#*=} ;;
	--no-build) BUILD=0; return 0 ;;
	-h | --help) usage; exit 0 ;;
	*) return 1 ;;
	esac
	case ${1%%=*} in
	--runtime) RUNTIME=$value ;;
	--ramp) RAMP=$value ;;
	--results) RESULTS=$value ;;
	--note) NOTE=$value ;;
	esac
}

# Checks the common options once the preset's loop is done.
bench_check_options() {
	[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || usage_error "--runtime wants whole seconds >= 1"
	[[ $RAMP =~ ^[0-9]+$ ]] || usage_error "--ramp wants whole seconds"
	RESULTS=$(realpath -m -- "$RESULTS")
}

# cargo build --release on the host, unless --no-build or UBLK_BENCH_BIN.
bench_build() {
	[[ $BUILD == 1 && -z ${UBLK_BENCH_BIN:-} ]] || return 0
	command -v cargo >/dev/null || die "cargo not found: build with 'cargo build --release' or pass --no-build"
	log "cargo build --release"
	(cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
}

# bench_in_guest TIMEOUT CMD...: CMD in the guest (bench-scripts/vm --auto)
# with UBLK_BENCH_IN_GUEST=1; returns its status (124/125: guest timeout or
# failure). stderr goes through a pipe: given a regular file (`matrix >log
# 2>&1`), QEMU would reopen it in append mode and stdout would overwrite it.
bench_in_guest() {
	local timeout=$1 rc=0
	shift
	cd "$ROOT" # the vm script shares the git top level of the cwd
	UBLK_BENCH_IN_GUEST=1 "$ROOT/bench-scripts/vm" --auto --timeout "$timeout" -- "$@" 2> >(cat >&2) || rc=$?
	# Let the stderr copy drain ($! is its pid where bash sets it).
	if [[ -n ${!:-} ]]; then wait "$!" 2>/dev/null || true; fi
	return "$rc"
}

# The gist of a failed command's stderr: no backtrace frames, at most 3 lines.
gist() {
	grep -v -e '^[[:space:]]*$' -e '^[[:space:]]*[0-9]*: ' -e '^[[:space:]]*at ' \
		-e '^stack backtrace:' -e '^note: ' -- "$1" 2>/dev/null | head -n 3 | tr '\n' ' ' || true
}

# bench_fio SECS ERR_FILE FIO-COMMAND...: runs the command (taskset, fio and
# its arguments) under `timeout SECS`, in the background so that cleanup can
# stop it; stderr to ERR_FILE. Returns its status; FIO_ERR says why.
bench_fio() {
	local secs=$1 err=$2 rc=0
	shift 2
	timeout -k 10 "$secs" "$@" 2>"$err" &
	FIO_PID=$!
	wait "$FIO_PID" || rc=$?
	FIO_PID=""
	FIO_ERR=""
	if [[ $rc != 0 ]]; then FIO_ERR="fio exit $rc: $(gist "$err")"; fi
	return "$rc"
}

# bench_add OUT ERR ADD-ARGS...: `ublk-bench add ADD-ARGS` (stdout to OUT,
# stderr to ERR), then waits for its block device. Sets DEV_ID, DEV (the
# /dev/ublkbN path) and records the device and its server for teardown.
# Returns 1 (ADD_ERR says why) when add failed, 2 when the output had no
# device id, 3 when the block device did not appear (DEV_WAIT_TENTHS).
bench_add() {
	local out=$1 err=$2 text pid i
	shift 2
	DEV_ID="" DEV="" ADD_ERR=""
	if ! timeout 150 "$BIN" add "$@" >"$out" 2>"$err"; then
		ADD_ERR="ublk-bench add $* failed: $(gist "$err")"
		return 1
	fi
	text=$(tr -d ' \n' <"$out")
	DEV_ID=$(sed -n 's/.*"dev_id":\([0-9][0-9]*\).*/\1/p; s/^devid\([0-9][0-9]*\):.*/\1/p' <<<"$text" | head -n 1)
	if [[ -z $DEV_ID ]]; then
		ADD_ERR="no device id in the add output: $(head -c 200 "$out")"
		return 2
	fi
	DEVS+=("$DEV_ID")
	DEV=/dev/ublkb$DEV_ID
	pid=$(bench_server_pid "$out")
	if [[ $pid =~ ^[1-9][0-9]*$ ]]; then SERVER_PIDS+=("$pid"); fi
	for ((i = 0; i < DEV_WAIT_TENTHS; i++)); do [[ -b $DEV ]] && break; sleep 0.1; done
	if [[ ! -b $DEV ]]; then
		ADD_ERR="$DEV did not appear within $((DEV_WAIT_TENTHS / 10))s"
		return 3
	fi
}

# The server's pid from `add --json` or `list --json` output; empty if none.
bench_server_pid() {
	tr -d ' \n' <"$1" | sed -n 's/.*"pid":\([0-9][0-9]*\).*/\1/p' | head -n 1
}

# bench_del ID ERR: deletes our device; a device that will not go away fails
# the run (the figures taken on it stand).
bench_del() {
	local id=$1 err=$2 d keep=()
	if ! timeout 60 "$BIN" del -n "$id" >/dev/null 2>"$err"; then
		FAILED=1
		log "ublk-bench del -n $id failed: $(gist "$err")"
		return 1
	fi
	for d in "${DEVS[@]}"; do [[ $d == "$id" ]] || keep+=("$d"); done
	DEVS=("${keep[@]}")
}

# bench_teardown RC: stops fio, deletes our devices, makes sure their
# servers are gone (teardown_servers: in our own guest `del -a`, then no
# ublk-bench process may be left). Sets EXIT_RC, the status to exit with:
# RC, or 1 when a server outlived its device.
bench_teardown() {
	local rc=$1 id
	if [[ -n $FIO_PID ]] && kill -0 "$FIO_PID" 2>/dev/null; then
		kill -TERM "$FIO_PID" 2>/dev/null || true
		wait "$FIO_PID" 2>/dev/null || true
	fi
	for id in "${DEVS[@]}"; do
		timeout 60 "$BIN" del -n "$id" >/dev/null 2>&1 || true
	done
	if ! teardown_servers "$BIN" "${SERVER_PIDS[@]}"; then
		log "error: ublk-bench processes outlived their devices (listed above; killed)"
		((rc)) || rc=1
	fi
	EXIT_RC=$rc
}

# The usual traps: TEARDOWN (a function name) on exit, and signals exit
# with 128 + their number so that it runs.
bench_traps() {
	# shellcheck disable=SC2064 # the function name is fixed now
	trap "$1" EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	trap 'exit 129' HUP
}
