"""verl_r3.sandbox: hostile programs really run and are really contained (Linux, no mocks).

Every test runs code in the sandbox and checks the effect from the outside: the caller's files,
environment, processes, sockets and signals. Tests that need user namespaces are skipped where
the OS does not offer them (checked with util-linux ``unshare`` or a bare ``unshare(2)``,
independently of the code under test); ``test_refuses_without_user_namespaces`` covers that case.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid

import pytest

from verl_r3.sandbox import SandboxResult, check, run_python, sandbox_available

REPO = pathlib.Path(__file__).resolve().parents[2]
SANDBOX_PKG = REPO / "verl_r3" / "sandbox" / "__init__.py"


def _os_has_user_namespaces() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    if shutil.which("unshare"):
        cmd = ["unshare", "--user", "--map-root-user", "--mount", "--net", "--pid", "--fork",
               "--mount-proc", "true"]
    else:  # no util-linux: ask the kernel directly (user, mount, net, pid namespaces)
        cmd = [sys.executable, "-c", "import ctypes, sys; sys.exit(ctypes.CDLL(None)"
               ".unshare(0x10000000 | 0x00020000 | 0x40000000 | 0x20000000) != 0)"]
    return subprocess.run(cmd, capture_output=True).returncode == 0


USERNS = _os_has_user_namespaces()
needs_userns = pytest.mark.skipif(not USERNS, reason="this OS offers no user namespaces")


def _procs_with(marker: str) -> list[int]:
    """Host processes whose command line contains ``marker``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(name))
        except OSError:
            continue
    return found


def _marked(body: str, marker: str) -> str:
    """A program that re-executes ``body`` with ``marker`` in its argv (visible in /proc)."""
    return textwrap.dedent(f"""
        import os, sys
        os.execv(sys.executable, [sys.executable, "-c", {textwrap.dedent(body)!r}, {marker!r}])
    """)


# ----------------------------------------------------------------------------- normal programs


@needs_userns
def test_stdout_stdin_exit_code():
    res = run_python("import sys\nname = input()\nprint('hello', name[::-1])\n"
                     "print('warn', file=sys.stderr)\nsys.exit(3)", stdin="abc\n")
    assert isinstance(res, SandboxResult)
    assert (res.returncode, res.stdout, res.stderr) == (3, "hello cba\n", "warn\n")
    assert not res.timed_out and not res.truncated and res.reason is None
    assert 0 < res.duration_s < 5


@needs_userns
def test_exception_gives_returncode_1_and_traceback():
    res = run_python("def f():\n    return 1 / 0\nf()\n")
    assert res.returncode == 1
    assert "Traceback (most recent call last)" in res.stderr
    assert "ZeroDivisionError: division by zero" in res.stderr
    assert res.stdout == "" and not res.timed_out


@needs_userns
def test_bytes_stdin_unicode_and_big_stdin():
    data = "é漢\n".encode() + b"x" * 300_000
    res = run_python("import sys\nb = sys.stdin.buffer.read()\n"
                     "print(len(b), b[:6].decode(), 'ünïcode')", stdin=data)
    assert res.returncode == 0
    assert res.stdout == f"{len(data)} é漢\n ünïcode\n"


def _package_in_environment() -> str | None:
    """A third-party package installed in this environment's site-packages (numpy here)."""
    for name in ("numpy", "pytest"):
        spec = importlib.util.find_spec(name)
        if spec and spec.origin and os.path.realpath(spec.origin).startswith(
                os.path.realpath(sys.prefix) + "/"):
            return name
    return None


