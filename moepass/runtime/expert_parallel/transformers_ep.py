"""moepass as one of transformers' expert-parallel implementations: ``ep_implementation="moepass"``.

transformers ≥ 5.25 shards a model's experts over ranks with
``DistributedConfig(ep_size=N, ...)`` (``Shard(0)`` DTensors on its ``ep``
mesh) and hands each experts module's tokens to the ``EPImplementation`` its
``ep_implementation`` names in ``EPImplementationInterface``.  Importing
moepass registers :class:`MoepassEP` there under ``"moepass"`` (as soon as
``transformers.distributed.expert_parallel`` is imported, without importing
it itself)::

    model = AutoModelForCausalLM.from_pretrained(
        path, distributed_config=DistributedConfig(ep_size=2, fsdp_size=2, ep_implementation="moepass"))
    fast = torch.compile(model, backend="adaptive_moe", options={"policy": "top_p", "p": 0.5})

:class:`MoepassEP` runs the experts as one ``moepass.experts`` op whose config
names the EP group (:mod:`moepass.runtime.expert_parallel.exchange`: kept slots
only, local experts on the usual lowering), so

* without the backend, the model runs expert-parallel on moepass's exchange;
* under ``torch.compile(backend="adaptive_moe")`` dynamo traces the op like any
  other (its fake kernel communicates nothing), detection sees router + experts
  op as one block, the policy's dropped slots become sentinel ids the exchange
  never sends, and the expert-parallel plan stage keeps the op on its group.

What is read from transformers is its integration surface: the
``EPImplementation`` constructor and call, and the flags
``use_experts_implementation`` puts on the experts module (``has_gate``,
``has_bias``, ``is_transposed``, ``is_concatenated``, ``has_post_expert_norm``,
the default ``_apply_gate``, ``act_fn``).  Anything else — another experts
implementation, a custom gate, a post-expert norm, weights not sharded on
dim 0 — raises :class:`ExpertParallelError` when the model is distributed, on
every rank alike, naming what differs and the transformers implementation to
use instead.  On its first eager call each instance also checks its op against
the module's own forward on its local experts (a small random input).
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
from typing import Any

import torch

from moepass.compiler.spec import ExpertsSpec
from moepass.runtime.expert_parallel.group import ExpertParallelError, register_group

__all__ = [
    "EP_IMPLEMENTATION_NAME", "experts_spec", "experts_modules_running_moepass", "register_with_transformers",
    "register_when_imported",
]

logger = logging.getLogger(__name__)

#: The name ``DistributedConfig(ep_implementation=...)`` selects moepass by.
EP_IMPLEMENTATION_NAME = "moepass"
_TRANSFORMERS_EP_MODULE = "transformers.distributed.expert_parallel"
#: transformers' experts implementations whose computation is fully set by the module's flags.
_FLAG_IMPLEMENTATIONS = ("grouped_mm", "batched_mm")


def _activation_name(act_fn: Any) -> str:
    name = type(act_fn).__name__.lower()
    if "silu" in name or "swish" in name:
        return "silu"
    tanh_forms = ("gelutanh", "newgeluactivation", "gelupytorchtanh", "fastgeluactivation")
    if name in tanh_forms or ("gelu" in name and "tanh" in name):
        return "gelu_tanh"
    if name in ("geluactivation", "gelu"):
        return "gelu"
    if name == "relu":
        return "relu"
    raise ExpertParallelError(f"activation {type(act_fn).__name__} is not one moepass's expert parallelism reads")


def _global_rows(tensor: Any, ep_size: int) -> int:
    """Experts in a (possibly sharded) weight: a DTensor's global shape, else the local rows × EP size."""
    from torch.distributed.tensor import DTensor

    return int(tensor.shape[0]) if isinstance(tensor, DTensor) else int(tensor.shape[0]) * ep_size


