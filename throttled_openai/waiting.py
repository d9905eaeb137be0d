"""How a caller waits: the one thing that differs between a thread and an asyncio task.

Every limiter operation that may wait (``acquire``, and in the Redis limiter each call to Redis) is
written once, as a generator that does its arithmetic under the limiter's lock and *yields a step*
whenever it has to wait, with the lock released. A driver runs it: :func:`drive` blocks the calling
thread in each step, :func:`adrive` awaits each step on the caller's event loop. A step's outcome is
sent back into the generator; an exception raised while waiting (a timeout, Ctrl-C, a task's
``CancelledError``) is thrown into it at the yield, so that its ``finally`` gives back what it held.

A caller is woken by its :class:`Waiter`: a ``threading.Event`` for a thread, a future resolved on its
own loop for a task (``call_soon_threadsafe`` when the waker runs on another thread). Threads and tasks
on any number of loops can so share one limiter: the state and the lock are one; only the wait differs.
"""

from __future__ import annotations

import abc
import asyncio
import math
import threading
from typing import Any, Callable, Generator, Optional, TypeVar

__all__ = ["Step", "Steps", "TaskWaiter", "ThreadWaiter", "Wait", "Waiter", "adrive", "drive"]

_T = TypeVar("_T")


class Step(abc.ABC):
    """Something an operation waits for, with the limiter's lock released: :meth:`block` does it on a
    thread, :meth:`wait` on an event loop. Both return the same outcome or raise the same error."""

    __slots__ = ()

    @abc.abstractmethod
    def block(self) -> Any: ...

    @abc.abstractmethod
    async def wait(self) -> Any: ...


#: A limiter operation: yields steps, receives their outcomes, returns its result.
Steps = Generator[Step, Any, _T]


class Waiter(abc.ABC):
    """How one caller is told that its turn came, or that the state it waits on changed. ``set`` may be
    called from any thread (always under the limiter's lock); ``clear`` only by the caller itself.
    ``deposed``: the limiter gave up on this caller (its event loop was closed while it waited): its turn
    went to the next one, and its own clean-up, whenever it runs, must not pass it on again."""

    __slots__ = ("deposed",)

    def __init__(self) -> None:
        self.deposed = False

    @abc.abstractmethod
    def set(self) -> bool:
        """Wake the caller; ``False`` if it can never wake (its event loop is closed)."""

    @abc.abstractmethod
    def clear(self) -> None: ...

    @abc.abstractmethod
    def is_set(self) -> bool: ...

    def dead(self) -> bool:
        """Whether nothing can ever wake this caller again."""
        return False


class ThreadWaiter(Waiter):
    """A thread's waiter: an Event."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        super().__init__()
        self._event = threading.Event()

    def set(self) -> bool:
        self._event.set()
        return True

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    def block(self, seconds: Optional[float]) -> bool:
        return self._event.wait(seconds)


class TaskWaiter(Waiter):
    """A task's waiter: a future of the loop the task runs on, resolved there. Made inside the task.

    From another thread the wake goes through ``call_soon_threadsafe`` (a closed loop raises there:
    ``set`` then says the caller can never wake). A future already cancelled (the task was cancelled
    as it was woken) is left alone: the task's own clean-up passes its turn on.
    """

    __slots__ = ("_flag", "_future", "_loop", "_thread")

    def __init__(self) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._future: asyncio.Future[None] = self._loop.create_future()
        self._flag = False

    def set(self) -> bool:
        self._flag = True
        if self._loop.is_closed():
            return False
        if threading.get_ident() == self._thread:
            self._resolve()
            return True
        try:
            self._loop.call_soon_threadsafe(self._resolve)
        except RuntimeError:  # the loop is closed: nothing waits on it any more
            return False
        return True

    def _resolve(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    def clear(self) -> None:
        self._flag = False
        if self._future.done():
            self._future = self._loop.create_future()

    def is_set(self) -> bool:
        return self._flag

    def dead(self) -> bool:
        return self._loop.is_closed()

    async def wait(self, seconds: Optional[float]) -> bool:
        if not self._flag and seconds != 0:
            if self._future.done():  # resolved by a wake that came before the last clear, or a timer
                self._future = self._loop.create_future()
            timer = None if seconds is None else self._loop.call_later(seconds, self._resolve)
            try:
                await self._future
            finally:
                if timer is not None:
                    timer.cancel()
        return self._flag


class Wait(Step):
    """Wait until ``waiter`` is set or ``seconds`` pass (``None``: no limit); the outcome is whether it
    was set. ``sleep``: a limiter's injected sleep (a fake clock in tests), used instead on threads."""

    __slots__ = ("seconds", "sleep", "waiter")

    def __init__(self, waiter: Waiter, seconds: Optional[float], sleep: Optional[Callable[[float], None]] = None):
        self.waiter = waiter
        self.seconds = None if seconds is None or seconds == math.inf else max(0.0, seconds)
        self.sleep = sleep

    def block(self) -> bool:
        assert isinstance(self.waiter, ThreadWaiter), "a thread waits on a ThreadWaiter"
        if self.sleep is not None and self.seconds is not None:
            self.sleep(self.seconds)
            return self.waiter.is_set()
        return self.waiter.block(self.seconds)

    async def wait(self) -> bool:
        assert isinstance(self.waiter, TaskWaiter), "a task waits on a TaskWaiter"
        return await self.waiter.wait(self.seconds)


class _Done:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _resume(steps: Steps[Any], outcome: Any, error: Optional[BaseException]) -> Any:
    """Run the operation up to its next step (returned), or to its end (a ``_Done``)."""
    try:
        return steps.throw(error) if error is not None else steps.send(outcome)
    except StopIteration as end:
        return _Done(end.value)


def drive(steps: Steps[_T]) -> _T:
    """Run a limiter operation on this thread, blocking in each of its steps."""
    try:
        step = _resume(steps, None, None)
        while not isinstance(step, _Done):
            try:
                outcome = step.block()
            except BaseException as error:  # into the operation, to give back what it holds
                step = _resume(steps, None, error)
            else:
                step = _resume(steps, outcome, None)
        return step.value  # type: ignore[no-any-return]
    finally:
        steps.close()  # (interrupted between two steps: its clean-up runs now, not when collected)


async def adrive(steps: Steps[_T]) -> _T:
    """Run a limiter operation in this task, awaiting each of its steps."""
    try:
        step = _resume(steps, None, None)
        while not isinstance(step, _Done):
            try:
                outcome = await step.wait()
            except BaseException as error:  # CancelledError included: the operation cleans up, re-raises
                step = _resume(steps, None, error)
            else:
                step = _resume(steps, outcome, None)
        return step.value  # type: ignore[no-any-return]
    finally:
        steps.close()
