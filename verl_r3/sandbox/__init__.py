"""Run untrusted Python (reward functions, an interpreter tool) in an OS-level sandbox.

```python
from verl_r3.sandbox import run_python

res = run_python("print(input()[::-1])", stdin="abc", timeout_s=5.0, memory_mb=512)
res.returncode, res.stdout, res.stderr, res.timed_out   # 0, 'cba\\n', '', False
```

The program runs in new user, mount, PID, network, IPC, UTS and cgroup namespaces (Linux,
unprivileged user namespaces; no setuid helper, nothing to install):

- files: a new root holding only the system (``/usr`` and the ``/lib*``, ``/bin`` links),
  the interpreter's installation (its prefix and, with ``site_packages=True``, the virtual
  environment's), a few files of ``/etc`` (the dynamic linker's cache, the time zone), all
  read-only, nosuid, nodev; a private ``/sandbox`` (the working directory, ``$HOME``, holding
  ``main.py``) and ``/tmp`` on one size-limited tmpfs that disappears with the call; ``/dev``
  with null, zero, full, random, urandom; a ``/proc`` of the sandbox's own processes. The
  caller's working directory and ``$HOME`` are hidden under an empty tmpfs where they lie inside
  an exposed tree.
- network: a network namespace with only a loopback that is down; ``socket()`` is refused for
  every family but ``AF_UNIX`` (seccomp), so neither loopback nor anything else is reachable.
- processes: its own PID namespace (the caller's processes do not exist there); its init is
  ours and outlives nothing: when the program exits, or on a limit, it exits and the kernel
  kills every process left (double forks, ``setsid``, daemons included) before ``run_python``
  returns.
- user: uid 1000 in a nested user namespace, no capabilities after exec, ``no_new_privs``, a
  seccomp filter (x86_64, aarch64) against ptrace, mount, unshare/setns/namespace clones, keyctl,
  bpf, perf_event_open, userfaultfd, io_uring and other rarely needed kernel surface. When the
  caller is root, the program's processes run as uid 65534 (nobody) on the host, never as root.
- environment: only PATH, HOME, TMPDIR, LANG and thread-count variables (``OMP_NUM_THREADS=1``
  ...); Python runs with ``-E -s``.
- limits: wall time (``timeout_s``, from the parent), CPU time per process (RLIMIT_CPU),
  memory (RLIMIT_AS per process, plus the sum of all the sandbox's processes' PSS, polled every
  50 ms by its init), processes (RLIMIT_NPROC, counted in the sandbox's own user namespace),
  file size and disk (RLIMIT_FSIZE and the tmpfs size), open files, no core dumps, output
  (``max_output_bytes`` per stream: the first bytes are kept, ``truncated=True``, and the
  program is killed with ``reason='output_limit'``).

Where the kernel does not allow this (user namespaces disabled, a container's seccomp profile),
:func:`run_python` raises :class:`SandboxUnavailable` and never runs the code unsandboxed;
:func:`check` and :func:`sandbox_available` say so in advance.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import math
import os
import platform
import selectors
import signal
import site
import subprocess
import sys
import tempfile
import time

__all__ = ["SandboxResult", "SandboxUnavailable", "check", "run_python", "sandbox_available"]

_INNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_inner.py")
_ROOT_KUID = 65534  # host uid of the program's processes when the caller is root
_INNER_UID = 1000
_SETUP_TIMEOUT_S = 30.0
_KILL_GRACE_S = 5.0
_ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "alternatives",
        "mime.types", "nsswitch.conf")
_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_SECCOMP_MACHINES = ("x86_64", "aarch64")

_HINT = (
    "run_python needs unprivileged user namespaces with mount, PID and network namespaces. "
    "Check: `sysctl user.max_user_namespaces` (must be > 0); `sysctl "
    "kernel.unprivileged_userns_clone` (Debian, older Ubuntu: must be 1); `sysctl "
    "kernel.apparmor_restrict_unprivileged_userns` (Ubuntu >= 23.10: 0, or an AppArmor profile "
    "allowing userns for this python); in Docker or Kubernetes the default seccomp profile "
    "forbids unshare and mount (e.g. `--security-opt seccomp=unconfined`, and "
    "`--security-opt systempaths=unconfined` where /proc is partly masked). "
    "Nothing was run: the code is never executed without the sandbox."
)


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be set up on this machine (the code was not run)."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run produced.

    returncode: the exit status, or ``-N`` when a signal ``N`` ended it (``-9`` when the sandbox
        killed it for a limit). stdout, stderr: the captured output, UTF-8 decoded with
        replacement, each at most ``max_output_bytes`` bytes before decoding. timed_out: the wall
        time (``timeout_s``) or the CPU time limit ended it. truncated: an output stream passed
        ``max_output_bytes`` (the program was then killed). duration_s: wall time from the start
        of the program to its end. reason: ``None`` when the program ended by itself, otherwise
        ``'timeout'``, ``'cpu_time'``, ``'memory'`` (the sandbox's total memory passed
        ``memory_mb``) or ``'output_limit'``.
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool = False
    duration_s: float = 0.0
    reason: str | None = None


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _depth(path: str) -> int:
    return len([p for p in path.split("/") if p])


def _plan(site_packages: bool) -> tuple[list[list[str]], str]:
    """Mount plan (``[kind, path, source]`` sorted by depth) and the interpreter's path."""
    python = sys.executable if site_packages else getattr(sys, "_base_executable", "")
    if not python or not os.path.isabs(python) or not os.path.exists(python):
        raise SandboxUnavailable(f"cannot locate the Python interpreter ({python!r})")
    links, roots = [], []
    for top in _SYSTEM:
        if os.path.islink(top):
            links.append(["symlink", top, os.readlink(top)])
        elif os.path.isdir(top):
            roots.append(top)
    prefixes = {sys.base_prefix, sys.base_exec_prefix}
    if site_packages:
        prefixes |= {sys.prefix, sys.exec_prefix}
    prefixes.add(os.path.dirname(os.path.realpath(python)))
    aliases = {}  # a prefix reached through a symbolic link: the link is recreated
    for prefix in sorted(prefixes):
        real = os.path.realpath(prefix)
        if real == "/":
            raise SandboxUnavailable(f"the interpreter's prefix is '/': {python} cannot be "
                                     "exposed without exposing the whole file system")
        roots.append(real)
        if os.path.abspath(prefix) != real:
            aliases[os.path.abspath(prefix)] = real
    roots = sorted(set(roots), key=lambda p: (_depth(p), p))

    # hide the caller's own directories where an exposed tree contains them
    hide = {os.path.realpath(os.getcwd())}
    home = os.environ.get("HOME")
    if home:
        hide.add(os.path.realpath(home))
    if not site_packages:
        for path in site.getsitepackages([sys.base_prefix, sys.base_exec_prefix]):
            hide.add(os.path.realpath(path))
    masks = sorted(h for h in hide
                   if h not in roots and any(_is_under(h, r) and h != r for r in roots))

    def covered(path: str) -> bool:  # by a bound ancestor, with no mask in between
        for r in roots:
            if r != path and _is_under(path, r):
                if not any(_is_under(m, r) and _is_under(path, m) for m in masks):
                    return True
        return False

    plan = [["ro", r, r] for r in roots if not covered(r)]
    plan += [["mask", m, ""] for m in masks]
    plan += [["symlink", a, r] for a, r in aliases.items()
             if not any(_is_under(a, root) for root in roots)]
    plan.sort(key=lambda e: (_depth(e[1]), e[0] != "mask", e[1]))
    return links + plan, python