def experts_spec(experts: torch.nn.Module, ep_size: int) -> tuple[ExpertsSpec, tuple[str, str, str | None, str | None]]:
    """The moepass spec of a transformers experts module, and the names of its (w1, w2, b1, b2) parameters.

    Raises :class:`ExpertParallelError` naming what does not fit.
    """
    kind = type(experts).__name__
    implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    flags = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")
    missing = [f for f in flags if not hasattr(experts, f)]
    if missing:
        raise ExpertParallelError(
            f"{kind} has no {', '.join(missing)}: not an experts module transformers' use_experts_implementation "
            "made; use ep_implementation='all_to_all'"
        )
    if implementation not in _FLAG_IMPLEMENTATIONS:
        raise ExpertParallelError(
            f"{kind} runs experts_implementation={implementation!r}, whose computation moepass cannot read; load "
            f"the model with experts_implementation='grouped_mm' (or use ep_implementation='all_to_all')"
        )
    if experts.has_post_expert_norm:
        raise ExpertParallelError(f"{kind} normalises each expert's output (has_post_expert_norm): not supported")
    from transformers.integrations import moe as transformers_moe

    default_gate = getattr(transformers_moe, "_default_apply_gate", None)
    if experts.has_gate and getattr(type(experts), "_apply_gate", default_gate) is not default_gate:
        raise ExpertParallelError(
            f"{kind} has its own gate function (_apply_gate), which moepass's expert parallelism does not read; "
            "use ep_implementation='all_to_all'"
        )
    w1_name = "gate_up_proj" if experts.has_gate else "up_proj"
    names = (w1_name, "down_proj", f"{w1_name}_bias" if experts.has_bias else None,
             "down_proj_bias" if experts.has_bias else None)
    tensors = [getattr(experts, n, None) if n else None for n in names]
    if tensors[0] is None or tensors[1] is None or (experts.has_bias and (tensors[2] is None or tensors[3] is None)):
        raise ExpertParallelError(f"{kind} lacks one of {', '.join(n for n in names if n)}")
    w1, w2 = tensors[0], tensors[1]
    if w1.dim() != 3 or w2.dim() != 3:
        raise ExpertParallelError(f"{kind}: {names[0]} {tuple(w1.shape)} and down_proj {tuple(w2.shape)} are not 3-D")
    num_experts = _global_rows(w1, ep_size)
    if experts.is_transposed:  # w1 [E, H, N1], w2 [E, I, H]
        hidden, n1, inter = int(w1.shape[1]), int(w1.shape[2]), int(w2.shape[1])
    else:  # w1 [E, N1, H], w2 [E, H, I]
        hidden, n1, inter = int(w1.shape[2]), int(w1.shape[1]), int(w2.shape[2])
    if n1 != (2 * inter if experts.has_gate else inter):
        raise ExpertParallelError(f"{kind}: {names[0]} {tuple(w1.shape)} and down_proj {tuple(w2.shape)} do not fit")
    spec = ExpertsSpec(
        dispatch="moepass_op",
        num_experts=num_experts,
        hidden_size=hidden,
        intermediate_size=inter,
        activation=_activation_name(experts.act_fn),
        gated=bool(experts.has_gate),
        gate_up_layout=("concat" if experts.is_concatenated else "interleaved") if experts.has_gate else "none",
        transposed=bool(experts.is_transposed),
        has_bias=bool(experts.has_bias),
    )
    return spec, names


