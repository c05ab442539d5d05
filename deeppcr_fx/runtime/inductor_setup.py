"""Inductor's C++ vector-ISA probe, remembered across processes.

Before it generates its first CPU kernel in a process, inductor checks which SIMD ISAs the host
toolchain can use (``torch/_inductor/cpu_vec_isa.py``: ``VecISA.check_build``): per candidate ISA it
compiles a small C++ program with g++ and loads it in a child Python. On this project's CPU
(AVX-512 with bf16 and VNNI) that is six programs: about 2 s per process when their ``.so`` files
are already in inductor's cache directory, about 16 s when it is empty
(``benchmarks/results/compile_time_cpu.txt``).

The answer depends only on the machine, the compiler and the torch build, so ``install()`` wraps
``VecISA.check_build``: a probe that succeeded once is remembered in a small JSON file
(``cache_path()``) under a key made of the CPU's flags, the compiler (path and ``-v`` output),
torch's version and location, the ISA's name and flags and the test program's text; later processes
read the answer instead of compiling and loading. A key that is not in the file (another machine,
compiler or torch), an unreadable or corrupt file, or any error computing the key: inductor probes as
before. Only successes are stored (a failure can be transient: a probe that timed out under load), so
a failing probe is retried in every process, as inductor does.

``DEEPPCR_ISA_CACHE``: the file's path; empty disables the file.

Tried and dropped: running inductor's ISA selection in a background thread beside the trace (for the
first process on a machine). The probes are g++ and child processes, but on 2 shared cores they only
competed with the trace and lowering: first calls took 63-69 s against 25-29 s probing in line
(load 4-7; compile_time_cpu.txt).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import sys
import tempfile
import threading
from typing import Callable, Optional

import torch

FORMAT = 1
MAX_ENTRIES = 256  # keys kept in the file (newest last); more machines/compilers than that: the oldest go

_LOCK = threading.Lock()  # install state
_PROBE_LOCK = threading.Lock()  # one probe at a time in a process
_MEMO: dict = {}  # in-process: entry key -> bool
_PATCHED: list = []  # [original check_build] once installed


def cache_path() -> Optional[str]:
    """The file remembered probes live in: ``$DEEPPCR_ISA_CACHE`` if set (empty: none), else
    ``$XDG_CACHE_HOME/deeppcr_fx/inductor_vec_isa.json`` (``~/.cache`` without XDG_CACHE_HOME). It is
    not inside inductor's cache directory: the answer is a property of the machine, not of a cache."""
    env = os.environ.get("DEEPPCR_ISA_CACHE")
    if env is not None:
        return env or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "deeppcr_fx", "inductor_vec_isa.json")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("flags", "Features", "features"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.lru_cache(maxsize=None)
def _machine(compiler: str) -> str:
    """Everything a probe's answer depends on besides the ISA and the program (one ``g++ -v`` per
    process and compiler)."""
    import shutil

    from torch._inductor.cpp_builder import get_compiler_version_info

    version = get_compiler_version_info(compiler)
    if not version:
        raise RuntimeError(f"no version for compiler {compiler!r}")
    return json.dumps([sys.platform, platform.machine(), _cpu_flags(), compiler,
                       os.path.realpath(shutil.which(compiler) or compiler), version,
                       torch.__version__, os.path.dirname(torch.__file__), torch.version.git_version])


def entry_key(isa, code: str) -> str:
    """The file's key of ``isa.check_build(code)`` on this machine (raises when it cannot be formed)."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    parts = [_machine(get_cpp_compiler()), type(isa).__name__, str(isa), isa.build_arch_flags(), code]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _read(path: Optional[str]) -> list:
    """The file's keys; empty when there is no file or it is unreadable, corrupt or of another format."""
    if not path:
        return []
    try:
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("ok"), list):
            return [k for k in data["ok"] if isinstance(k, str)]
    except (OSError, ValueError):
        pass
    return []


def _write(path: Optional[str], key: str) -> None:
    """Add ``key`` to the file (atomic replace; errors ignored: the file is only a shortcut)."""
    if not path:
        return
    try:
        keys = [k for k in _read(path) if k != key] + [key]
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".isa_", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT, "ok": keys[-MAX_ENTRIES:]}, f)
        os.replace(tmp, path)
    except OSError:
        pass


def remembered_check(isa, code: str, probe: Callable) -> bool:
    """``probe(isa, code)`` (inductor's check_build), or its remembered success."""
    try:
        key = entry_key(isa, code)
    except Exception:  # noqa: BLE001 - no key, no shortcut: probe as inductor does
        return probe(isa, code)
    with _PROBE_LOCK:  # one probe at a time; a second caller of the same probe waits and reads the memo
        if key in _MEMO:
            return _MEMO[key]
        path = cache_path()
        if key in _read(path):
            ok = True
        else:
            ok = bool(probe(isa, code))
            if ok:
                _write(path, key)
        _MEMO[key] = ok
        return ok


def install() -> None:
    """Wrap inductor's ``VecISA.check_build`` with ``remembered_check`` (once per process; nothing when
    this torch has no such method)."""
    with _LOCK:
        if _PATCHED:
            return
        try:
            from torch._inductor import cpu_vec_isa
            probe = cpu_vec_isa.VecISA.check_build
        except (ImportError, AttributeError):
            _PATCHED.append(None)
            return

        def check_build(self, code: str) -> bool:
            return remembered_check(self, code, probe)

        check_build.__doc__ = probe.__doc__
        cpu_vec_isa.VecISA.check_build = check_build
        _PATCHED.append(probe)


def uninstall() -> None:
    """Undo ``install`` and forget the in-process memo (tests; inductor's own caches are not cleared)."""
    with _LOCK, _PROBE_LOCK:
        if _PATCHED and _PATCHED[0] is not None:
            from torch._inductor import cpu_vec_isa
            cpu_vec_isa.VecISA.check_build = _PATCHED[0]
        _PATCHED.clear()
        _MEMO.clear()