def _free_dir(plan: list[list[str]], candidates, *, nested_ok: bool = False) -> str | None:
    """The first candidate that does not lie inside an exposed path (nor hold one, unless
    ``nested_ok``: exposed trees below a private directory are mounted on top of it)."""
    for cand in candidates:
        if not any(_is_under(cand, p) or (not nested_ok and _is_under(p, cand)) for _, p, _ in plan):
            return cand
    return None


def _check_number(name: str, value, minimum, integer: bool, maximum=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value) or value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def _stdin_fd(data: bytes) -> int:
    try:
        fd = os.memfd_create("verl_r3-sandbox-stdin", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except (AttributeError, OSError):
        f = tempfile.TemporaryFile()
        fd = os.dup(f.fileno())
        f.close()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    except (AttributeError, OSError):
        pass
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _maps_id(path: str, inner: int) -> int | None:
    """The id ``inner`` of this process's user namespace maps to in its parent, if mapped."""
    try:
        with open(path) as f:
            for line in f:
                first, outer, count = (int(x) for x in line.split())
                if first <= inner < first + count:
                    return outer + inner - first
    except (OSError, ValueError):
        return None
    return None


def _root_mode() -> bool:
    """True when the caller is root and the program can run as uid/gid 65534 instead."""
    if os.geteuid() != 0:
        return False
    if (_maps_id("/proc/self/uid_map", _ROOT_KUID) is not None
            and _maps_id("/proc/self/gid_map", _ROOT_KUID) is not None):
        return True
    if _maps_id("/proc/self/uid_map", 0) in (0, None):
        raise SandboxUnavailable(
            "this process is root in a user namespace that maps uid 0 to the parent's root and "
            "does not map uid 65534: the sandboxed program would run as that root. Run the "
            "caller as a regular user, or map uid and gid 65534 in its user namespace too.")
    return False  # root of a rootless container: its uid is an ordinary one outside


def _write_maps(pid: int, root_mode: bool) -> None:
    uid, gid = os.geteuid(), os.getegid()
    if root_mode:  # root: uid 0 for our own setup, 1000 -> 65534 for the program
        maps = {"uid_map": f"0 0 1\n{_INNER_UID} {_ROOT_KUID} 1\n",
                "gid_map": f"0 0 1\n{_INNER_UID} {_ROOT_KUID} 1\n"}
    else:
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
        maps = {"uid_map": f"0 {uid} 1\n", "gid_map": f"0 {gid} 1\n"}
    for name, text in maps.items():
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(text)


def run_python(source: str, stdin: str | bytes = "", timeout_s: float = 5.0,
               memory_mb: int = 512, *, cpu_time_s: float | None = None,
               max_output_bytes: int = 1 << 20, max_processes: int = 32, disk_mb: int = 64,
               site_packages: bool = True) -> SandboxResult:
    """Run ``source`` as ``/sandbox/main.py`` with ``stdin`` in the sandbox; see the module doc.

    timeout_s: wall time of the program (setup not included). memory_mb: address space of each
    process and resident memory (PSS) of all of them together. cpu_time_s: CPU seconds per
    process (default: ``timeout_s``, rounded up). max_output_bytes: kept per stream.
    max_processes: processes and threads. disk_mb: size of /sandbox + /tmp (and the largest file).
    site_packages: expose the running environment's site-packages (read-only) or only the
    standard library. Raises :class:`ValueError` for bad arguments and
    :class:`SandboxUnavailable` when the sandbox cannot be built here.
    """
    if not isinstance(source, str):
        raise ValueError(f"source must be a str, got {type(source).__name__}")
    try:
        source.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"source is not encodable as UTF-8: {exc}") from None
    if isinstance(stdin, str):
        try:
            stdin_bytes = stdin.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"stdin is not encodable as UTF-8: {exc}") from None
    elif isinstance(stdin, (bytes, bytearray, memoryview)):
        stdin_bytes = bytes(stdin)
    else:
        raise ValueError(f"stdin must be str or bytes, got {type(stdin).__name__}")
    _check_number("timeout_s", timeout_s, 0.001, False, 86400)
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    _check_number("memory_mb", memory_mb, 32, True, 1 << 30)
    if cpu_time_s is not None:
        _check_number("cpu_time_s", cpu_time_s, 0.001, False, 86400)
    _check_number("max_output_bytes", max_output_bytes, 0, True)
    _check_number("max_processes", max_processes, 1, True, 1 << 20)
    _check_number("disk_mb", disk_mb, 1, True, 1 << 30)
    if not isinstance(site_packages, bool):
        raise ValueError(f"site_packages must be a bool, got {site_packages!r}")
    if sys.platform != "linux":
        raise SandboxUnavailable(f"the sandbox needs Linux namespaces (this is {sys.platform})")

    plan, python = _plan(site_packages)
    work_dir = _free_dir(plan, ["/sandbox"] + [f"/sandbox-{i}" for i in range(1, 100)])
    # an interpreter installed under /tmp (a CI checkout, a throwaway venv) stays visible,
    # read-only, inside the private /tmp
    tmp_dir = _free_dir(plan, ["/tmp"], nested_ok=True)
    cpu = math.ceil(cpu_time_s if cpu_time_s is not None else timeout_s)
    bin_dir = os.path.dirname(python)
    env = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": work_dir,
           "TMPDIR": tmp_dir or work_dir,
           "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    memory = memory_mb << 20
    rlimits = {"RLIMIT_CPU": [cpu, cpu + 1], "RLIMIT_AS": memory, "RLIMIT_NPROC": max_processes,
               "RLIMIT_FSIZE": disk_mb << 20, "RLIMIT_NOFILE": 256, "RLIMIT_CORE": 0,
               "RLIMIT_RTPRIO": 0, "RLIMIT_NICE": 0}
    root_mode = _root_mode()
    stage_dir = tempfile.mkdtemp(prefix="verl_r3-sandbox-")
    cfg = {"caller_pid": os.getpid(), "stage_dir": stage_dir, "disk_mb": disk_mb,
           "inner_uid": _INNER_UID if root_mode else 0, "source": source, "plan": plan,
           "etc": list(_ETC), "python": python,
           "argv": [python, "-E", "-s", f"{work_dir}/main.py"], "work_dir": work_dir,
           "tmp_dir": tmp_dir, "env": env, "rlimits": rlimits,
           "memory_mb": memory_mb, "seccomp": platform.machine() in _SECCOMP_MACHINES}
    try:
        return _run(cfg, stdin_bytes, timeout_s, max_output_bytes, cpu, root_mode)
    finally:
        try:
            os.rmdir(stage_dir)
        except OSError:
            pass


