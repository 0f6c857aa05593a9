"""Kernels that are compiled or interpreted according to the mode at launch time.

``@triton.jit`` decides between compiling (``JITFunction``) and interpreting
(``InterpretedFunction``) when the decorator runs, that is when the kernel
module is imported.  A test that turns ``TRITON_INTERPRET`` on after something
else imported the kernels would otherwise get compiled kernels and no GPU to
run them on, and one that leaves it on would leak the interpreter into every
later test.  :func:`jit_kernel` defers that choice to each launch: it keeps the
plain Python function and builds (once per mode) the object the current mode
needs, so turning the interpreter on for a test's duration with
``monkeypatch.setenv("TRITON_INTERPRET", "1")`` is enough.

Triton's own library functions (``tl.cdiv``, ``tl.sum``, ``tl.cumsum``,
``tl.sigmoid``, ...) are ``@jit`` functions too, decorated when triton was
imported (torch imports it early, interpreter off).  While an interpreted
kernel runs, :func:`_jit_functions_interpreted` lets such compiled-mode
functions be called the way the interpreter calls its own, and restores
everything afterwards, so interpreted and compiled launches can alternate
in one process.  Kernels written for :func:`jit_kernel` keep their own
helper code inline (constexpr branches) rather than in ``@triton.jit``
helpers of their own, so nothing of theirs is bound to one mode.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import triton
from triton.runtime.interpreter import InterpretedFunction, _patch_lang
from triton.runtime.jit import JITFunction

__all__ = ["jit_kernel", "ModeAwareKernel", "interpreter_enabled"]


def interpreter_enabled() -> bool:
    """Whether Triton kernels launched now run in Triton's CPU interpreter."""
    return bool(triton.knobs.runtime.interpret)


class _InterpretedKernel(InterpretedFunction):
    """An interpreted kernel that may call Triton's ``@jit`` library functions
    (``tl.cdiv``, ``tl.sum``, ``tl.cumsum``, ``tl.sigmoid``, ...) although triton
    was imported with the interpreter off, when those were decorated as
    compiled ``JITFunction``\ s."""

    def run(self, *args, **kwargs):
        with _jit_functions_interpreted():
            return super().run(*args, **kwargs)


_interpreted_helpers: dict[Callable[..., Any], InterpretedFunction] = {}
_patch_depth = 0


def _call_jit_function_interpreted(self: JITFunction, *args, **kwargs):
    """``JITFunction.__call__`` while a kernel is being interpreted: run the
    function as the interpreter would have, had it been decorated under it
    (what ``InterpretedFunction.__call__`` does, but undoing its patch of
    ``triton.language`` on return)."""
    helper = _interpreted_helpers.get(self.fn)
    if helper is None:
        helper = _interpreted_helpers[self.fn] = InterpretedFunction(self.fn)
    scope = _patch_lang(self.fn)
    try:
        return helper.rewrite()(*args, **kwargs)
    finally:
        scope.restore()


@contextlib.contextmanager
def _jit_functions_interpreted() -> Iterator[None]:
    global _patch_depth
    if _patch_depth == 0:
        original = JITFunction.__call__
        JITFunction.__call__ = _call_jit_function_interpreted
    _patch_depth += 1
    try:
        yield
    finally:
        _patch_depth -= 1
        if _patch_depth == 0:
            JITFunction.__call__ = original


class ModeAwareKernel:
    """A Triton kernel built on first launch for the current mode.

    ``kernel[grid](*args)`` launches exactly as a ``@triton.jit`` function
    does; :meth:`compiled` and :meth:`interpreted` return the underlying
    objects (for ``triton.autotune``, ahead-of-time compilation, tests).
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: JITFunction | None = None
        self._interpreted: InterpretedFunction | None = None
        functools.update_wrapper(self, fn)

    def compiled(self) -> JITFunction:
        """The ``JITFunction`` (GPU) form of the kernel, whatever the current mode."""
        if self._compiled is None:
            self._compiled = JITFunction(self.fn)
        return self._compiled

    def interpreted(self) -> InterpretedFunction:
        """The interpreter form of the kernel, whatever the current mode."""
        if self._interpreted is None:
            self._interpreted = _InterpretedKernel(self.fn)
        return self._interpreted

    def current(self) -> JITFunction | InterpretedFunction:
        """The form the current mode (``TRITON_INTERPRET``) launches."""
        return self.interpreted() if interpreter_enabled() else self.compiled()

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        return self.current()[grid]

    def __repr__(self) -> str:
        return f"ModeAwareKernel({self.fn.__name__})"


def jit_kernel(fn: Callable[..., Any]) -> ModeAwareKernel:
    """Decorator: like ``@triton.jit``, but the compile/interpret choice is made per launch."""
    return ModeAwareKernel(fn)
