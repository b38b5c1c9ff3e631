"""Facts every results/*.json report records about where it ran: the kind
of machine (software emulation or not) and the checkout. Standard library
only; shared by the perf-null, perf-nvme and matrix reports."""

import subprocess


def cmd_out(args, cwd=None):
    """A command's stripped stdout, or None if it could not run or failed."""
    try:
        r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def emulation(cpu_model, hypervisor, in_guest):
    """tcg (QEMU software emulation), kvm (a QEMU/KVM guest), vm (some other
    hypervisor), guest (run through bench-scripts/vm, kind unknown), none.
    Figures from tcg mean little on their own: compare rows of one report."""
    if "TCG" in cpu_model:
        return "tcg"
    if hypervisor and (in_guest or "QEMU" in cpu_model or "KVM" in cpu_model):
        return "kvm"
    if hypervisor:
        return "vm"
    return "guest" if in_guest else "none"


def git_state(root):
    """(short revision or "unknown", dirty: True/False, None if unknown)."""
    rev = cmd_out(["git", "rev-parse", "--short", "HEAD"], cwd=root) or "unknown"
    dirty = cmd_out(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return rev, None if dirty is None else bool(dirty)