def _run(cfg: dict, stdin: bytes, timeout_s: float, cap: int, cpu_limit: int,
         root_mode: bool) -> SandboxResult:
    fds = []
    stdin_fd = _stdin_fd(stdin)
    fds.append(stdin_fd)
    cfg_r, cfg_w = os.pipe()
    st_r, st_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    fds += [cfg_r, cfg_w, st_r, st_w, out_r, out_w, err_r, err_w]
    closed = set()

    def close(fd):
        if fd not in closed:
            closed.add(fd)
            os.close(fd)

    proc = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", _INNER, str(cfg_r), str(st_w)],
            stdin=stdin_fd, stdout=out_w, stderr=err_w, pass_fds=(cfg_r, st_w), env={},
            cwd="/", close_fds=True, start_new_session=True)
        for fd in (stdin_fd, cfg_r, st_w, out_w, err_w):
            close(fd)
        try:
            data = (json.dumps(cfg) + "\n").encode()
            view = memoryview(data)
            while view:
                view = view[os.write(cfg_w, view):]
        except BrokenPipeError:
            close(cfg_w)
        return _loop(proc, cfg_w, st_r, out_r, err_r, close, timeout_s, cap, cpu_limit,
                     root_mode)
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()  # only on an error of ours: the init follows it (PDEATHSIG)
            proc.wait()
        for fd in fds:
            if fd not in closed:
                close(fd)


