"""Reward calls in worker processes: a call past its timeout is killed, not abandoned.

A thread cannot be stopped in Python: a reward function that spins past its timeout keeps
running (and, holding the GIL, slows the trainer) for as long as it likes. Here each call runs in
a separate worker process (``python -m tilt.reward_pool``), so:

- a call past ``timeout`` seconds has its worker SIGKILLed and replaced; the caller scores it 0;
- a crash of the function (``sys.exit``, ``os._exit``, a segfault) ends only the worker: the
  call is reported as ``crash``, the worker is replaced;
- ``os.chdir``, globals or ``sys.modules`` changes made by a function never reach the trainer
  (the worker also returns to its start directory after every call).

A function is loaded into a worker (its module imported: torch, say) before its first call there,
within STARTUP_TIMEOUT_S; that load never counts against the call's timeout. Functions travel to
the worker pickled once per worker with ``cloudpickle``: module-level
functions by reference (the worker imports them with the trainer's ``sys.path``), closures,
lambdas and functions of a ``__main__`` script by value (what they capture is sent once per
worker: later changes to captured objects in the trainer are not seen). A function that cannot be pickled or
cannot be loaded in the worker (it captures a lock, an open file, ...) runs in the trainer
process in a daemon thread as before, with a one-time ``RuntimeWarning`` naming it: a timeout
is then abandoned, not killed. A function may ask for that on purpose by setting the attribute
``fn.tilt_in_process = True`` (a reward model that must share the trainer's GPU, say).

Per-call overhead (one idle worker, a 32-completion batch, trivial function): about 0.05 ms
(measured: 300 calls, against 0.0002 ms in-process); starting or replacing a worker: about
0.1-0.2 s, overlapped with training because the replacement is started at once, and never
counted against a call's timeout.

Keyword arguments that keep a ``logged`` dict (``tilt.rewards.RewardState``, whose ``log_metric``
a TRL-style reward may call) come back with the result: what the call logged in the worker joins
the trainer's copy.

Results are strict (``as_reals``): the function must return a sequence of real numbers (list,
tuple, or a 1-D numpy array / torch tensor). ``None`` entries mean "no reward" and become NaN.
Dicts, strings, bools and nested lists are an error naming the type.
"""
from __future__ import annotations

import atexit
import numbers
import os
import pickle
import signal
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Optional

IN_PROCESS = "tilt_in_process"  # fn.tilt_in_process = True: run in the trainer's process (e.g. it shares a GPU model)
STARTUP_TIMEOUT_S = 120.0  # a worker that has not said "ready" by then is a failure of the machine, not the function


@dataclass
class CallResult:
    """One call's outcome: ``kind`` is ok, error (it raised), bad_result (not real numbers), timeout or crash."""

    kind: str
    values: Optional[list[float]] = None
    message: str = ""


def as_reals(out: Any) -> tuple[Optional[list[float]], str]:
    """A reward function's result as floats, or (None, why) naming the offending type."""
    if hasattr(out, "tolist") and getattr(out, "ndim", None) == 1:  # numpy array / torch tensor
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        return None, f"returned {type(out).__name__}, not a sequence of real numbers (list[float])"
    vals = []
    for i, v in enumerate(out):
        if v is None:
            vals.append(float("nan"))  # "no reward for this sample" (TRL's convention): counted as non-finite
        elif isinstance(v, numbers.Real) and not isinstance(v, bool):
            vals.append(float(v))
        else:
            return None, (f"returned a {type(out).__name__} whose element {i} is {type(v).__name__} "
                          f"({v!r:.40}), not a real number")
    return vals, ""


# --------------------------------------------------------------------------------------------
# the worker process

def _worker_main(req_fd: int, resp_fd: int) -> None:
    """Serve calls until the pipe closes: load functions once, call, send back checked floats."""
    _die_with_parent()
    req, resp = Connection(req_fd, writable=False), Connection(resp_fd, readable=False)
    sys.path[:] = req.recv()
    home = os.getcwd()
    fns: dict[int, Callable] = {}
    resp.send(("ready", os.getpid()))
    while True:
        try:
            key, blob, args, kwargs = req.recv()
        except EOFError:
            return
        if blob is not None:  # a load message: import the function (its module), not timed as a call
            try:
                fns[key] = pickle.loads(blob)
                resp.send(("loaded", "", {}))
            except Exception as exc:  # noqa: BLE001 - e.g. the function's module is not importable here
                resp.send(("load_error", f"{type(exc).__name__}: {exc}", {}))
            continue
        logs = _log_lengths(kwargs)
        try:
            out = fns[key](*args, **kwargs)
            vals, why = as_reals(out)
            msg = ("ok", vals) if vals is not None else ("bad_result", why)
        except Exception as exc:  # noqa: BLE001 - any user error is reported, not fatal
            msg = ("error", f"{type(exc).__name__}: {exc}")
        finally:
            if os.getcwd() != home:
                os.chdir(home)
        resp.send(msg + (_new_logs(kwargs, logs),))


