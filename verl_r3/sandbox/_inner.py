"""The part of the sandbox that runs inside the namespaces (run as a script, stdlib only).

``verl_r3.sandbox.run_python`` starts this file as ``python -I -S -B _inner.py CFG_FD STATUS_FD``
with an empty environment. Three processes take part:

- the *helper* (this script's first process): reads the plan from ``CFG_FD``, creates the new
  user, mount, PID, network, IPC, UTS and cgroup namespaces, says ``ready`` on ``STATUS_FD``,
  waits until the caller has written its uid/gid maps, forks the init, and waits for it.
  SIGUSR1 or SIGTERM makes it SIGKILL the init; the kernel then kills every process of the PID
  namespace, and ``waitpid`` on the init returns only once they are all gone.
- the *init* (PID 1 of the new PID namespace): builds the new root (a tmpfs with read-only bind
  mounts of the system and the interpreter, a private work dir and /tmp, /dev, a fresh /proc),
  pivots into it, forks the user program, reaps every process, polls the sandbox's memory, and
  reports the user program's exit status; its own exit tears the namespace down.
- the *user program*: drops to uid 1000 in a nested user namespace (no capabilities after
  exec, mounts locked), sets the rlimits, no_new_privs and a seccomp filter, and execs Python.

Status lines are JSON objects, one per line, written to ``STATUS_FD``.
"""

import ctypes
import errno
import json
import os
import platform
import re
import resource
import select
import signal
import struct
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080
NS_FLAGS = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER
            | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWTIME)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2

SANDBOX_UID = 1000  # the user program's uid (and gid) inside its user namespace

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


class Failure(Exception):
    """A setup step failed; ``stage`` says which (the caller turns it into SandboxUnavailable)."""

    def __init__(self, stage, message):
        super().__init__(message)
        self.stage = stage


def _check(ret, stage, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise Failure(stage, f"{what}: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})")


def _b(path):
    return None if path is None else os.fsencode(path)


def mount(src, target, fstype, flags, data=None, stage="mount"):
    _check(_libc.mount(_b(src), _b(target), _b(fstype), flags, _b(data)), stage,
           f"mount({src!r}, {target!r}, {fstype!r})")


def prctl(option, arg2=0, stage="prctl"):
    _check(_libc.prctl(option, arg2, 0, 0, 0), stage, f"prctl({option})")


class Status:
    def __init__(self, fd):
        self.fd = fd

    def send(self, **msg):
        data = (json.dumps(msg) + "\n").encode()
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# seccomp: a small deny list, arguments checked for socket() and clone()

_ARCH = {
    # machine: (AUDIT_ARCH, syscall numbers)
    "x86_64": (0xC000003E, {
        "socket": 41, "socketpair": 53, "clone": 56, "clone3": 435,
        "deny": [101, 310, 311, 165, 166, 155, 161, 272, 308, 250, 248, 249, 321, 298, 323,
                 425, 426, 427, 246, 320, 175, 313, 176, 304, 303, 430, 431, 432, 433, 429,
                 428, 442, 163, 167, 168, 169, 170, 171, 179, 103, 164, 227, 159, 305, 153,
                 438, 172, 173, 134, 212, 154],
    }),
    "aarch64": (0xC00000B7, {
        "socket": 198, "socketpair": 199, "clone": 220, "clone3": 435,
        "deny": [117, 270, 271, 40, 39, 41, 51, 97, 268, 219, 217, 218, 280, 241, 282, 425,
                 426, 427, 104, 294, 105, 273, 106, 265, 264, 430, 431, 432, 433, 429, 428,
                 442, 89, 224, 225, 142, 161, 162, 60, 116, 170, 112, 171, 266, 58, 438, 18],
    }),
}
# ptrace, process_vm_readv/writev, mount, umount2, pivot_root, chroot, unshare, setns, keyctl,
# add_key, request_key, bpf, perf_event_open, userfaultfd, io_uring_*, kexec_*, *_module,
# open_by_handle_at, name_to_handle_at, the new mount API, acct, swapon/off, reboot,
# sethostname, setdomainname, quotactl, syslog, clock setting, vhangup, pidfd_getfd,
# (x86_64: iopl, ioperm, uselib, lookup_dcookie, modify_ldt; aarch64: lookup_dcookie).

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
AF_UNIX = 1


def seccomp_available():
    return platform.machine() in _ARCH


def _seccomp_program():
    arch, nr = _ARCH[platform.machine()]
    ld_abs = 0x20      # BPF_LD | BPF_W | BPF_ABS
    jeq = 0x15         # BPF_JMP | BPF_JEQ | BPF_K
    jge = 0x35         # BPF_JMP | BPF_JGE | BPF_K
    jset = 0x45        # BPF_JMP | BPF_JSET | BPF_K
    ret = 0x06         # BPF_RET | BPF_K
    prog = []          # entries: [code, jt, jf, k] where jt/jf may be label names

    def ins(code, k=0, jt=0, jf=0):
        prog.append([code, jt, jf, k])

    ins(ld_abs, 4)                                    # seccomp_data.arch
    ins(jeq, arch, jt=1, jf=0)
    ins(ret, SECCOMP_RET_KILL_PROCESS)
    ins(ld_abs, 0)                                    # seccomp_data.nr
    if platform.machine() == "x86_64":
        ins(jge, 0x40000000, jt="eperm")              # x32 ABI
    for n in nr["deny"]:
        ins(jeq, n, jt="eperm")
    ins(jeq, nr["socket"], jt="sock")
    ins(jeq, nr["socketpair"], jt="sock")
    ins(jeq, nr["clone"], jt="clone")
    ins(jeq, nr["clone3"], jt="enosys")               # glibc falls back to clone()
    labels = {}
    ins(ret, SECCOMP_RET_ALLOW)
    labels["sock"] = len(prog)
    ins(ld_abs, 16)                                   # args[0] (low 32 bits): the domain
    ins(jeq, AF_UNIX, jt="allow", jf="eperm")
    labels["clone"] = len(prog)
    ins(ld_abs, 16)                                   # args[0]: the clone flags
    ins(jset, NS_FLAGS, jt="eperm", jf="allow")
    labels["allow"] = len(prog)
    ins(ret, SECCOMP_RET_ALLOW)
    labels["eperm"] = len(prog)
    ins(ret, SECCOMP_RET_ERRNO | errno.EPERM)
    labels["enosys"] = len(prog)
    ins(ret, SECCOMP_RET_ERRNO | errno.ENOSYS)
    out = b""
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        assert 0 <= jt < 256 and 0 <= jf < 256
        out += struct.pack("HBBI", code, jt, jf, k)
    return out, len(prog)


def install_seccomp():
    code, count = _seccomp_program()
    buf = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(count, ctypes.addressof(buf))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0),
           "seccomp", "prctl(PR_SET_SECCOMP)")


