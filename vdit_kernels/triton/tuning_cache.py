"""What the Triton backend measured (autotuned tiles, measured variants) kept on disk
between processes, opt-in: VDIT_TUNING_CACHE=DIR (or 1: ~/.cache/vdit_kernels).

The first call per key times candidates: on an H100 the first attention backward of a
shape autotuned for about 80 s (the dK/dV, dQ and atomic-dQ kernels of each strategy
and read variant it measures), the forward about 15 s (2026-11-27). With the cache set a
process reads what earlier ones picked and times only keys they did not meet, then adds
its own picks when it exits (atexit: a normal exit, or SIGTERM where a handler turns it
into one, as benchmarks.run does; not SIGKILL).

One JSON file per GPU model, torch and Triton release and version of this package's
sources the picks depend on (a hash of triton/*.py, cuda/*.py and pack.py): a pick is never
reused for a kernel it was not measured for. Processes that exit together (torchrun's
ranks) merge their picks one at a time (an exclusive lock beside the file, where the file
system has locks). A cache that cannot be used (no home folder, a folder that cannot be
written) is said once on stderr and never fails a call. Within a file, entries are named
by section (an autotuner's name, a variant's environment variable) and the key the choice
was measured for. Triton's own
on-disk autotuning cache (TRITON_CACHE_AUTOTUNING) cannot serve these kernels: it skips
autotuners with pre-hooks (the TMA variants) and does not tell the attention's size
classes apart.
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
import triton

from ..checks import env_switch

_ENV = "VDIT_TUNING_CACHE"
_PACKAGE = Path(__file__).resolve().parent.parent
# what the measured kernels and variants run: the Triton sources, the CUDA gather / scatter
# the patch GEMMs' "gemm" variant calls, the launch tables
_SOURCES = ("triton/*.py", "cuda/*.py", "pack.py")

# in memory: the file's entries (read once) and this process's picks, by section
_STATE: dict = {"path": None, "entries": None, "new": {}}
_PREFILLED: set = set()
# picks of earlier processes this one used: (section, key text)
USED: list = []


_WARNED: set = set()


def _warn_once(what: str) -> None:
    if what not in _WARNED:
        _WARNED.add(what)
        print(f"vdit_kernels: {_ENV}: {what}", file=sys.stderr)


def cache_path() -> Optional[Path]:
    """The cache file for this process's GPU and releases, or None when VDIT_TUNING_CACHE
    is unset, empty or 0 / false / off / no (1 / true / on / yes: ~/.cache/vdit_kernels;
    anything else: that folder), or names a home folder there is none of."""
    setting = os.environ.get(_ENV, "").strip()
    switch = env_switch(setting) if setting else False
    if switch is False:
        return None
    try:
        folder = Path.home() / ".cache" / "vdit_kernels" if switch else Path(setting).expanduser()
    except (RuntimeError, KeyError, OSError) as exc:  # no HOME, no passwd entry (containers, batch jobs)
        _warn_once(f"off: no home folder to put it in ({exc}); set it to a folder")
        return None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    name = f"{gpu}-torch{torch.__version__}-triton{triton.__version__}-{sources_digest()}"
    return folder / (re.sub(r"[^A-Za-z0-9.+]+", "-", name).strip("-") + ".json")


@functools.lru_cache(maxsize=None)
def sources_digest() -> str:
    """16 hex digits of a hash of the sources the picks depend on (_SOURCES)."""
    digest = hashlib.sha256()
    for source in sorted(f for pattern in _SOURCES for f in _PACKAGE.glob(pattern)):
        digest.update(str(source.relative_to(_PACKAGE)).encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


def _entries() -> Optional[dict]:
    """The cache file's entries {section: {key text: value}}, read on first use; None
    when the cache is off. A file that cannot be read counts as empty."""
    path = cache_path()
    if path is None:
        return None
    if _STATE["path"] != path:
        _STATE["path"], _STATE["entries"], _STATE["new"] = path, _read(path), {}
    return _STATE["entries"]


def _read(path: Path) -> dict:
    """The file's sections that have the expected form ({section: {key text: value}}); a
    file that cannot be read, or anything else in it, is ignored: a cache never fails a call."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # (RecursionError: a pathologically nested file)
        return {}
    if not isinstance(data, dict):
        return {}
    return {section: values for section, values in data.items() if isinstance(values, dict)}


