"""In-namespace launcher for one sandboxed Python program (stdlib only; run as ``python -I -S``).

``tilt.verifiers.sandbox`` starts this file as PID 1 of fresh PID, network, mount and IPC
namespaces (``unshare --pid --net --mount --ipc --fork --kill-child``). As PID 1 it:

1. joins the pids cgroup the caller prepared (``pids.max`` bounds the number of processes; a
   root-owned process is exempt from RLIMIT_NPROC, a cgroup is not);
2. remounts every mount of its private mount namespace read-only, puts a fresh read-only /dev with
   only null/zero/full/random/urandom over /dev and an empty read-only tmpfs over scratch's parent
   (hiding other sandboxes), then binds the scratch directory back in read-write, so scratch is
   the only writable (and the only visible temporary) place even for uid 0;
3. covers scratch with a size-limited tmpfs holding program.py (writes never reach the disk), and
   forks the program with stdin/stdout/stderr on files in the real scratch, the rlimits set
   (CPU, address space, processes, file size, open files, no core), every capability dropped
   from the bounding set, ``no_new_privs`` set and a scrubbed environment; then
4. waits for it (reaping any orphans) and exits with its status. When PID 1 exits the kernel
   kills everything left in the namespace, so forked children cannot outlive the sample.

Argument: one JSON object (see ``sandbox._jail_spec``). Exit status 120-123 mark setup failures.
"""
import ctypes
import json
import os
import resource
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
SETUP_CGROUP, SETUP_MOUNT, SETUP_EXEC = 120, 121, 122

libc = ctypes.CDLL(None, use_errno=True)


def _mount(src, target, flags, fstype=None, data=None):
    if libc.mount(src, target.encode(), fstype, ctypes.c_ulong(flags), data) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")


def _mount_points():
    """Mount points of this namespace with their per-mount flags (from /proc/self/mountinfo)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            target = parts[4].encode().decode("unicode_escape")  # "\040" -> " "
            opts = parts[5].split(",")
            extra = (MS_NOSUID if "nosuid" in opts else 0) | (MS_NODEV if "nodev" in opts else 0) \
                | (MS_NOEXEC if "noexec" in opts else 0)
            out.append((target, extra))
    return out


def make_read_only(scratch):
    """Every mount read-only, then scratch bound read-write over itself (the only writable place)."""
    _mount(None, "/", MS_REC | MS_PRIVATE)  # nothing propagates back to the parent namespace
    for target, extra in _mount_points():
        try:
            _mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY | extra)
        except OSError:
            if os.path.exists(target) and os.access(target, os.W_OK):
                raise
    minimal_dev()
    if not hide_siblings(scratch):
        _mount(scratch.encode(), scratch, MS_BIND)
    # a bind copies the read-only flag of its source, so remount it read-write
    _mount(None, scratch, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)


def hide_siblings(scratch):
    """An empty read-only tmpfs over scratch's parent (e.g. /tmp) with only scratch bound back in:
    other sandboxes' scratch directories and the host's temporary files are out of sight."""
    parent = os.path.dirname(scratch.rstrip("/"))
    if parent in ("", "/"):
        return False
    fd = os.open(scratch, os.O_PATH)
    _mount(b"tmpfs", parent, MS_NOSUID | MS_NODEV | MS_NOEXEC, b"tmpfs", b"mode=755,size=64k")
    os.mkdir(scratch)
    _mount(f"/proc/self/fd/{fd}".encode(), scratch, MS_BIND)
    os.close(fd)
    _mount(None, parent, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    return True


def minimal_dev():
    """A fresh read-only /dev with only null, zero, full, random and urandom (bound from the host's
    nodes), so no disk, console or other device node is reachable from the program."""
    keep = ("null", "zero", "full", "random", "urandom")
    fds = {n: os.open(f"/dev/{n}", os.O_PATH) for n in keep}
    _mount(b"tmpfs", "/dev", MS_NOSUID | MS_NOEXEC, b"tmpfs", b"mode=755,size=64k")
    for n, fd in fds.items():
        open(f"/dev/{n}", "w").close()
        _mount(f"/proc/self/fd/{fd}".encode(), f"/dev/{n}", MS_BIND)
        os.close(fd)
    for i, n in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"/dev/{n}")
    os.symlink("/proc/self/fd", "/dev/fd")
    _mount(None, "/dev", MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)


def drop_privileges():
    """Empty capability bounding set + no_new_privs: after execve even uid 0 has no capabilities."""
    last = int(open("/proc/sys/kernel/cap_last_cap").read())
    for cap in range(last + 1):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def set_limits(lim):
    """RLIMIT_CPU (SIGKILL one second past the soft limit), AS, NPROC, FSIZE, NOFILE, CORE."""
    cpu = lim["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = lim["memory_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_NPROC, (lim["max_procs"], lim["max_procs"]))
    fsize = lim["max_file_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def open_io(scratch):
    """stdin/stdout/stderr files in the caller's scratch directory, opened before the tmpfs covers it."""
    join = os.path.join
    return (os.open(join(scratch, "stdin.txt"), os.O_RDONLY),
            os.open(join(scratch, "stdout.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
            os.open(join(scratch, "stderr.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))


def private_scratch(scratch, size_mb, program):
    """A size-limited tmpfs over scratch holding program.py: the program's writes use RAM that
    vanishes with the namespace, at most ``size_mb`` of it, and never reach the disk."""
    _mount(b"tmpfs", scratch, MS_NOSUID | MS_NODEV, b"tmpfs", f"mode=700,size={size_mb}m".encode())
    with open(os.path.join(scratch, "program.py"), "wb") as f:
        f.write(program)


def child(spec, io):
    scratch = spec["scratch"]
    os.chdir(scratch)
    for src, dst in zip(io, (0, 1, 2)):
        os.dup2(src, dst)
    os.closerange(3, 1 << 16)
    os.setsid()
    drop_privileges()
    set_limits(spec["limits"])
    env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
    os.execve(spec["python"], [spec["python"], "-I", "-S", "program.py"], env)


def main():
    spec = json.loads(sys.argv[1])
    try:
        if spec["cgroup_procs"]:
            with open(spec["cgroup_procs"], "w") as f:
                f.write("0")
    except OSError as exc:
        print(f"sandbox setup: cannot join the pids cgroup: {exc}", file=sys.stderr)
        os._exit(SETUP_CGROUP)
    try:
        with open(os.path.join(spec["scratch"], "program.py"), "rb") as f:
            program = f.read()
        make_read_only(spec["scratch"])
        io = open_io(spec["scratch"])  # after: a mount with files open for writing cannot turn read-only
        private_scratch(spec["scratch"], spec["limits"]["scratch_mb"], program)
    except OSError as exc:
        print(f"sandbox setup: cannot make the filesystem read-only: {exc}", file=sys.stderr)
        os._exit(SETUP_MOUNT)
    pid = os.fork()
    if pid == 0:
        try:
            child(spec, io)
        except BaseException as exc:  # noqa: BLE001 - report, never return into PID 1's loop
            os.write(2, f"sandbox setup: {type(exc).__name__}: {exc}\n".encode())
        os._exit(SETUP_EXEC)
    while True:  # PID 1 reaps every orphan; the program's own status is what we report
        got, status = os.wait()
        if got == pid:
            break
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
