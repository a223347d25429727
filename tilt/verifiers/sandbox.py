"""Run untrusted, model-written Python in a sandbox; the calling process survives anything it does.

One program runs as PID 1's child in fresh Linux namespaces (``unshare``; see ``_jail.py``):

| threat | mechanism |
|---|---|
| network | new network namespace (``unshare --net``): only a down loopback, every connect fails |
| writes outside scratch | private mount namespace, every mount remounted read-only, scratch bound read-write |
| devices, other samples | a fresh /dev with only null/zero/full/random/urandom; an empty tmpfs over scratch's parent ($TMPDIR/tilt-sandboxes, holding only sandboxes) |
| parent's environment | scrubbed ``env``; new PID namespace + fresh ``/proc``, so no ``/proc/<ppid>/environ`` |
| killing its parent | new PID namespace: the caller's PID is not visible; all capabilities dropped |
| fork bombs | a pids cgroup with ``pids.max`` (root is exempt from RLIMIT_NPROC; RLIMIT_NPROC set too) |
| memory | RLIMIT_AS |
| CPU loops | RLIMIT_CPU (SIGKILL one second past it) and a wall-clock limit enforced by the caller |
| disk / output flood | scratch is a size-limited tmpfs (``scratch_mb``); RLIMIT_FSIZE on every file, stdout/stderr included |

Needs root (or CAP_SYS_ADMIN) and ``unshare`` from util-linux; ``check_sandbox()`` says why not.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tilt.config import ConfigError

JAIL = Path(__file__).with_name("_jail.py")
SETUP_CODES = {120: "joining the pids cgroup", 121: "making the filesystem read-only", 122: "exec"}


class SandboxLimits(BaseModel):
    """Limits of one sandboxed run. Integers must be integers: a string or float is a ConfigError."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    wall_s: float = Field(5.0, gt=0)
    """Wall-clock seconds before the whole namespace is killed (measured by the caller)."""
    cpu_s: int = Field(2, ge=1)
    """CPU seconds (RLIMIT_CPU); the kernel sends SIGKILL one second later."""
    memory_mb: int = Field(512, ge=32)
    """Address-space limit in MiB (RLIMIT_AS)."""
    max_procs: int = Field(16, ge=1)
    """Processes (and threads) the program may have at once (pids cgroup pids.max, RLIMIT_NPROC)."""
    max_file_mb: int = Field(16, ge=1)
    """Largest file the program may write, stdout and stderr included, in MiB (RLIMIT_FSIZE)."""
    scratch_mb: int = Field(64, ge=1)
    """Size of the program's scratch directory, a tmpfs in MiB: all it may write, in memory, never on disk."""


def make_limits(limits: Optional[dict[str, Any] | SandboxLimits] = None) -> SandboxLimits:
    """Validated limits; a wrong key, type or range is a ConfigError naming the field."""
    if isinstance(limits, SandboxLimits):
        return limits
    try:
        return SandboxLimits(**(limits or {}))
    except ValidationError as exc:
        errs = "; ".join(dict.fromkeys(f"sandbox limit {e['loc'][0]}={e.get('input')!r}: {e['msg']}"
                                       for e in exc.errors()))
        fields = ", ".join(f"{k} ({v.annotation.__name__})" for k, v in SandboxLimits.model_fields.items())
        raise ConfigError(f"{errs}. Allowed limits: {fields}") from None
    except TypeError as exc:
        raise ConfigError(f"sandbox limits must be a mapping of name -> number, got {limits!r}") from exc


@dataclass
class RunResult:
    """What one sandboxed program did."""

    status: str  # "ok" | "error" (nonzero exit) | "timeout" (wall clock) | "killed" (signal)
    returncode: int
    stdout: str
    stderr: str


def check_sandbox() -> None:
    """Raise RuntimeError naming what is missing if sandboxing cannot work on this machine."""
    if not sys.platform.startswith("linux"):
        raise RuntimeError("code_exec's sandbox needs Linux namespaces")
    if shutil.which("unshare") is None:
        raise RuntimeError("code_exec's sandbox needs the `unshare` command (util-linux)")
    if os.geteuid() != 0:
        raise RuntimeError("code_exec's sandbox needs root to create mount/network/PID namespaces "
                           "and a pids cgroup; run the trainer as root (e.g. in a container)")
    if _pids_cgroup_root() is None:
        raise RuntimeError("code_exec's sandbox needs a writable pids cgroup (cgroup v1 'pids' or "
                           "cgroup v2 with the pids controller) to bound the number of processes")


