"""Shared fixtures: a recording backend that runs the moepass pipeline, and resets."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

#: An Inductor cache directory the user chose, read before torch or moepass
#: touch it (Inductor writes its default into the environment on first use)
#: and passed on to the xdist workers, which inherit the controller's environment.
_USER_INDUCTOR_CACHE = os.environ.setdefault(
    "MOEPASS_TESTS_USER_INDUCTOR_CACHE", os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
)

#: Kernel tables: the suite never measures on first compile (timings would make choices, and
#: so code paths, depend on the machine's load) and never reads or writes the user's cache.
#: Compiles use the tables shipped for this machine, else those of another machine (a fixed
#: choice); tests of the measuring path set their own budget and cache folder.
os.environ["MOEPASS_TUNING"] = "off"
os.environ["MOEPASS_CACHE_DIR"] = tempfile.mkdtemp(prefix="moepass-test-cache-")
atexit.register(shutil.rmtree, os.environ["MOEPASS_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

import moepass
from moepass.compiler.backend import optimize_graph
from moepass.compiler.dataflow import op_name
from moepass.compiler.options import BackendOptions


def pytest_configure(config):
    """Parallel test workers (``make test`` runs two): one intra-op thread each, so two busy
    processes do not fight over the two cores, and an Inductor cache each — two workers
    compiling the same kernel at once into one shared cache can load each other's
    half-written .so ("file too short", seen in CI).  (A hook, not module code: pytest can
    import this file before xdist has told the worker who it is.)"""
    worker = getattr(config, "workerinput", {}).get("workerid")
    if not worker:
        return
    torch.set_num_threads(1)
    if not _USER_INDUCTOR_CACHE:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
            tempfile.gettempdir(), f"moepass-inductor-{os.getuid()}-{worker}"
        )


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


class Recorder:
    """A backend that runs moepass's passes and keeps every rewritten graph."""

    def __init__(self, **options):
        self.options = BackendOptions.parse({"inner": "eager", **options})
        self.graphs: list[torch.fx.GraphModule] = []
        self.reports = []

    def __call__(self, gm, example_inputs):
        gm, blocks = optimize_graph(gm, example_inputs, self.options)
        self.graphs.append(gm)
        self.reports.append(blocks)
        return gm.forward

    def ops(self) -> list[str]:
        """Op names of every call in every recorded graph."""
        return [op_name(n) for g in self.graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")]


@pytest.fixture
def recorder():
    return Recorder


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max relative error against the expected tensor's scale."""
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def traceable_and_reference(build, length: int, **options):
    """(reference, model, compiled, inputs): ``build()`` twice, the second through
    ``moepass.make_traceable`` and compiled with ``adaptive_moe`` (inner eager, ``options``)."""
    from moepass.zoo.survey import family_inputs

    reference, model = build(), build()
    moepass.make_traceable(model)
    compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager", **options})
    return reference, model, compiled, family_inputs(model, length)


def gradients_after_backward(model, compiled, reference, inputs) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """One backward of mean(logits²) through ``compiled`` and ``reference``: (name, gradient, reference
    gradient) of every parameter the reference gives a gradient."""
    compiled(**inputs).logits.square().mean().backward()
    reference(**inputs).logits.square().mean().backward()
    return [
        (name, p.grad, q.grad)
        for (name, p), q in zip(model.named_parameters(), reference.parameters())
        if q.grad is not None
    ]


def token_ids(batch: int, length: int, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


__all__ = ["Recorder", "rel_err", "token_ids", "moepass"]