def _key_text(key) -> str:
    return repr(key)  # tuples of ints, strings, dtypes and devices: their repr is stable


def recall(section: str, key):
    """The value saved for (section, key), or None."""
    entries = _entries()
    if entries is None:
        return None
    value = entries.get(section, {}).get(_key_text(key))
    if value is not None:
        USED.append((section, _key_text(key)))
    return value


def remember(section: str, key, value) -> None:
    """Keeps (section, key) -> value (JSON) for save() when the cache is on."""
    entries = _entries()
    if entries is None:
        return
    text = _key_text(key)
    if entries.get(section, {}).get(text) != value:
        entries.setdefault(section, {})[text] = value
        _STATE["new"].setdefault(section, {})[text] = value


def _config_record(config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
            "maxnreg": getattr(config, "maxnreg", None)}


def prefill(name: str, tuner) -> None:
    """Puts the tiles saved for autotuner `name` into its cache, so Triton times only keys
    no earlier process met. Once per autotuner and process (a launch path may call it
    every time: a set lookup, VDIT_TUNING_CACHE read at the first). A saved tile that is
    no longer among the tuner's configs is ignored."""
    if name in _PREFILLED:
        return
    _PREFILLED.add(name)
    if _entries() is None:
        return
    section = _STATE["entries"].get("autotune " + name, {})
    by_record = {json.dumps(_config_record(c), sort_keys=True): c for c in tuner.configs}
    for entry in section.values():
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), list):
            continue
        key = tuple(entry["key"])
        config = by_record.get(json.dumps(entry.get("config"), sort_keys=True))
        # (a key as Triton makes them: ints, floats, strings, bools)
        if config is None or not all(isinstance(k, (int, float, str)) for k in key) or key in tuner.cache:
            continue
        tuner.cache[key] = config
        USED.append(("autotune " + name, _key_text(key)))


def record_tuner(name: str, tuner) -> None:
    """Keeps every tile autotuner `name` picked in this process for save()."""
    for key, config in getattr(tuner, "cache", {}).items():
        remember("autotune " + name, key, {"key": list(key), "config": _config_record(config)})


def describe() -> Optional[str]:
    """One line on the cache for a report: the file, and which of its picks this process
    used instead of timing; None when the cache is off."""
    path = cache_path()
    if path is None:
        return None
    used = ", ".join(f"{section} {key}" for section, key in USED) or "none"
    return f"{_ENV}: {path}; picks of earlier processes used instead of timing: {used}"


def save() -> Optional[Path]:
    """Writes this process's new picks into the cache file (merged with what other
    processes wrote there since; one atomic rename). Returns the file, or None when
    there was nothing to write."""
    if _entries() is None:
        return None
    # the autotuners of the modules this process loaded
    attention, patch = (sys.modules.get(f"{__package__}.{m}") for m in ("attention", "patch"))
    for name, tuner in (attention.named_tuners() if attention else {}).items():
        record_tuner(name, tuner)
    if patch is not None:
        record_tuner("patch_embed", patch._embed_tuned)
        record_tuner("patch_embed tma", patch._embed_tuned_tma)
    path, new = _STATE["path"], _STATE["new"]
    if not new:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):  # read, merge and replace as one step among processes saving together
        merged = _read(path)
        for section, values in new.items():
            merged.setdefault(section, {}).update(values)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(merged, f, indent=1, sort_keys=True)
            umask = os.umask(0)  # (mkstemp makes the file 0600 whatever the umask: others could not read it)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):  # a failed write (disk full, quota): no partial file left behind
                os.unlink(tmp)
    _STATE["new"] = {}
    return path


class _locked:
    """An exclusive lock on <path>.lock for the duration (fcntl.flock); without one where the
    platform or file system has none (the merge is then as good as the timing of exits)."""

    def __init__(self, path: Path):
        self.lock = path.with_name(path.name + ".lock")
        self.fd = None

    def __enter__(self):
        try:
            import fcntl

            self.fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            if self.fd is not None:
                os.close(self.fd)
            self.fd = None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # (closing releases the lock)


def _save_at_exit() -> None:
    try:
        save()
    except Exception as exc:  # noqa: BLE001  (a cache write must never fail a program's exit)
        _warn_once(f"could not save this run's picks to {_STATE['path']} ({type(exc).__name__}: {exc}); "
                   "the next run times them again")


atexit.register(_save_at_exit)