def _pids_cgroup_root() -> Optional[Path]:
    """Writable directory under which a child cgroup with ``pids.max`` can be made, or None."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            fstype, opts, mp = parts[parts.index("-") + 1], parts[-1].split(","), Path(parts[4])
            v1 = fstype == "cgroup" and "pids" in opts
            v2 = fstype == "cgroup2" and "pids" in _read(mp / "cgroup.subtree_control", 4096).split()
            if (v1 or v2) and os.access(mp, os.W_OK):
                return mp
    return None


def scratch_root() -> Path:
    """The directory holding every sandbox's scratch directory and nothing else. The jail covers it
    with an empty read-only tmpfs (so a program sees no other sample's scratch); it must not be an
    ancestor of the interpreter or of tilt itself, which a checkout under /tmp would be if the
    scratch directories sat directly in /tmp."""
    root = Path(tempfile.gettempdir()) / "tilt-sandboxes"
    root.mkdir(mode=0o700, exist_ok=True)
    return root


def _sweep_orphans(root: Path) -> None:
    """Remove the cgroups and scratch directories of sandboxes whose calling process has died
    (killed before its ``finally`` ran); their names carry the caller's PID."""
    for d in [*root.glob("tilt-sandbox-*-*"), *scratch_root().glob("tilt-sandbox-*-*")]:
        try:
            owner = int(d.name.split("-")[2])
            os.kill(owner, 0)
        except ProcessLookupError:
            if d.parent == root:
                _remove_cgroup(d)
            else:
                shutil.rmtree(d, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def _make_cgroup(max_procs: int) -> Path:
    root = _pids_cgroup_root()
    _sweep_orphans(root)  # type: ignore[arg-type]
    cg = root / f"tilt-sandbox-{os.getpid()}-{uuid.uuid4().hex[:12]}"  # type: ignore[operator]
    cg.mkdir()
    (cg / "pids.max").write_text(str(max_procs))
    return cg


def _remove_cgroup(cg: Path) -> None:
    """Kill whatever is left in the cgroup, then remove it."""
    for _ in range(50):
        try:
            pids = [int(p) for p in (cg / "cgroup.procs").read_text().split()]
        except OSError:
            return
        if not pids:
            break
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    try:
        cg.rmdir()
    except OSError:
        pass


def run_python(program: str, *, stdin: str = "", limits: Optional[dict | SandboxLimits] = None,
               max_output: int = 1 << 16) -> RunResult:
    """Run ``program`` (Python source) in a fresh sandbox; never raises for anything the program does.

    Args:
        program: the source to run as ``program.py`` in a fresh scratch directory.
        stdin: text on the program's standard input.
        limits: SandboxLimits or a dict of its fields (validated: wrong type -> ConfigError).
        max_output: characters of stdout / stderr kept.
    Returns:
        RunResult with status "ok" only for exit status 0 within the limits.
    """
    lim = make_limits(limits)
    check_sandbox()
    cg = _make_cgroup(lim.max_procs)
    scratch = Path(tempfile.mkdtemp(prefix=f"tilt-sandbox-{os.getpid()}-", dir=scratch_root()))
    try:
        (scratch / "program.py").write_text(program)
        (scratch / "stdin.txt").write_text(stdin)
        spec = {"scratch": str(scratch), "python": sys.executable, "limits": lim.model_dump(),
                "cgroup_procs": str(cg / "cgroup.procs")}
        cmd = ["unshare", "--pid", "--net", "--mount", "--ipc", "--uts", "--fork", "--kill-child",
               "--mount-proc", sys.executable, "-I", "-S", str(JAIL), json.dumps(spec)]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True, env={"PATH": "/usr/bin:/bin"})
        try:
            _, err = proc.communicate(timeout=lim.wall_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # unshare dies -> --kill-child kills PID 1 -> the namespace
            _, err = proc.communicate()
            timed_out = True
        rc = proc.returncode
        if rc in SETUP_CODES and not timed_out and err:
            raise RuntimeError(f"sandbox setup failed while {SETUP_CODES[rc]}: {err.decode(errors='replace')}")
        out = _read(scratch / "stdout.txt", max_output)
        stderr = _read(scratch / "stderr.txt", max_output)
        status = "timeout" if timed_out else "ok" if rc == 0 else "killed" if rc >= 128 else "error"
        return RunResult(status, rc, out, stderr)
    finally:
        _remove_cgroup(cg)
        shutil.rmtree(scratch, ignore_errors=True)


def _read(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(n).decode(errors="replace")
    except OSError:
        return ""