def _loop(proc, cfg_w, st_r, out_r, err_r, close, timeout_s, cap, cpu_limit,
          root_mode) -> SandboxResult:
    sel = selectors.DefaultSelector()
    bufs = {out_r: bytearray(), err_r: bytearray()}
    for fd in (st_r, out_r, err_r):
        sel.register(fd, selectors.EVENT_READ)
    status_buf = b""
    msgs: list[dict] = []
    setup_deadline = time.monotonic() + _SETUP_TIMEOUT_S
    started = deadline = ended = None
    kill_at = None
    reason = None
    truncated = False

    def stop(why):
        nonlocal kill_at, reason
        if kill_at is None:
            kill_at = time.monotonic()
            reason = reason or why
            if proc.returncode is None:
                try:
                    proc.send_signal(signal.SIGUSR1)  # the helper SIGKILLs the init
                except ProcessLookupError:
                    pass

    hard_killed = False
    while sel.get_map():
        now = time.monotonic()
        if kill_at is not None:
            wait = kill_at + _KILL_GRACE_S - now
            if wait <= 0:
                if hard_killed:  # everything in the sandbox died with the helper
                    break
                hard_killed = True
                proc.kill()
                wait = _KILL_GRACE_S
                kill_at = now
        elif ended is not None:  # the program ended: only the teardown is left
            wait = ended + _KILL_GRACE_S - now
            if wait <= 0:
                proc.kill()
                break
        elif started is None:
            wait = setup_deadline - now
            if wait <= 0:
                stop("setup")
                continue
        else:
            wait = deadline - now
            if wait <= 0:
                stop("timeout")
                continue
        for key, _ in sel.select(max(wait, 0.0)):
            fd = key.fd
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                sel.unregister(fd)
                continue
            if fd == st_r:
                status_buf += chunk
                while b"\n" in status_buf:
                    line, status_buf = status_buf.split(b"\n", 1)
                    msg = json.loads(line)
                    msgs.append(msg)
                    if "ready" in msg:
                        try:
                            _write_maps(proc.pid, root_mode)
                            os.write(cfg_w, b"go\n")
                        except OSError as exc:
                            msgs.append({"error": f"writing the uid/gid maps: {exc}",
                                         "stage": "uidmap"})
                            stop("setup")
                        close(cfg_w)
                    elif "started" in msg:
                        started = time.monotonic()
                        deadline = started + timeout_s
                    elif "exit" in msg or "signal" in msg or "killed" in msg:
                        ended = time.monotonic()
                        if msg.get("killed") == "memory":
                            reason = reason or "memory"
                    elif "error" in msg:
                        stop("setup")
                continue
            buf = bufs[fd]
            room = cap - len(buf)
            if room > 0:
                buf += chunk[:room]
            if len(chunk) > room:
                truncated = True
                if ended is None:  # still running: stop it, more output is useless
                    stop("output_limit")
    proc.wait()

    errors = [m for m in msgs if "error" in m]
    if errors:
        err = errors[0]
        hint = _HINT if err.get("stage") in ("unshare", "uidmap", "root", "bind", "proc",
                                             "scratch", "dev", "mask") else ""
        raise SandboxUnavailable(f"sandbox setup failed ({err.get('stage')}): {err['error']}. "
                                 + hint)
    if started is None:
        raise SandboxUnavailable(f"the sandbox did not start (helper exit status "
                                 f"{proc.returncode}). " + _HINT)
    end = next((m for m in msgs if "exit" in m or "signal" in m), None)
    if end is None or reason in ("timeout", "output_limit", "memory"):
        returncode = -signal.SIGKILL
    elif "exit" in end:
        returncode = end["exit"]
    else:
        returncode = -end["signal"]
        if end["signal"] == signal.SIGXCPU or (
                end["signal"] == signal.SIGKILL and end.get("cpu", 0) >= cpu_limit - 0.05):
            reason = reason or "cpu_time"
    duration = (ended or time.monotonic()) - started
    return SandboxResult(
        returncode=returncode,
        stdout=bytes(bufs[out_r]).decode("utf-8", "replace"),
        stderr=bytes(bufs[err_r]).decode("utf-8", "replace"),
        timed_out=reason in ("timeout", "cpu_time"),
        truncated=truncated,
        duration_s=round(duration, 6),
        reason=reason,
    )


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[bool, str]:
    try:
        res = run_python("import os; print(os.getuid())", timeout_s=30.0)
    except SandboxUnavailable as exc:
        return False, str(exc)
    if res.returncode != 0 or res.stdout.strip() != str(_INNER_UID):
        return False, (f"the probe program failed in the sandbox (returncode {res.returncode}, "
                       f"stdout {res.stdout!r}, stderr {res.stderr[-2000:]!r})")
    host_uid = _ROOT_KUID if _root_mode() else os.geteuid()
    machine = platform.machine()
    seccomp = machine if machine in _SECCOMP_MACHINES else f"none (no filter for {machine})"
    return True, (f"namespaces: user, mount, pid, net, ipc, uts, cgroup; seccomp: {seccomp}; "
                  f"program uid 1000 (host uid {host_uid})")


def check() -> str:
    """Build a sandbox once and run a probe in it; returns a one-line description.

    Raises :class:`SandboxUnavailable` with what is missing and how to enable it. The result
    is cached for the process.
    """
    ok, message = _probe()
    if not ok:
        raise SandboxUnavailable(message)
    return message


def sandbox_available() -> bool:
    """True when :func:`run_python` works here (see :func:`check` for the reason if not)."""
    return _probe()[0]
