# shellcheck shell=bash
# What a script that re-runs itself in the guest (bench-scripts/vm) may
# write there: the guest sees the host's root read-only and only the
# project's checkout writable.

# writable_in_guest ROOT PATH OPTION: fails with a message that says what
# to do when PATH (absolute) is outside the checkout ROOT.
writable_in_guest() {
	local root path=$2
	root=$(cd "$1" && pwd -P)
	case $path/ in
	"$root"/*) return 0 ;;
	esac
	echo "error: $3 $path is outside the checkout $root, and the guest can write only there:" \
		"give a folder under it (and copy the result out afterwards)," \
		"or run on a machine with ublk_drv loaded" >&2
	return 2
}