def _log_lengths(kwargs: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Lengths of the ``logged`` dicts of keyword arguments that keep one (tilt.rewards.RewardState:
    ``log_metric`` calls), so the worker can send back what the call added."""
    return {k: {n: len(v) for n, v in getattr(x, "logged").items()} for k, x in kwargs.items()
            if isinstance(getattr(x, "logged", None), dict)}


def _new_logs(kwargs: dict[str, Any], before: dict[str, dict[str, int]]) -> dict[str, dict[str, list]]:
    return {k: {n: v[before[k].get(n, 0):] for n, v in kwargs[k].logged.items() if len(v) > before[k].get(n, 0)}
            for k in before}


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the trainer dies (even by SIGKILL), so a spinning call never
    outlives it. Elsewhere the worker still exits at its next read of the closed pipe."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------------------------
# the trainer side

class _Worker:
    """One worker process and its two pipes."""

    def __init__(self) -> None:
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        pkg_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([pkg_root, os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-m", "tilt.reward_pool", str(req_r), str(resp_w)],
                                     pass_fds=(req_r, resp_w), env=env, stdin=subprocess.DEVNULL)
        os.close(req_r)
        os.close(resp_w)
        self.req, self.resp = Connection(req_w, readable=False), Connection(resp_r, writable=False)
        self.req.send(list(sys.path))
        self.ready = False
        self.known: set[int] = set()  # function keys this worker has loaded

    def wait_ready(self) -> None:
        if not self.ready:
            if not self.resp.poll(STARTUP_TIMEOUT_S):
                raise RuntimeError(f"reward worker process {self.proc.pid} did not start "
                                   f"within {STARTUP_TIMEOUT_S:.0f} s")
            self.resp.recv()
            self.ready = True

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for c in (self.req, self.resp):
            c.close()

    def death(self) -> str:
        """How the worker ended: 'exited with code 3' / 'killed by signal SIGSEGV'."""
        rc = self.proc.wait()
        if rc < 0:
            try:
                return f"killed by signal {signal.Signals(-rc).name}"
            except ValueError:
                return f"killed by signal {-rc}"
        return f"exited with code {rc}"


class RewardPool:
    """A small pool of reward worker processes; ``call`` runs one function call in one of them.

    ``size`` workers are kept started (calls from the trainer come one at a time, so one is
    enough; more only help concurrent callers). A killed or crashed worker is replaced at once.
    """

    def __init__(self, size: int = 1):
        self.size = size
        self._idle: list[_Worker] = []
        self._blobs: dict[int, tuple[Callable, Optional[bytes]]] = {}  # id(fn) -> (fn, pickled fn or None)
        self._in_process: set[int] = set()
        self._lock = threading.Lock()
        self.restarts = 0

    def _take(self) -> _Worker:
        with self._lock:
            w = self._idle.pop() if self._idle else _Worker()
        w.wait_ready()
        return w

    def _give_back(self, w: _Worker) -> None:
        with self._lock:
            self._idle.append(w)

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self.restarts += 1
        with self._lock:
            while len(self._idle) < self.size:
                self._idle.append(_Worker())  # boots while the trainer goes on

    def _blob(self, fn: Callable) -> Optional[bytes]:
        if id(fn) not in self._blobs:
            try:
                import cloudpickle

                blob = cloudpickle.dumps(fn)
            except ImportError:
                blob = _try_pickle(fn)
            except Exception as exc:  # noqa: BLE001 - cloudpickle raises PicklingError, TypeError, ...
                blob = None
                _warn_in_process(fn, f"it cannot be pickled ({type(exc).__name__}: {exc})")
            self._blobs[id(fn)] = (fn, blob)  # fn kept alive so its id is not reused
        return self._blobs[id(fn)][1]

    def call(self, fn: Callable, args: tuple, kwargs: dict[str, Any], timeout: float) -> CallResult:
        """``fn(*args, **kwargs)`` in a worker, within ``timeout`` seconds (worker start-up not counted)."""
        key = id(fn)
        if getattr(fn, IN_PROCESS, False):
            return call_in_thread(fn, args, kwargs, timeout)
        blob = None if key in self._in_process else self._blob(fn)
        if blob is None:
            return call_in_thread(fn, args, kwargs, timeout)
        w = self._take()
        if key not in w.known:  # load the function first: importing its module is not the call's time
            w.req.send((key, blob, None, None))
            kind, payload = self._load_reply(w)
            if kind != "loaded":
                if kind == "load_error":
                    self._give_back(w)
                else:
                    self._replace(w)
                self._in_process.add(key)
                _warn_in_process(fn, f"the worker process cannot load it ({payload})")
                return call_in_thread(fn, args, kwargs, timeout)
            w.known.add(key)
        w.req.send((key, None, args, kwargs))
        if not w.resp.poll(timeout):
            self._replace(w)
            return CallResult("timeout", message=f"timeout after {timeout:g} s (worker process killed)")
        try:
            kind, payload, logs = w.resp.recv()
        except (EOFError, OSError):
            how = w.death()
            self._replace(w)
            return CallResult("crash", message=f"crash: the reward function's worker process {how}")
        self._give_back(w)
        for k, new in logs.items():  # what the call logged (log_metric) joins the trainer's copy
            for n, v in new.items():
                kwargs[k].logged.setdefault(n, []).extend(v)
        return CallResult(kind, values=payload) if kind == "ok" else CallResult(kind, message=payload)

    @staticmethod
    def _load_reply(w: "_Worker") -> tuple[str, str]:
        """The worker's answer to a load message, within STARTUP_TIMEOUT_S (a module import may be slow)."""
        if not w.resp.poll(STARTUP_TIMEOUT_S):
            return "load_timeout", f"loading took more than {STARTUP_TIMEOUT_S:g} s"
        try:
            kind, payload, _ = w.resp.recv()
        except (EOFError, OSError):
            return "load_crash", f"the worker process {w.death()} while loading it"
        return kind, payload

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for w in idle:
            w.kill()


def _try_pickle(fn: Callable) -> Optional[bytes]:
    try:
        return pickle.dumps(fn)
    except Exception as exc:  # noqa: BLE001
        _warn_in_process(fn, f"it cannot be pickled without cloudpickle ({type(exc).__name__}: {exc})")
        return None


def _warn_in_process(fn: Callable, why: str) -> None:
    warnings.warn(f"reward function {getattr(fn, '__qualname__', fn)!r} runs in the trainer process, not in "
                  f"a worker process, because {why}; a call past its timeout is abandoned, not killed. "
                  "Define it at module level (importable) to run it isolated.", RuntimeWarning, stacklevel=3)


def call_in_thread(fn: Callable, args: tuple, kwargs: dict[str, Any], timeout: float) -> CallResult:
    """The in-process fallback: a daemon thread, abandoned (not killed) after ``timeout``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["out"] = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any user error is counted, not fatal
            box["err"] = exc

    t = threading.Thread(target=run, name="tilt-reward", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return CallResult("timeout", message=f"timeout after {timeout:g} s (abandoned in a thread)")
    if "err" in box:
        return CallResult("error", message=f"{type(box['err']).__name__}: {box['err']}")
    vals, why = as_reals(box.get("out"))
    return CallResult("ok", values=vals) if vals is not None else CallResult("bad_result", message=why)


_POOL: Optional[RewardPool] = None


def default_pool() -> RewardPool:
    """The process-wide pool ``tilt.rewards.score`` uses (started on first use)."""
    global _POOL
    if _POOL is None:
        _POOL = RewardPool()
    return _POOL


def call(fn: Callable, args: tuple, kwargs: dict[str, Any], timeout: float) -> CallResult:
    """``fn(*args, **kwargs)`` isolated in the default pool's worker process; see ``RewardPool.call``."""
    return default_pool().call(fn, args, kwargs, timeout)


def shutdown() -> None:
    """Stop the default pool's workers (at interpreter exit; a worker also dies with its trainer)."""
    global _POOL
    if _POOL is not None:
        _POOL.close()
        _POOL = None


atexit.register(shutdown)

if __name__ == "__main__":
    _worker_main(int(sys.argv[1]), int(sys.argv[2]))
