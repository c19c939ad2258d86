"""The machine a figure came from, and what else was running on it.

:func:`describe_machine` reads the CPU model, cores, memory, OS and the
versions that shape the figures (Python, ONNX Runtime, pydicom,
pynetdicom, dcmtk, Orthanc); the ``parse_*`` helpers take the text of
``/proc/cpuinfo``, ``/proc/meminfo`` and ``/etc/os-release`` so they can be
checked without the machine. :func:`busy_processes` samples ``/proc`` for
other processes using the CPU while the bench runs: a figure taken beside
a training job is not a figure of an idle machine, and the results say so.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PACKAGES = ("onnxruntime", "numpy", "pydicom", "pynetdicom", "highdicom", "opencv-python-headless")


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """CPU model, logical CPUs and physical cores from the text of ``/proc/cpuinfo``.

    Physical cores are the distinct (physical id, core id) pairs; where the
    kernel gives neither (some virtual machines) they are ``None``.
    """
    model = None
    logical = 0
    cores: set[tuple[str, str]] = set()
    physical_id = core_id = None
    flags: set[str] = set()
    for block in re.split(r"\n\s*\n", text.strip()):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "processor" not in fields:
            continue
        logical += 1
        model = model or fields.get("model name") or fields.get("Model") or fields.get("cpu model")
        physical_id, core_id = fields.get("physical id"), fields.get("core id")
        if physical_id is not None and core_id is not None:
            cores.add((physical_id, core_id))
        if not flags and "flags" in fields:
            flags = set(fields["flags"].split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni")
    return {
        "cpu_model": model or platform.processor() or "unknown",
        "logical_cpus": logical or None,
        "physical_cores": len(cores) or None,
        "cpu_flags": [flag for flag in wanted if flag in flags],
    }


def parse_meminfo(text: str) -> dict[str, float]:
    """``MemTotal`` and ``MemAvailable`` of ``/proc/meminfo``, in GiB (kB in the file)."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if key in ("MemTotal", "MemAvailable") and parts:
            found[key] = round(int(parts[0]) / 1024 / 1024, 1)
    return {"ram_gib": found.get("MemTotal", 0.0), "ram_available_gib": found.get("MemAvailable", 0.0)}