# ---------------------------------------------------------------------------------------------
# the new root


_ST_TO_MS = ((os.ST_RDONLY, MS_RDONLY), (os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV),
             (os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, MS_NOATIME),
             (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))


def _mount_flags(path):
    """The flags a bind remount of ``path`` must keep (those locked by a user namespace)."""
    f = os.statvfs(path).f_flag
    return sum(ms for st, ms in _ST_TO_MS if f & st)


def _unescape(field):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts_under(target):
    with open("/proc/self/mountinfo") as f:
        points = [_unescape(line.split()[4]) for line in f]
    prefix = target.rstrip("/") + "/"
    return [p for p in points if p == target or p.startswith(prefix)]


def _ensure(path, is_dir=True):
    """Create ``path`` (directories above it too) if missing; returns True if it exists."""
    if os.path.lexists(path):
        return True
    parent = os.path.dirname(path)
    if parent != path:
        _ensure(parent, True)
    if is_dir:
        os.mkdir(path, 0o755)
    else:
        with open(path, "w"):
            pass
    return True


def bind_ro(src, dst):
    is_dir = os.path.isdir(src)
    _ensure(dst, is_dir)
    mount(src, dst, None, MS_BIND | MS_REC, stage="bind")
    # every mount below (the bind is recursive) becomes read-only, nosuid and nodev as well
    for point in sorted(set(_mounts_under(dst)), key=len):
        try:
            flags = _mount_flags(point)
        except OSError:
            continue
        mount(None, point, None,
              MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | flags, stage="bind")


