"""A background thread that owns an engine: commands in, steps run, outputs out.

All engine state is touched by this thread only. Callers (gRPC handlers, the offline API) post
commands with ``call()`` (runs between steps, result returned through a future) and receive per-request
outputs from the queue they registered. The loop sleeps when idle and wakes on the next command.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineLoop:
    def __init__(self, step: Callable[[], bool], name: str = "engine-loop", idle_hook: Callable[[], None] | None = None) -> None:
        """``step()`` runs one engine iteration and returns True when there may be more work."""
        self._step = step
        self._idle_hook = idle_hook
        self._commands: queue.Queue[tuple[Callable[[], Any], Future] | None] = queue.Queue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def call(self, fn: Callable[[], T], timeout: float | None = 30.0) -> T:
        """Run ``fn`` on the loop thread between steps and return its result (or raise its error)."""
        fut: Future = Future()
        if self._stopped.is_set():
            raise RuntimeError("engine loop is stopped")
        self._commands.put((fn, fut))
        return fut.result(timeout=timeout)

    def post(self, fn: Callable[[], Any]) -> Future:
        fut: Future = Future()
        self._commands.put((fn, fut))
        return fut

    def stop(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        self._commands.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def _drain(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            fn, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # the caller gets the error; the loop lives on
                    fut.set_exception(e)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        busy = False
        try:
            while not self._stopped.is_set():
                self._drain(block=not busy)
                if self._stopped.is_set():
                    break
                busy = self._step()
                if not busy and self._idle_hook is not None:
                    self._idle_hook()
        except BaseException as e:  # a step crashed: record it so health turns NOT_SERVING
            log.exception("engine loop crashed")
            self.error = e
        finally:
            self._stopped.set()
            # Fail everything still queued so no caller waits forever.
            while True:
                try:
                    item = self._commands.get_nowait()
                except queue.Empty:
                    break
                if item is not None and not item[1].done():
                    item[1].set_exception(RuntimeError("engine loop stopped"))
