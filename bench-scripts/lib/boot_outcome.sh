# shellcheck shell=bash
# Sourced by bench-scripts/vm: what one QEMU run of the guest came to, from
# what it left behind. Kept apart so that bench-scripts/lib/test_boot_outcome.py
# can check the decision on sample console logs without booting anything.

# The guest init's own error lines (fail() in vm's guest_init writes them to
# /dev/kmsg, so they reach the console log).
readonly INIT_ERROR_RE='vm-init: error: '
# What a kernel panic or oops leaves on the console. Under TCG a boot now and
# then dies of an int3 oops in text patching ("Oops: int3: ...").
readonly PANIC_RE='Kernel panic - not syncing|Oops: |BUG: |general protection fault|---\[ end trace'

# boot_outcome QEMU_STATUS STATUS_FILE STARTED_FILE CONSOLE_LOG prints one of:
#   status        CMD ran and left its exit status
#   timeout       --timeout expired (QEMU_STATUS 124)
#   died-after-start  CMD had started (STARTED_FILE exists) but left no status:
#                 a panic or a hang under CMD; not retried, it may be ours
#   init-failed   the guest init reported an error before CMD (a module that
#                 did not load, a share that did not mount)
#   boot-panic    no status, no start mark, a panic/oops on the console: the
#                 kernel died while booting; worth another boot
#   boot-failed   none of these: the guest stopped before CMD, cause unknown
boot_outcome() {
	local qrc=$1 status=$2 started=$3 console=$4
	if [[ -s $status ]]; then
		echo status
	elif [[ $qrc == 124 ]]; then
		echo timeout
	elif [[ -e $started ]]; then
		echo died-after-start
	elif grep -qE "$INIT_ERROR_RE" "$console" 2>/dev/null; then
		echo init-failed
	elif grep -qE "$PANIC_RE" "$console" 2>/dev/null; then
		echo boot-panic
	else
		echo boot-failed
	fi
}