def setup_root(cfg):
    stage = cfg["stage_dir"]
    mount(None, "/", None, MS_REC | MS_PRIVATE, stage="root")
    mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,nr_inodes=4096,mode=0755",
          stage="root")
    # scratch: one size-limited tmpfs behind the work dir, /tmp and /dev/shm
    scratch = os.path.join(stage, ".scratch")
    os.mkdir(scratch)
    mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={cfg['disk_mb']}m,nr_inodes=65536,mode=0755", stage="scratch")
    uid = cfg["inner_uid"]
    for name, mode in (("work", 0o700), ("tmp", 0o1777), ("shm", 0o1777)):
        p = os.path.join(scratch, name)
        os.mkdir(p)
        os.chmod(p, mode)
        os.chown(p, uid, uid)
    main = os.path.join(scratch, "work", "main.py")
    with open(main, "w", encoding="utf-8") as f:
        f.write(cfg["source"])
    os.chown(main, uid, uid)

    # the private work dir and /tmp first: exposed trees that lie below them (a virtual
    # environment under /tmp) are then mounted on top, read-only
    for name, target in (("work", cfg["work_dir"]), ("tmp", cfg["tmp_dir"])):
        if target:
            _ensure(stage + target)
            mount(os.path.join(scratch, name), stage + target, None, MS_BIND, stage="scratch")

    masks = []
    for kind, path, src in cfg["plan"]:  # sorted by depth: a mask comes before binds inside it
        dst = stage + path
        if kind == "symlink":
            if not os.path.lexists(dst):
                _ensure(os.path.dirname(dst))
                os.symlink(src, dst)
        elif kind == "ro":
            bind_ro(src, dst)
        elif kind == "mask" and os.path.isdir(dst):
            mount("tmpfs", dst, "tmpfs", MS_NOSUID | MS_NODEV, "size=16k,mode=0755",
                  stage="mask")
            masks.append(dst)
    for dst in masks:
        mount(None, dst, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV,
              "size=16k,mode=0755", stage="mask")

    # /dev: a tmpfs with the harmless devices bound in
    dev = os.path.join(stage, "dev")
    _ensure(dev)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, "size=64k,mode=0755", stage="dev")
    for name in ("null", "zero", "full", "random", "urandom"):
        if os.path.exists("/dev/" + name):
            _ensure(os.path.join(dev, name), False)
            mount("/dev/" + name, os.path.join(dev, name), None, MS_BIND, stage="dev")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, os.path.join(dev, name))
    os.mkdir(os.path.join(dev, "shm"))
    mount(os.path.join(scratch, "shm"), os.path.join(dev, "shm"), None, MS_BIND, stage="dev")
    mount(None, dev, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID, "size=64k,mode=0755", stage="dev")
    _check(_libc.umount2(_b(scratch), MNT_DETACH), "scratch", "umount2(scratch)")
    os.rmdir(scratch)

    # /etc: generated files plus a short allowlist of the host's (read-only)
    etc = os.path.join(stage, "etc")
    _ensure(etc)
    files = {
        "passwd": f"root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
                  f"sandbox:x:{SANDBOX_UID}:{SANDBOX_UID}:sandbox:{cfg['work_dir']}:/bin/sh\n"
                  "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        "group": f"root:x:0:\nsandbox:x:{SANDBOX_UID}:\nnogroup:x:65534:\n",
        "hosts": "127.0.0.1 localhost\n::1 localhost\n",
        "hostname": "sandbox\n",
    }
    for name, text in files.items():
        with open(os.path.join(etc, name), "w") as f:
            f.write(text)
    for name in cfg["etc"]:
        src = "/etc/" + name
        if os.path.islink(src):
            os.symlink(os.readlink(src), os.path.join(etc, name))
        elif os.path.exists(src):
            bind_ro(src, os.path.join(etc, name))

    proc = os.path.join(stage, "proc")
    _ensure(proc)
    try:  # only the processes of the sandbox (no /proc/sys, /proc/kcore, ...)
        mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "subset=pid",
              stage="proc")
    except Failure:  # kernels before 5.8: a full /proc of the new PID namespace
        mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, stage="proc")

    os.chdir(stage)
    _check(_libc.syscall(_PIVOT_ROOT[platform.machine()], b".", b"."), "pivot_root",
           "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "pivot_root", "umount2(old root)")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV,
          "size=4m,nr_inodes=4096,mode=0755", stage="root")
    name = b"sandbox"
    _check(_libc.sethostname(name, len(name)), "uts", "sethostname")


_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}


