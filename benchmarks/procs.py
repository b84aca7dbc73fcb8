"""Child processes of a benchmark run: start them pinned, wait until they answer, account their CPU time and
peak memory from /proc, and stop every one of them at the end, whatever happened.

Each server is started in a session of its own, so it and all its children (nginx workers, uvicorn workers)
share one process group that is stopped by its id; nothing else on the machine is touched.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
STOP_GRACE_SECONDS = 5.0


class BenchmarkError(Exception):
    """A step of the benchmark run failed; the message says which and why."""


class StartError(BenchmarkError):
    """A server did not come up (exited, or did not answer within its deadline)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(command: Sequence[str], cpus: str | None) -> list[str]:
    """``command`` prefixed with ``taskset -c cpus`` (or unchanged when no pinning is planned)."""
    if cpus is None:
        return list(command)
    return ["taskset", "-c", cpus, *command]


@dataclass(frozen=True)
class TreeUsage:
    """CPU time and memory of a process and all its descendants at one instant."""

    cpu_seconds: float
    peak_rss_bytes: int
    process_count: int


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after the last ')'.
    # Fields from there: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    return raw[raw.rfind(")") + 2 :].split()


def process_tree(root_pid: int) -> list[int]:
    """``root_pid`` and every live descendant (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree: list[int] = []
    pending = [root_pid]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, ()))
    return tree


def _peak_rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_usage(root_pid: int) -> TreeUsage:
    """CPU seconds (user + system, including reaped children) and summed VmHWM of the tree."""
    ticks = 0
    peak = 0
    count = 0
    for pid in process_tree(root_pid):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        count += 1
        # utime, stime, cutime, cstime: a child that exited and was reaped moves its time into cutime/cstime.
        ticks += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        peak += _peak_rss_bytes(pid)
    return TreeUsage(cpu_seconds=ticks / CLOCK_TICKS_PER_SECOND, peak_rss_bytes=peak, process_count=count)


def cpu_busy_seconds(cpu: int) -> float:
    """Seconds CPU ``cpu`` spent on anything but idle/iowait since boot, steal included (from /proc/stat)."""
    prefix = f"cpu{cpu} "
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(prefix):
            fields = [int(value) for value in line.split()[1:]]
            # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user/nice]
            busy = sum(fields[:8]) - fields[3] - fields[4]
            return busy / CLOCK_TICKS_PER_SECOND
    raise OSError(f"no {prefix.strip()} line in /proc/stat")


class ManagedProcess:
    """One server started by the harness, in its own session, output going to a log file."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            self._popen = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        self.pid = self._popen.pid

    def exit_code(self) -> int | None:
        return self._popen.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def usage(self) -> TreeUsage:
        return tree_usage(self.pid)

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after a grace period; always reaps the leader."""
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=STOP_GRACE_SECONDS)
        # The leader may be gone while workers it forked linger in the group: kill what is left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=STOP_GRACE_SECONDS)


class ProcessRegistry:
    """Every server the run starts; ``stop_all`` runs in the harness's ``finally`` and on SIGTERM/SIGHUP."""

    def __init__(self) -> None:
        self._processes: list[ManagedProcess] = []

    def start(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> ManagedProcess:
        process = ManagedProcess(name, command, log_path, cwd=cwd, env=env)
        self._processes.append(process)
        return process

    def stop(self, process: ManagedProcess) -> None:
        process.stop()
        if process in self._processes:
            self._processes.remove(process)

    def stop_all(self) -> None:
        while self._processes:
            self._processes.pop().stop()


def raise_on_termination_signals() -> None:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt so the ``finally`` that stops servers runs."""

    def _interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)


@dataclass(frozen=True)
class Answer:
    status: int
    body_length: int
    headers: dict[str, str]


def http_get(port: int, path: str, headers: Sequence[tuple[str, str]] = (), timeout: float = 5.0) -> Answer:
    """One GET to 127.0.0.1:port, body read to the end."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers=dict(headers))
        response = connection.getresponse()
        body = response.read()
        return Answer(
            status=response.status,
            body_length=len(body),
            headers={name.lower(): value for name, value in response.getheaders()},
        )
    finally:
        connection.close()


def wait_until_answers(
    process: ManagedProcess,
    port: int,
    path: str,
    headers: Sequence[tuple[str, str]] = (),
    timeout: float = 30.0,
) -> Answer:
    """Poll ``GET path`` until it answers 2xx, the process exits, or ``timeout`` passes (then StartError)."""
    deadline = time.monotonic() + timeout
    last_problem = "no answer yet"
    while time.monotonic() < deadline:
        code = process.exit_code()
        if code is not None:
            raise StartError(f"{process.name} exited with code {code}:\n{process.log_tail()}")
        try:
            answer = http_get(port, path, headers, timeout=2.0)
        except (OSError, http.client.HTTPException) as exc:
            last_problem = f"{type(exc).__name__}: {exc}"
        else:
            if 200 <= answer.status < 300:
                return answer
            last_problem = f"HTTP {answer.status}"
        time.sleep(0.05)
    raise StartError(
        f"{process.name} did not answer GET {path} within {timeout:.0f} s ({last_problem}):\n{process.log_tail()}"
    )