def parse_os_release(text: str) -> str:
    """``PRETTY_NAME`` of ``/etc/os-release`` (else NAME VERSION), unquoted."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip('"').strip("'")
    if "PRETTY_NAME" in values:
        return values["PRETTY_NAME"]
    return " ".join(v for v in (values.get("NAME"), values.get("VERSION")) if v) or "unknown"


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def tool_version(tool: str) -> str | None:
    """First line of ``TOOL --version`` for a system tool (dcmtk's storescp, Orthanc), or None."""
    binary = shutil.which(tool, path=SYSTEM_PATH)
    if binary is None:
        return None
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (done.stdout + done.stderr).splitlines():
        if line.strip():
            return line.strip().lstrip("$").strip()
    return None


def filesystem_of(path: Path, mounts: str | None = None) -> str:
    """The type of the file system holding ``path`` (its longest mount point in ``/proc/mounts``), e.g. ``ext4``."""
    text = _read("/proc/mounts") if mounts is None else mounts
    target = str(path.resolve())
    best, kind = "", "unknown"
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, parts[2]
    return kind


def describe_machine(workdir: Path | None = None) -> dict[str, Any]:
    """Where the figures were measured: host, CPU, cores, RAM, OS, Python and the library and tool versions."""
    machine: dict[str, Any] = {"host": socket.gethostname()}
    machine.update(parse_cpuinfo(_read("/proc/cpuinfo")))
    try:
        machine["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        machine["usable_cpus"] = os.cpu_count()
    machine.update(parse_meminfo(_read("/proc/meminfo")))
    machine["os"] = parse_os_release(_read("/etc/os-release"))
    machine["kernel"] = platform.release()
    machine["python"] = platform.python_version()
    machine["packages"] = package_versions()
    machine["dcmtk"] = tool_version("storescp")
    machine["orthanc"] = tool_version("Orthanc")
    if workdir is not None:
        machine["workdir_filesystem"] = filesystem_of(workdir)
    return machine


def machine_line(machine: Mapping[str, Any]) -> str:
    """One line naming the machine, as printed above the tables."""
    cores = machine.get("physical_cores")
    cpus = machine.get("logical_cpus")
    core_text = f"{cpus} CPUs" if not cores or cores == cpus else f"{cores} cores / {cpus} CPUs"
    packages = machine.get("packages") or {}
    return (
        f"{machine.get('host', '?')}: {machine.get('cpu_model', '?')}, {core_text}, "
        f"{machine.get('ram_gib', '?')} GiB RAM, {machine.get('os', '?')} ({machine.get('kernel', '?')}), "
        f"Python {machine.get('python', '?')}, onnxruntime {packages.get('onnxruntime') or '?'}"
    )


# ----------------------------------------------------------------------------------------- load


def _process_stats() -> Iterator[tuple[int, str, list[str]]]:
    """(pid, name, the fields after the name) of every process, from ``/proc/<pid>/stat``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        # The name is in parentheses and may hold spaces; the fields after it are space-separated.
        yield int(entry.name), text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()


def _cpu_ticks() -> dict[int, tuple[str, int]]:
    """Every process's (name, utime + stime in clock ticks)."""
    return {pid: (name, int(fields[11]) + int(fields[12])) for pid, name, fields in _process_stats()}


def _ancestry(pid: int) -> set[int]:
    """``pid`` and its descendants (the bench and what it started), from the parent links in ``/proc``."""
    children: dict[int, list[int]] = {}
    for child, _name, fields in _process_stats():
        children.setdefault(int(fields[1]), []).append(child)
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo.extend(children.get(current, []))
    return found


def busy_processes(interval_s: float = 1.0, threshold_percent: float = 10.0) -> list[dict[str, Any]]:
    """Processes outside this bench that used more than ``threshold_percent`` of one CPU over ``interval_s``."""
    if not Path("/proc/self/stat").exists():
        return []
    hertz = os.sysconf("SC_CLK_TCK")
    before = _cpu_ticks()
    time.sleep(interval_s)
    after = _cpu_ticks()
    ours = _ancestry(os.getpid())
    busy = []
    for pid, (name, ticks) in after.items():
        if pid in ours or pid not in before:
            continue
        percent = 100.0 * (ticks - before[pid][1]) / hertz / interval_s
        if percent >= threshold_percent:
            busy.append({"pid": pid, "name": name, "command": _command(pid), "cpu_percent": round(percent)})
    return sorted(busy, key=lambda p: -int(p["cpu_percent"]))


def _command(pid: int, limit: int = 72) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    text = " ".join(" ".join(word.decode(errors="replace").split()) for word in words if word)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_snapshot(interval_s: float = 1.0) -> dict[str, Any]:
    """The load averages and the other busy processes, now."""
    try:
        load = [round(value, 2) for value in os.getloadavg()]
    except OSError:
        load = []
    return {"loadavg": load, "busy_processes": busy_processes(interval_s)}


def load_line(snapshots: Iterable[Mapping[str, Any]], most: int = 5) -> str:
    """One line saying whether the machine was shared while the bench ran (from snapshots taken during the run).

    Names the ``most`` busiest other commands, each with the highest share of a CPU it was seen using.
    """
    seen: dict[str, int] = {}
    loads: list[float] = []
    for snapshot in snapshots:
        loads.extend(snapshot.get("loadavg", [])[:1])
        for process in snapshot.get("busy_processes", []):
            name = str(process.get("command") or process["name"])
            seen[name] = max(seen.get(name, 0), int(process["cpu_percent"]))
    peak = f"1-min load up to {max(loads):.2f}" if loads else "load unknown"
    if not seen:
        return f"machine not shared: no other process above 10% of a CPU while sampled ({peak})"
    ranked = sorted(seen.items(), key=lambda item: -item[1])
    others = ", ".join(f"{' '.join(name.split())} ({percent}% CPU)" for name, percent in ranked[:most])
    more = f" and {len(ranked) - most} more" if len(ranked) > most else ""
    return f"machine SHARED while measuring: {others}{more}; {peak}"


class LoadSampler:
    """Takes a :func:`load_snapshot` every ``every_s`` seconds in a daemon thread while the bench runs."""

    def __init__(self, every_s: float = 15.0) -> None:
        self.every_s = every_s
        self.snapshots: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-load-sampler", daemon=True)

    def _loop(self) -> None:
        while True:
            snapshot = load_snapshot()
            snapshot["at"] = time.strftime("%H:%M:%S")
            self.snapshots.append(snapshot)
            if self._stop.wait(self.every_s):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