# ---------------------------------------------------------------------------------------------
# the user program


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def user_main(cfg, st):
    """Runs in the child of the init; ends in execve or os._exit(127)."""
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM,
                    signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        if cfg["inner_uid"] != 0:  # the caller is root: leave uid 0 of the first namespace
            os.setgroups([])
            os.setresgid(cfg["inner_uid"], cfg["inner_uid"], cfg["inner_uid"])
            os.setresuid(cfg["inner_uid"], cfg["inner_uid"], cfg["inner_uid"])
        prctl(PR_SET_DUMPABLE, 1, stage="user")  # to write its own uid_map
        uid, gid = os.geteuid(), os.getegid()
        # a nested user namespace (and mount namespace: the mounts become locked); uid 1000
        # there is not its root, so execve leaves the program without capabilities
        _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "user", "unshare(nested)")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{SANDBOX_UID} {uid} 1\n")
        _write("/proc/self/gid_map", f"{SANDBOX_UID} {gid} 1\n")
        os.setsid()
        for name, value in cfg["rlimits"].items():
            lim = getattr(resource, name)
            soft, hard = value if isinstance(value, list) else (value, value)
            cur_hard = resource.getrlimit(lim)[1]
            if cur_hard != resource.RLIM_INFINITY:  # hard limits can only be lowered
                hard = min(hard, cur_hard)
            resource.setrlimit(lim, (min(soft, hard), hard))
        os.chdir(cfg["work_dir"])
        prctl(PR_SET_NO_NEW_PRIVS, 1, stage="user")
        if cfg["seccomp"]:
            install_seccomp()
        os.set_inheritable(st.fd, False)
        os.closerange(3, st.fd)
        os.closerange(st.fd + 1, 65536)
        os.execve(cfg["python"], cfg["argv"], cfg["env"])
    except Failure as exc:
        st.send(error=str(exc), stage=exc.stage)
    except BaseException as exc:  # noqa: BLE001 - reported to the caller
        st.send(error=f"{type(exc).__name__}: {exc}", stage="user")
    os._exit(127)


# ---------------------------------------------------------------------------------------------
# the init (PID 1)


def _sandbox_pss_kb():
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or name == "1":
            continue
        try:
            with open(f"/proc/{name}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            continue
    return total


def init_main(cfg, st, life_r):
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, stage="init")
        prctl(PR_SET_DUMPABLE, 0, stage="init")
        if select.select([life_r], [], [], 0)[0]:  # the helper is already gone
            os._exit(1)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        setup_root(cfg)
        upid = os.fork()
        if upid == 0:
            user_main(cfg, st)
        st.send(started=True)
    except Failure as exc:
        st.send(error=str(exc), stage=exc.stage)
        os._exit(1)
    except BaseException as exc:  # noqa: BLE001
        st.send(error=f"{type(exc).__name__}: {exc}", stage="init")
        os._exit(1)

    # stay alive only as a reaper: nothing from the user program can signal (init ignores
    # signals it has no handler for), trace (not dumpable) or outlive it
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    limit_kb = cfg["memory_mb"] * 1024
    while True:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == 0:
                break
            if pid == upid:
                cpu = usage.ru_utime + usage.ru_stime
                if os.WIFSIGNALED(status):
                    st.send(signal=os.WTERMSIG(status), cpu=cpu)
                else:
                    st.send(exit=os.WEXITSTATUS(status), cpu=cpu)
                os._exit(0)  # the kernel kills whatever is left in the namespace
        if _sandbox_pss_kb() > limit_kb:
            st.send(killed="memory")
            os._exit(0)
        signal.sigtimedwait({signal.SIGCHLD}, 0.05)


# ---------------------------------------------------------------------------------------------
# the helper


_init_pid = None


def _stop(signum, frame):
    if _init_pid is None:
        os._exit(1)
    try:
        os.kill(_init_pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv):
    global _init_pid
    cfg_fd, st_fd = int(argv[1]), int(argv[2])
    st = Status(st_fd)
    try:
        signal.signal(signal.SIGUSR1, _stop)
        signal.signal(signal.SIGTERM, _stop)
        cfg_file = open(cfg_fd, "rb")
        cfg = json.loads(cfg_file.readline())
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, stage="helper")
        if os.getppid() != cfg["caller_pid"]:
            os._exit(1)
        if cfg["seccomp"] and not seccomp_available():
            raise Failure("seccomp", f"no seccomp filter for {platform.machine()}")
        flags = (CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC
                 | CLONE_NEWUTS | CLONE_NEWCGROUP)
        _check(_libc.unshare(flags), "unshare", "unshare(user, mount, pid, net, ipc, uts, cgroup)")
        st.send(ready=True)
        if cfg_file.readline().strip() != b"go":
            os._exit(1)
        cfg_file.close()
        if os.getuid() != 0:
            raise Failure("uidmap", "the uid map of the new user namespace was not written")
        life_r, life_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(life_w)
            init_main(cfg, st, life_r)
            os._exit(1)
        _init_pid = pid
        os.close(life_r)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        if os.WIFSIGNALED(status):
            st.send(init_signal=os.WTERMSIG(status))
    except Failure as exc:
        st.send(error=str(exc), stage=exc.stage)
        os._exit(1)
    except BaseException as exc:  # noqa: BLE001
        st.send(error=f"{type(exc).__name__}: {exc}", stage="helper")
        os._exit(1)
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