@needs_userns
def test_work_dir_tmp_and_site_packages():
    package = _package_in_environment() or "json"
    src = textwrap.dedent(f"""
        import os, tempfile
        open("out.txt", "w").write("w")
        with tempfile.NamedTemporaryFile("w", delete=False) as f:
            f.write("t")
        import {package}
        print(os.getcwd() == os.environ["HOME"], os.path.exists("main.py"),
              open("out.txt").read(), open(f.name).read(), os.getuid(), os.getgid())
    """)
    res = run_python(src)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "True True w t 1000 1000\n"
    if package != "json":  # site_packages=False: the standard library only
        no_site = run_python(f"import {package}", site_packages=False)
        assert no_site.returncode == 1 and "ModuleNotFoundError" in no_site.stderr
    assert run_python("import json, sqlite3; print('ok')", site_packages=False).stdout == "ok\n"


def test_result_is_a_frozen_dataclass():
    res = SandboxResult(0, "", "", False)
    with pytest.raises(AttributeError):
        res.returncode = 1  # type: ignore[misc]
    assert (res.truncated, res.reason) == (False, None)


@pytest.mark.parametrize("kwargs, match", [
    ({"source": b"print(1)"}, "source must be a str"),
    ({"source": "x", "stdin": 3}, "stdin must be str or bytes"),
    ({"source": "x", "timeout_s": 0}, "timeout_s"),
    ({"source": "x", "timeout_s": -1.0}, "timeout_s"),
    ({"source": "x", "timeout_s": float("nan")}, "timeout_s"),
    ({"source": "x", "timeout_s": "5"}, "timeout_s must be a number"),
    ({"source": "x", "memory_mb": 0}, "memory_mb"),
    ({"source": "x", "memory_mb": 100.5}, "memory_mb must be an integer"),
    ({"source": "x", "memory_mb": True}, "memory_mb must be an integer"),
    ({"source": "x", "cpu_time_s": 0}, "cpu_time_s"),
    ({"source": "x", "max_output_bytes": -1}, "max_output_bytes"),
    ({"source": "x", "max_processes": 0}, "max_processes"),
    ({"source": "x", "disk_mb": 0}, "disk_mb"),
    ({"source": "x", "site_packages": "yes"}, "site_packages"),
    ({"source": "\ud800"}, "UTF-8"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_python(**kwargs)


@needs_userns
def test_check_and_sandbox_available():
    assert sandbox_available() is True
    assert "namespaces: user, mount, pid, net" in check()


# ----------------------------------------------------------------------------- limits


@needs_userns
def test_infinite_loop_hits_wall_timeout():
    t0 = time.monotonic()
    res = run_python("print('started', flush=True)\nwhile True:\n    pass\n", timeout_s=1.0,
                     cpu_time_s=30)
    elapsed = time.monotonic() - t0
    assert res.timed_out and res.reason == "timeout" and res.returncode == -signal.SIGKILL
    assert res.stdout == "started\n"
    assert 1.0 <= res.duration_s < 2.0 and elapsed < 5.0


@needs_userns
def test_sleeping_program_hits_wall_timeout():
    res = run_python("import time\ntime.sleep(60)", timeout_s=0.5)
    assert res.timed_out and res.reason == "timeout" and res.duration_s < 1.5


@needs_userns
def test_cpu_time_limit():
    t0 = time.monotonic()
    res = run_python("while True:\n    pass\n", timeout_s=30.0, cpu_time_s=1)
    assert res.timed_out and res.reason == "cpu_time"
    assert res.returncode in (-signal.SIGXCPU, -signal.SIGKILL)
    assert time.monotonic() - t0 < 10.0


@needs_userns
def test_fork_bomb_is_capped_and_leaves_nothing_behind():
    marker = f"forkbomb-{uuid.uuid4().hex}"
    bomb = """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """
    peak = [0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], len(_procs_with(marker)))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.monotonic()
    try:
        res = run_python(_marked(bomb, marker), timeout_s=3.0, max_processes=16)
    finally:
        done.set()
        watcher.join()
    assert res.timed_out and res.reason == "timeout"
    assert time.monotonic() - t0 < 10.0
    assert 2 <= peak[0] <= 16  # RLIMIT_NPROC, counted in the sandbox's own user namespace
    assert _procs_with(marker) == []


@needs_userns
def test_memory_bomb_single_process():
    t0 = time.monotonic()
    res = run_python("chunks = []\nwhile True:\n    chunks.append(b'x' * (16 << 20))\n",
                     timeout_s=20.0, memory_mb=256)
    assert res.returncode == 1 and "MemoryError" in res.stderr
    assert not res.timed_out and time.monotonic() - t0 < 15.0
    huge = run_python("b = bytearray(1 << 40)", memory_mb=256)
    assert huge.returncode == 1 and "MemoryError" in huge.stderr


@needs_userns
def test_memory_bomb_across_processes_is_killed():
    marker = f"membomb-{uuid.uuid4().hex}"
    body = """
        import os, time
        for _ in range(8):
            if os.fork() == 0:
                block = b"\\x01" * (150 << 20)  # every page written: 150 MiB resident each
                time.sleep(60)
                os._exit(0)
        time.sleep(60)
    """
    t0 = time.monotonic()
    res = run_python(_marked(body, marker), timeout_s=30.0, memory_mb=256)
    assert res.reason == "memory" and res.returncode == -signal.SIGKILL and not res.timed_out
    assert time.monotonic() - t0 < 20.0
    assert _procs_with(marker) == []


@needs_userns
def test_huge_output_is_truncated_and_flagged():
    cap = 100_000
    res = run_python("import sys\nwhile True:\n    sys.stdout.write('y' * 65536)\n",
                     max_output_bytes=cap, timeout_s=20.0)
    assert res.truncated and res.reason == "output_limit" and res.returncode == -signal.SIGKILL
    assert res.stdout == "y" * cap and not res.timed_out and res.duration_s < 10
    err = run_python("import sys\nsys.stderr.write('e' * 10_000_000)\n", max_output_bytes=cap)
    assert err.truncated and err.stderr == "e" * cap
    exact = run_python(f"print('z' * {cap - 1})", max_output_bytes=cap)
    assert not exact.truncated and exact.returncode == 0 and len(exact.stdout) == cap


@needs_userns
def test_disk_is_bounded():
    src = textwrap.dedent("""
        import os
        try:
            with open("big", "wb") as f:
                for _ in range(64):
                    f.write(b"\\0" * (1 << 20))
            print("wrote all")
        except OSError as e:
            print("stopped", e.errno, os.path.getsize("big"))
    """)
    res = run_python(src, disk_mb=8)
    # RLIMIT_FSIZE: EFBIG (Python ignores SIGXFSZ); a full tmpfs: ENOSPC
    words = res.stdout.split()
    assert res.returncode == 0 and words[0] == "stopped", res
    assert int(words[1]) in (27, 28) and int(words[2]) <= 8 << 20


# ----------------------------------------------------------------------------- no survivors


@needs_userns
def test_daemonized_children_die_with_the_call():
    marker = f"daemon-{uuid.uuid4().hex}"
    daemon = """
        import os, signal, sys, time
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        print("daemon up", file=sys.stderr, flush=True)
        time.sleep(30)
    """
    body = f"""
        import os, sys, time
        if os.fork() == 0:            # double fork + setsid: the classic daemon
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-c", {textwrap.dedent(daemon)!r},
                                          {marker!r}])
            os._exit(0)
        if os.fork() == 0:            # a child that keeps stdout open and sleeps
            os.setpgid(0, 0)
            os.execv(sys.executable, [sys.executable, "-c", {textwrap.dedent(daemon)!r},
                                      {marker!r}])
        time.sleep(0.5)
        print("parent exits")
    """
    t0 = time.monotonic()
    res = run_python(textwrap.dedent(body), timeout_s=10.0)
    assert res.returncode == 0 and res.stdout == "parent exits\n" and not res.timed_out
    assert res.stderr == "daemon up\n" * 2  # both were running when the parent exited
    assert time.monotonic() - t0 < 5.0
    assert _procs_with(marker) == []
    time.sleep(0.5)
    assert _procs_with(marker) == []


@needs_userns
def test_timeout_kills_the_whole_process_tree():
    marker = f"tree-{uuid.uuid4().hex}"
    body = """
        import os, time
        for _ in range(3):
            if os.fork() == 0:
                os.setsid()
                break
        print("up", flush=True)
        time.sleep(60)
    """
    res = run_python(_marked(body, marker), timeout_s=1.0)
    assert res.timed_out and res.stdout.count("up\n") == 4
    assert _procs_with(marker) == []


@needs_userns
def test_sandbox_dies_with_a_killed_caller(tmp_path):
    """SIGKILL of the caller mid-run (no cleanup code runs): the sandbox goes with it."""
    marker = f"orphan-{uuid.uuid4().hex}"
    body = """
        import os, time
        if os.fork() == 0:
            os.setsid()
        time.sleep(60)
    """
    script = tmp_path / "caller.py"
    script.write_text(_standalone_script(f"""
        sbx.run_python({_marked(body, marker)!r}, timeout_s=60)
    """))
    caller = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 30
        while len(_procs_with(marker)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_procs_with(marker)) == 2
    finally:
        caller.kill()
        caller.wait()
    deadline = time.monotonic() + 5
    while _procs_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _procs_with(marker) == []


# ----------------------------------------------------------------------------- isolation


@needs_userns
def test_network_is_unreachable_loopback_included():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    src = textwrap.dedent(f"""
        import socket
        attempts = {{
            "tcp loopback": lambda: socket.create_connection(("127.0.0.1", {port}), timeout=2),
            "tcp localhost": lambda: socket.create_connection(("localhost", {port}), timeout=2),
            "tcp6 loopback": lambda: socket.create_connection(("::1", {port}), timeout=2),
            "tcp internet": lambda: socket.create_connection(("1.1.1.1", 80), timeout=2),
            "udp": lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(
                b"x", ("127.0.0.1", {port})),
            "bind any": lambda: socket.socket().bind(("0.0.0.0", 8080)),
            "raw/packet": lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW),
            "netlink": lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW),
        }}
        for name, attempt in attempts.items():
            try:
                attempt()
                print(name, "REACHED")
            except OSError as exc:
                print(name, "blocked", type(exc).__name__)
        a, b = socket.socketpair()   # local IPC still works
        a.sendall(b"ping")
        print("unix", b.recv(4).decode())
    """)
    try:
        res = run_python(src, timeout_s=15.0)
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()
    assert res.returncode == 0, res.stderr
    assert "REACHED" not in res.stdout
    assert res.stdout.count(" blocked ") == 8
    assert "unix ping" in res.stdout


@needs_userns
def test_caller_files_cannot_be_read(tmp_path):
    secret = f"secret-{uuid.uuid4().hex}"
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(secret)
    secret_file.chmod(0o644)
    targets = [str(secret_file), str(REPO / "setup.cfg"), str(REPO / "README.md"),
               str(pathlib.Path(__file__).resolve()), "/etc/shadow",
               "/proc/1/environ", f"/proc/{os.getpid()}/environ"]
    home = os.path.realpath(os.path.expanduser("~"))
    dirs = [str(tmp_path), str(REPO), home]
    src = textwrap.dedent(f"""
        import json, os
        out = {{}}
        for path in {targets!r}:
            try:
                out[path] = ["READ", open(path, errors="replace").read()]
            except OSError as exc:
                out[path] = ["denied", type(exc).__name__]
        for path in {dirs!r}:
            try:
                out[path] = ["LIST", sorted(os.listdir(path))]
            except OSError as exc:
                out[path] = ["denied", type(exc).__name__]
        print(json.dumps(out))
    """)
    res = run_python(src)
    assert res.returncode == 0, res.stderr
    assert secret not in res.stdout
    out = json.loads(res.stdout)
    for path in targets:
        assert out[path][0] == "denied", (path, out[path])
    assert out[str(tmp_path)][0] == "denied"  # the caller's /tmp is not the sandbox's
    # the repository and $HOME at most show the way to the interpreter's installation
    exposed = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
    for path in (str(REPO), home):
        if out[path][0] == "LIST":
            allowed = {e[len(path) + 1:].split("/")[0] for e in exposed
                       if e.startswith(path + "/")}
            assert set(out[path][1]) <= allowed, (path, out[path])


@needs_userns
def test_writes_outside_fail_and_leave_the_host_untouched(tmp_path):
    name = f"pwned-{uuid.uuid4().hex}"
    targets = [os.path.join(sys.prefix, name), os.path.join(sys.base_prefix, name),
               os.path.join(os.path.dirname(os.__file__), name), f"/usr/lib/{name}",
               f"/etc/{name}", str(REPO / name), str(tmp_path / name), f"/{name}",
               f"/dev/{name}"]
    src = textwrap.dedent(f"""
        import json, os
        out = {{}}
        for path in {targets!r}:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write("x")
                out[path] = "written"
            except OSError as exc:
                out[path] = exc.errno
        for path in ("/etc/passwd", os.__file__):
            try:
                open(path, "a").write("x")
                out[path] = "appended"
            except OSError as exc:
                out[path] = exc.errno
        try:
            os.chmod(os.__file__, 0o777)
            out["chmod"] = "changed"
        except OSError as exc:
            out["chmod"] = exc.errno
        print(json.dumps(out))
    """)
    res = run_python(src)
    assert res.returncode == 0, res.stderr
    for path in targets:
        assert not os.path.exists(path), path
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    out = json.loads(res.stdout)
    # the interpreter's installation, the system and the root are read-only mounts (EROFS,
    # whoever owns the files); the caller's tmp_path only exists in the sandbox's own /tmp
    for path in targets[:6] + targets[7:]:
        expected = {errno.EROFS}
        if path == str(REPO / name) and str(REPO).startswith("/tmp/"):
            # a checkout under /tmp: the sandbox's own /tmp holds only the mount points of the
            # read-only trees exposed below it (the interpreter), directories the sandbox cannot write
            expected.add(errno.EACCES)
        assert out[path] in expected, (path, out[path])
    assert out[targets[6]] == "written"
    assert out["/etc/passwd"] in (errno.EROFS, errno.EACCES)
    assert out["chmod"] == errno.EROFS and out[os.__file__] in (errno.EROFS, errno.EACCES)


@needs_userns
def test_caller_environment_is_invisible(monkeypatch):
    token = f"tok-{uuid.uuid4().hex}"
    monkeypatch.setenv("SECRET_TOKEN", token)
    src = textwrap.dedent("""
        import json, os
        extra = {}
        for path in ("/proc/self/environ", "/proc/1/environ"):
            try:
                extra[path] = open(path, "rb").read().decode("latin-1")
            except OSError as exc:
                extra[path] = type(exc).__name__
        print(json.dumps({"env": dict(os.environ), "extra": extra}))
    """)
    res = run_python(src)
    assert res.returncode == 0, res.stderr
    assert token not in res.stdout and token not in res.stderr
    env = json.loads(res.stdout)["env"]
    assert "SECRET_TOKEN" not in env
    assert set(env) <= {"PATH", "HOME", "TMPDIR", "LANG", "OMP_NUM_THREADS",
                        "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_ARENA_MAX"}
    assert env["HOME"] != os.environ.get("HOME")


@needs_userns
def test_caller_cannot_be_signalled():
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        src = textwrap.dedent(f"""
            import os, signal
            attempts = [
                ("kill caller", lambda: os.kill({os.getpid()}, signal.SIGTERM)),
                ("killpg caller", lambda: os.killpg({os.getpgid(0)}, signal.SIGTERM)),
                ("kill init", lambda: os.kill(1, signal.SIGKILL)),
                ("kill parent", lambda: os.kill(os.getppid(), signal.SIGKILL)),
                ("kill all", lambda: os.kill(-1, signal.SIGTERM)),
            ]
            for name, attempt in attempts:
                try:
                    attempt()
                    print(name, "sent")
                except OSError as exc:
                    print(name, "failed", type(exc).__name__)
            print("pids", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
            print("alive")
        """)
        res = run_python(src)
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == []
    assert res.returncode == 0 and res.stdout.endswith("alive\n"), res
    assert "kill caller failed" in res.stdout and "killpg caller failed" in res.stdout
    pids = json.loads(res.stdout.split("pids ")[1].split("\n")[0])
    assert os.getpid() not in pids and len(pids) <= 3  # init and the program itself


@needs_userns
def test_an_interpreter_under_tmp_stays_usable_with_a_private_tmp(tmp_path):
    """A virtual environment under /tmp (a CI checkout, a throwaway venv): the program still runs
    on it, read-only, and /tmp is still the sandbox's own, writable one."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    assert str(venv).startswith("/tmp/"), venv
    program = textwrap.dedent("""
        import errno, os, sys
        open("/tmp/mine", "w").write("ok")
        try:
            open(os.path.join(sys.prefix, "pwned"), "w")
            wrote = "written"
        except OSError as exc:
            wrote = errno.errorcode[exc.errno]
        print(sys.prefix, open("/tmp/mine").read(), wrote)
    """)
    caller = textwrap.dedent(f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("sandbox", {str(SANDBOX_PKG)!r})
        sandbox = sys.modules["sandbox"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sandbox)
        res = sandbox.run_python({program!r}, timeout_s=30.0)
        print(json.dumps([res.returncode, res.stdout, res.stderr]))
    """)
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", caller], capture_output=True, text=True,
                          timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    code, out, err = json.loads(proc.stdout)
    assert code == 0, err
    assert out == f"{venv} ok EROFS\n"
    assert not (venv / "pwned").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["venv"]  # /tmp/mine stayed in the sandbox


@needs_userns
def test_concurrent_sandboxes_are_isolated_from_each_other():
    src = textwrap.dedent("""
        import os, sys, time
        me = sys.stdin.read()
        before = set(os.listdir("/tmp"))  # empty, or the mount point of an interpreter under /tmp
        open("/tmp/shared", "w").write(me)
        time.sleep(0.3)
        print(me, open("/tmp/shared").read(), sorted(set(os.listdir("/tmp")) - before))
    """)
    results = {}

    def one(i):
        results[i] = run_python(src, stdin=str(i))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert results[i].stdout == f"{i} {i} ['shared']\n", results[i]


# ----------------------------------------------------------------------------- other callers


def _standalone_script(body: str) -> str:
    """A script that loads verl_r3.sandbox from its file (no torch) and runs ``body``."""
    return textwrap.dedent(f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("sbx", {str(SANDBOX_PKG)!r})
        sbx = importlib.util.module_from_spec(spec)
        sys.modules["sbx"] = sbx
        spec.loader.exec_module(sbx)
    """) + textwrap.dedent(body)


# Runs argv[1:] in a new user namespace whose user.max_user_namespaces is 0: no further user
# namespace can be created there. The parent writes the maps (root: 0 and 65534, like a normal
# system; otherwise its own uid as 0), the child sets the limit and execs.
_NO_USERNS_LAUNCHER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
ready_r, ready_w = os.pipe()
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:
    if libc.unshare(0x10000000) != 0:
        os._exit(97)
    os.write(ready_w, b"r")
    os.read(go_r, 1)
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")
    os.execv(sys.argv[1], sys.argv[1:])
os.read(ready_r, 1)
uid, gid = os.geteuid(), os.getegid()
if uid == 0:
    maps = {"uid_map": "0 0 1\n65534 65534 1\n", "gid_map": "0 0 1\n65534 65534 1\n"}
else:
    with open(f"/proc/{pid}/setgroups", "w") as f:
        f.write("deny")
    maps = {"uid_map": f"0 {uid} 1\n", "gid_map": f"0 {gid} 1\n"}
for name, text in maps.items():
    with open(f"/proc/{pid}/{name}", "w") as f:
        f.write(text)
os.write(go_w, b"g")
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def _refusal_script(tmp_path, flag) -> pathlib.Path:
    script = tmp_path / "refuse.py"
    script.write_text(_standalone_script(f"""
        try:
            sbx.run_python("open({str(flag)!r}, 'w').write('ran')")
            print("RAN")
        except sbx.SandboxUnavailable as exc:
            print("UNAVAILABLE", exc)
        print("available", sbx.sandbox_available())
    """))
    return script


def test_refuses_without_user_namespaces(tmp_path):
    """Where user namespaces are off, run_python raises and never runs the code."""
    flag = tmp_path / "ran"
    script = _refusal_script(tmp_path, flag)
    if USERNS:  # switch them off for real
        cmd = [sys.executable, "-c", _NO_USERNS_LAUNCHER, sys.executable, str(script)]
    else:
        cmd = [sys.executable, str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "RAN" not in out.stdout and not flag.exists()
    assert "UNAVAILABLE" in out.stdout and "available False" in out.stdout, out.stdout
    if USERNS:
        assert "sandbox setup failed (unshare)" in out.stdout
        assert "No space left on device" in out.stdout and "max_user_namespaces" in out.stdout


@needs_userns
def test_refuses_to_run_as_root_of_a_root_only_user_namespace(tmp_path):
    """Root whose only mapping is 0 -> 0: the program would keep that uid, so no run."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and util-linux unshare")
    flag = tmp_path / "ran"
    script = _refusal_script(tmp_path, flag)
    out = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, str(script)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "RAN" not in out.stdout and not flag.exists()
    assert "UNAVAILABLE this process is root in a user namespace" in out.stdout, out.stdout


def _unprivileged_python() -> list[str] | None:
    if not USERNS or os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    for python in (sys.executable, "/usr/bin/python3"):
        cmd = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", python]
        try:
            probe = ("import json, os, sys; assert sys.version_info >= (3, 10); "
                     "assert os.access(os.path.realpath(sys.executable), os.X_OK)")
            if subprocess.run(cmd + ["-c", probe], capture_output=True, cwd="/",
                              timeout=60).returncode == 0:
                return cmd
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


@pytest.fixture
def shared_tmp():
    """A temporary directory an unprivileged uid can read (pytest's tmp_path is 0700)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="verl_r3-sandbox-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_unprivileged_caller(shared_tmp):
    """The usual deployment: a non-root caller (here uid 65534, dropped with setpriv)."""
    cmd = _unprivileged_python()
    if cmd is None:
        pytest.skip("needs root (to drop to an unprivileged uid), setpriv and user namespaces")
    tmp_path = shared_tmp
    secret = f"secret-{uuid.uuid4().hex}"
    (tmp_path / "secret.txt").write_text(secret)
    (tmp_path / "secret.txt").chmod(0o644)
    inner = textwrap.dedent(f"""
        import os, socket
        out = {{"uid": os.getuid()}}
        for key, fn in {{
            "secret": lambda: open({str(tmp_path / "secret.txt")!r}).read(),
            "write_usr": lambda: open("/usr/x", "w"),
            "socket": lambda: socket.create_connection(("127.0.0.1", 1), timeout=1),
        }}.items():
            try:
                out[key] = repr(fn())
            except OSError as exc:
                out[key] = "denied"
        print(out)
    """)
    script = tmp_path / "unpriv.py"
    script.write_text(_standalone_script(f"""
        res = sbx.run_python({inner!r})
        print(json.dumps({{"rc": res.returncode, "out": res.stdout, "err": res.stderr}}))
        print(sbx.check())
    """))
    script.chmod(0o644)
    out = subprocess.run(cmd + [str(script)], capture_output=True, text=True, timeout=120,
                         cwd="/")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.splitlines()[0])
    assert res["rc"] == 0, res["err"]
    assert res["out"].strip() == str({"uid": 1000, "secret": "denied", "write_usr": "denied",
                                      "socket": "denied"})
    assert "host uid 65534" in out.stdout
