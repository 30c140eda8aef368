"""The engine loop in a background thread, fed by coroutines.

One thread owns the `Engine` (scheduler, KV cache, model) and steps it while there is work;
requests arrive and are cancelled through a queue, and each request's newly committed tokens
go back to its coroutine on the event loop. Tokenizing and detokenizing stay with the caller,
so the engine thread touches only the engine.

`AsyncEngine.load` builds the model on that thread too, so every torch call of the server runs
on one thread: on a CPU two threads running torch work each keep an OpenMP pool, and two pools
on the same cores slow each other (`rids.utils.openmp`, docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from rids.engine.sequence import Sequence
from rids.llm import LLM
from rids.serve.metrics import Metrics


@dataclass(slots=True)
class Update:
    """Tokens a request committed since its last update (or the error that ended it)."""

    token_ids: list[int]
    finished: bool
    error: BaseException | None = None


@dataclass(slots=True)
class Stream:
    loop: asyncio.AbstractEventLoop
    updates: asyncio.Queue[Update]
    sent: int = 0

    def put(self, update: Update) -> None:
        self.loop.call_soon_threadsafe(self.updates.put_nowait, update)


class AsyncEngine:
    def __init__(
        self,
        llm: LLM,
        metrics: Metrics | None = None,
        *,
        thread: threading.Thread | None = None,
        handoff: queue.SimpleQueue[AsyncEngine] | None = None,
    ) -> None:
        """`thread`, `handoff`: the running thread that built `llm` (`load`), waiting for the
        engine to run through `handoff`."""
        self.llm = llm
        self.metrics = metrics or Metrics(llm)
        self.inbox: queue.SimpleQueue[tuple[str, Sequence, Stream | None]] = queue.SimpleQueue()
        self.streams: dict[int, tuple[Sequence, Stream]] = {}
        self.stopping = threading.Event()
        self.thread = thread or threading.Thread(target=self.run, name="rids-engine", daemon=True)
        self.handoff = handoff

    @classmethod
    def load(cls, build: Callable[[], LLM]) -> AsyncEngine:
        """An engine whose thread builds its LLM (`build()`) and then steps it; whatever
        `build` raises is raised here."""
        built: queue.SimpleQueue[LLM | BaseException] = queue.SimpleQueue()
        handoff: queue.SimpleQueue[AsyncEngine] = queue.SimpleQueue()  # filled by start()

        def body() -> None:
            try:
                built.put(build())
            except BaseException as e:  # handed to the caller
                built.put(e)
                return
            handoff.get().run()

        thread = threading.Thread(target=body, name="rids-engine", daemon=True)
        thread.start()
        llm = built.get()
        if isinstance(llm, BaseException):
            raise llm
        return cls(llm, thread=thread, handoff=handoff)

    def start(self) -> None:
        if self.handoff is None:
            self.thread.start()
        else:
            self.handoff.put(self)

    def shutdown(self) -> None:
        self.stopping.set()
        if self.handoff is not None:
            self.handoff.put(self)  # a thread never started runs, sees `stopping` and ends
        if self.thread.ident is not None:  # an engine never started has no thread to join
            self.thread.join(timeout=30)

    @property
    def healthy(self) -> bool:
        return self.thread.is_alive()

    async def generate(self, seq: Sequence) -> AsyncIterator[list[int]]:
        """Yield `seq`'s committed tokens as steps commit them; leaving early cancels it."""
        stream = Stream(asyncio.get_running_loop(), asyncio.Queue())
        self.inbox.put(("add", seq, stream))
        finished = False
        try:
            while not finished:
                update = await stream.updates.get()
                if update.error is not None:
                    finished = True
                    raise update.error
                finished = update.finished
                yield update.token_ids
        finally:
            if not finished:  # the client went away or stopped reading (stop string)
                self.inbox.put(("abort", seq, None))

    def run(self) -> None:
        scheduler = self.llm.engine.scheduler
        while not self.stopping.is_set():
            idle = scheduler.is_finished()
            try:
                command, seq, stream = (
                    self.inbox.get(timeout=0.1) if idle else self.inbox.get_nowait()
                )
            except queue.Empty:
                if not idle:
                    self.step()
                continue
            if command == "add":
                self.add(seq, stream)
            else:  # cancelled: its pages are freed now, and it counts as an aborted request
                scheduler.abort([seq])
                if self.streams.pop(seq.seq_id, None) is not None:
                    self.metrics.finished(seq)

    def add(self, seq: Sequence, stream: Stream) -> None:
        try:
            self.llm.engine.add(seq)
        except Exception as e:  # a request the cache can never hold: the caller's error
            stream.put(Update([], True, e))
            return
        self.streams[seq.seq_id] = (seq, stream)
        self.metrics.arrived(seq)

    def step(self) -> None:
        t0 = time.perf_counter()
        try:
            self.llm.engine.step()
        except Exception as e:  # fail every request in flight; the server keeps serving
            self.metrics.errors.inc()
            seqs = [seq for seq, _ in self.streams.values()]
            self.llm.engine.scheduler.abort(seqs)
            for _, stream in self.streams.values():
                stream.put(Update([], True, e))
            self.streams.clear()
            return
        self.metrics.stepped(time.perf_counter() - t0)
        for seq_id, (seq, stream) in list(self.streams.items()):
            if seq.is_finished:  # counted before the client can see its last tokens
                del self.streams[seq_id]
                self.metrics.finished(seq)
            ids = seq.completion_ids
            if len(ids) > stream.sent or seq.is_finished:
                stream.put(Update(ids[stream.sent :], seq.is_finished))
                stream.sent = len(ids)