def _local(tensor):
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _implementation_class():
    """:class:`MoepassEP`, built on transformers' ``EPImplementation`` (imported only when transformers' EP is)."""
    from transformers.distributed.expert_parallel import EPImplementation

    from moepass.runtime.ops import ExpertsConfig

    class MoepassEP(EPImplementation):
        """Expert parallelism on moepass's exchange: only kept slots travel; one ``moepass.experts`` op."""

        def __init__(self, experts, ep_mesh, tp_mesh):
            try:
                super().__init__(experts, ep_mesh, tp_mesh)
                ep_size, single_mesh = ep_mesh.size(), tp_mesh.size() == 1
            except (TypeError, AttributeError) as error:  # transformers' EP interface is not the one read here
                raise ExpertParallelError(
                    f"transformers' EPImplementation interface differs from the one moepass was written against "
                    f"(transformers 5.25: __init__(experts, ep_mesh, tp_mesh)): {error}; use ep_implementation="
                    "'all_to_all'"
                ) from error
            self.spec, self.names = experts_spec(experts, ep_size)
            if self.spec.num_experts % ep_size:
                raise ExpertParallelError(
                    f"{type(experts).__name__}: {self.spec.num_experts} experts cannot be split over {ep_size} ranks"
                )
            batch_group = None if single_mesh else tp_mesh.get_group()
            self.group = register_group(ep_mesh.get_group(), batch_group)
            self.experts = experts
            self.config = ExpertsConfig(spec=self.spec, expert_parallel=self.group.key).to_json()
            self._checked = False
            _CREATED[0] += 1

        def _weights(self):
            return [None if n is None else _local(getattr(self.experts, n)) for n in self.names]

        def _check(self, weights) -> None:
            """The op against the module's own forward on its local experts (random input, no communication)."""
            import dataclasses

            from moepass.lowering import run_experts

            local = self.spec.num_experts // self.group.size
            dtype = weights[0].dtype
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(6, self.spec.hidden_size, generator=generator).to(dtype).to(weights[0].device)
            ids = torch.stack([torch.randperm(local, generator=generator)[: min(2, local)] for _ in range(6)])
            ids = ids.to(x.device)
            w = torch.rand(ids.shape, generator=generator).to(dtype).to(x.device)
            cfg = ExpertsConfig(spec=dataclasses.replace(self.spec, num_experts=local))
            with torch.no_grad():
                expected = self.experts_forward(x, ids, w)
                got = run_experts(x, ids, w, *weights, cfg)
            scale = expected.double().abs().max().clamp_min(1e-30)
            error = float((got.double() - expected.double()).abs().max() / scale)
            tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
            if not error <= tolerance:
                raise ExpertParallelError(
                    f"{type(self.experts).__name__}: moepass's experts differ from the module's own forward by "
                    f"{error:.1e} on a random input; use ep_implementation='all_to_all'"
                )
            self._checked = True

        def __call__(self, hidden_states, top_k_index, top_k_weights):
            weights = self._weights()
            # is_compiling() first: dynamo reads it as a constant and never guards on _checked
            if not torch.compiler.is_compiling() and not self._checked:
                self._check(weights)
            return torch.ops.moepass.experts(hidden_states, top_k_index, top_k_weights, *weights, self.config)

    MoepassEP.__qualname__ = "MoepassEP"
    return MoepassEP


#: How many experts modules run :class:`MoepassEP` in this process (the backend's report mentions it).
_CREATED = [0]


def experts_modules_running_moepass() -> int:
    """Experts modules of this process that transformers hands to moepass's expert parallelism."""
    return _CREATED[0]


def register_with_transformers() -> bool:
    """Register :class:`MoepassEP` as ``ep_implementation="moepass"``; False when transformers has no EP registry."""
    try:
        from transformers.distributed.expert_parallel import EPImplementationInterface
    except ImportError:
        return False
    if not hasattr(EPImplementationInterface, "register"):
        logger.warning(
            "moepass: transformers' EPImplementationInterface has no register(); ep_implementation='moepass' is "
            "not available"
        )
        return False
    EPImplementationInterface.register(EP_IMPLEMENTATION_NAME, _implementation_class())
    return True


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers moepass in transformers' EP registry right after ``transformers.distributed.expert_parallel`` loads."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TRANSFORMERS_EP_MODULE:
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module):
            original(module)
            _done()
            try:
                register_with_transformers()
            except Exception as error:  # never break transformers' own import
                logger.warning("moepass: could not register ep_implementation='moepass': %s", error)

        loader.exec_module = exec_module
        return spec


_hook = _RegisterOnImport()


def _done() -> None:
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


def register_when_imported() -> None:
    """Make ``ep_implementation="moepass"`` available: now if transformers' EP module is loaded, else on its import."""
    if _TRANSFORMERS_EP_MODULE in sys.modules:
        register_with_transformers()
    elif _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)
