"""Long steps in a background process: a reader thread, a Qt timer in the GUI, cancel kills the tree.

One class serves the GUI and tests/batch: ``start(waitForCompletion=True)`` reads
the output on the calling thread and returns when the process ends (tests,
headless batch); ``waitForCompletion=False`` returns at once, a thread reads the
output into a queue and a ``qt.QTimer`` delivers it to the callbacks on the GUI
thread, so the GUI never freezes. ``cancel()`` kills the process and every
process it started (model runners start worker pools).

Qt is imported only in the GUI path, so this module works under ``slicer-core``.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .runner import ERROR, PROGRESS

MODULE_ROOT = Path(__file__).resolve().parents[1]   # holds LungAtlasLib and LungAtlasMRML
RUNNER = Path(__file__).resolve().parent / "runner.py"


def python_executable() -> str:
    """PythonSlicer inside the Slicer application (Slicer's environment), else this interpreter."""
    slicer = sys.modules.get("slicer")
    if slicer is not None and getattr(slicer, "app", None) is not None:
        import shutil

        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def runner_command(step: str, *arguments: str, plugins=()) -> list[str]:
    command = [python_executable(), str(RUNNER)]
    for plugin in plugins:
        command += ["--plugin", plugin]
    return command + [step, *arguments]


@dataclass
class ProcessResult:
    returncode: int | None = None
    cancelled: bool = False
    error: str = ""                       # the last LUNGATLAS-ERROR line
    log: list[str] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0 and not self.cancelled


class BackgroundProcess:
    """Runs one command; callbacks: ``log(text)``, ``progress(percent, message)``, ``completed(ProcessResult)``."""

    POLL_MS = 200

    def __init__(self, command: list[str], env: dict | None = None,
                 logCallback: Callable[[str], None] | None = None,
                 progressCallback: Callable[[float, str], None] | None = None,
                 completedCallback: Callable[[ProcessResult], None] | None = None):
        self.command = [str(c) for c in command]
        self.env = env
        self.logCallback = logCallback
        self.progressCallback = progressCallback
        self.completedCallback = completedCallback
        self.result = ProcessResult()
        self.proc: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._timer = None
        self._finished = False

    # -- starting ------------------------------------------------------
    def _environment(self) -> dict:
        env = dict(os.environ)
        env.update(self.env or {})
        paths = [str(MODULE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def start(self, waitForCompletion: bool = False) -> "BackgroundProcess":
        logging.info("LungAtlas: starting %s", " ".join(self.command))
        popen_options = {}
        if os.name == "posix":
            popen_options["start_new_session"] = True   # own process group: cancel reaches every child
        else:
            popen_options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace",
                                     env=self._environment(), **popen_options)
        if waitForCompletion:
            for line in self.proc.stdout:
                self._handle_line(line.rstrip("\n"))
            self.proc.wait()
            self._finish()
        else:
            self._thread = threading.Thread(target=self._read_output, daemon=True)
            self._thread.start()
            import qt  # GUI path only

            self._timer = qt.QTimer()
            self._timer.setInterval(self.POLL_MS)
            self._timer.connect("timeout()", self._poll)
            self._timer.start()
        return self

    # -- output --------------------------------------------------------
    def _read_output(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self.proc.wait()
        self._queue.put(None)   # end of output

    def _poll(self) -> None:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self._timer.stop()
                self._finish()
                return
            self._handle_line(line)

    def _handle_line(self, line: str) -> None:
        self.result.log.append(line)
        if line.startswith(PROGRESS):
            parts = line.split(" ", 2)
            try:
                percent = float(parts[1])
            except (IndexError, ValueError):
                percent = 0.0
            if self.progressCallback:
                self.progressCallback(percent, parts[2] if len(parts) > 2 else "")
            return
        if line.startswith(ERROR):
            self.result.error = line[len(ERROR):].strip()
        if self.logCallback:
            self.logCallback(line)
        else:
            logging.info(line)

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self.proc is not None:
            self.result.returncode = self.proc.returncode
        if self.completedCallback:
            self.completedCallback(self.result)

    # -- state and cancel ----------------------------------------------
    def isRunning(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cancel(self) -> None:
        """Kill the process and all its descendants; ``completed`` then reports ``cancelled``."""
        if self.proc is None:
            return
        self.result.cancelled = True
        _kill_tree(self.proc)
        if self._timer is None:      # wait mode or never started: nothing else will finish it
            self.proc.wait()


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        import psutil
    except ImportError:
        psutil = None
    victims = []
    if psutil is not None:
        try:
            victims = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            victims = []
    if os.name == "posix":
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # the whole group started with start_new_session
        except (ProcessLookupError, PermissionError):
            pass
    else:
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True)
    for child in victims:   # descendants that left the group (own sessions)
        try:
            child.kill()
        except Exception:
            pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    if psutil is not None and victims:
        # SIGKILL is delivered asynchronously: wait (briefly) until the descendants are
        # really gone, so that cancel returns with no model still holding memory or a GPU.
        psutil.wait_procs(victims, timeout=10)
