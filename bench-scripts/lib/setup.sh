# Shared set-up for bench-scripts: install what a fresh Debian machine lacks.
# Sourced, not run.

# Installs the host packages the guest harness and fio runs need, once.
ensure_host_packages() {
	local need=()
	command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
	command -v fio >/dev/null || need+=(fio)
	[[ -x /bin/busybox ]] && file -L /bin/busybox 2>/dev/null | grep -q static || need+=(busybox-static)
	command -v cpio >/dev/null || need+=(cpio)
	command -v depmod >/dev/null || need+=(kmod)
	command -v xz >/dev/null || need+=(xz-utils)
	command -v blkdiscard >/dev/null || need+=(util-linux)
	command -v file >/dev/null || need+=(file)
	((${#need[@]} == 0)) && return 0
	echo "setup: installing ${need[*]}" >&2
	apt-get update -qq >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
}

# Builds the release binary on the host (never inside the guest).
build_release() {
	cargo build --release --quiet
}
