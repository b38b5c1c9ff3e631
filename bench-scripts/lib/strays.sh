# shellcheck shell=bash
# Sourced by the bench-scripts that tear ublk devices down: after `del`,
# no ublk-bench process may be left. `ublk-bench del` returns once the
# device's processes have exited, so one still running is a leak; it is
# named, killed (so nothing outlives the run) and the run still fails.

# Every ublk-bench process (by comm, as the harness checks).
ublk_bench_pids() {
	pgrep -x ublk-bench || true
}

# kill_strays WHEN PID...: returns 0 when no PID runs. Otherwise prints
# each one (pid, state, command line) to stderr as an error, sends SIGTERM,
# then SIGKILL to what is left after 2 s, waits up to 5 s for them to go,
# and returns 1. WHEN says at which point they were found ("after del -a").
kill_strays() {
	local when=$1 pid state left=()
	shift
	for pid in "$@"; do
		running "$pid" && left+=("$pid")
	done
	((${#left[@]})) || return 0
	echo "error: ${#left[@]} stray ublk-bench process(es) $when; killing them:" >&2
	for pid in "${left[@]}"; do
		state=$(sed -n 's/^State:[[:space:]]*//p' "/proc/$pid/status" 2>/dev/null)
		printf '  pid %s (%s): %s\n' "$pid" "${state:-gone}" \
			"$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" >&2
	done
	kill -TERM "${left[@]}" 2>/dev/null || true
	wait_gone 20 "${left[@]}" || kill -KILL "${left[@]}" 2>/dev/null || true
	wait_gone 50 "${left[@]}" || echo "error: still there after SIGKILL: ${left[*]}" >&2
	return 1
}

# running PID: the process exists and has not exited (zombies have).
running() {
	local st
	st=$(sed -n 's/^State:[[:space:]]*\(.\).*/\1/p' "/proc/$1/status" 2>/dev/null)
	[[ -n $st && $st != Z ]]
}

# wait_gone TENTHS PID...: true once no PID runs (a zombie counts as gone),
# checked every 0.1 s for TENTHS tenths of a second.
wait_gone() {
	local tenths=$1 pid i alive
	shift
	for ((i = 0; i < tenths; i++)); do
		alive=0
		for pid in "$@"; do
			! running "$pid" || alive=1
		done
		((alive)) || return 0
		sleep 0.1
	done
	return 1
}

# no_stray_servers BIN: for a machine this run owns (our guest): after
# `BIN del -a`, no ublk-bench process may be left. Kills strays, deletes
# whatever devices their death left behind, and returns 1 if there were any.
no_stray_servers() {
	local bin=$1
	local -a pids
	mapfile -t pids < <(ublk_bench_pids)
	kill_strays "after \`ublk-bench del -a\`" "${pids[@]}" && return 0
	timeout 60 "$bin" del -a >/dev/null 2>&1 || true
	return 1
}

# teardown_servers BIN PID...: the end of a benchmark run, after its own
# `del -n`s. In our own guest (UBLK_BENCH_IN_GUEST=1) nothing else uses ublk:
# `BIN del -a` catches a device whose id the run never learnt, and then no
# ublk-bench process at all may be left. Elsewhere only the PIDs (the run's
# own servers) are checked, so other users' servers are left alone.
# Returns 1 when something had to be killed.
teardown_servers() {
	local bin=$1
	shift
	if [[ ${UBLK_BENCH_IN_GUEST:-} == 1 ]]; then
		timeout 60 "$bin" del -a >/dev/null 2>&1 || true
		no_stray_servers "$bin"
	else
		kill_strays "after \`ublk-bench del\`" "$@"
	fi
}
