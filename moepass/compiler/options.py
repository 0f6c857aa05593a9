"""The backend's options: parsing, defaults and the errors users see.

``torch.compile(model, backend="adaptive_moe", options={...})`` keys (the default in parentheses):

* ``policy`` (``"static"``): a policy name or a :class:`~moepass.policies.Policy`.
* ``inner`` (``"inductor"``): the compiler for the rest of the graph: ``inductor`` | ``aot_eager`` | ``eager``.
* ``lowering`` (``"auto"``): the experts implementation: ``auto`` | ``cpu`` | ``triton`` | ``reference``.
* ``validate`` (``True``): check each rewrite against the original block on random inputs before committing it.
* ``stats`` (``False``): record tokens per k per block at run time.
* ``offload`` (``None``): expert weights in an expert store, loaded through a cache with prefetch: a store
  folder or a dict (:mod:`moepass.runtime.offload.options`).
* ``cpu_prepack`` (``"auto"``): CPU lowering: run bfloat16 experts on copies of their weights pre-packed for
  oneDNN (faster, as much memory again): ``auto`` (when they fit in half the available memory) | ``on`` |
  ``off`` (or True / False); see :mod:`moepass.lowering.cpu_packed`.
* ``expert_parallel`` (``None``): split the experts over the ranks of a ``DeviceMesh``: ``{"mesh": mesh}``
  (a 1-D mesh) or ``{"mesh": mesh, "mesh_dim": "ep"}``; see :mod:`moepass.compiler.plan.expert_parallel`.
  Models whose expert weights are ``Shard(0)`` DTensors, or that run transformers'
  ``ep_implementation="moepass"``, need no option.
* ``cpu_tuning`` (``"auto"``): CPU lowering: measure this machine's kernel and path choices for a block
  shape no table holds: ``auto`` (at most :data:`~moepass.lowering.cpu_tuning.DEFAULT_BUDGET` seconds per
  shape, or what ``$MOEPASS_TUNING`` says) | ``off`` | seconds; see :mod:`moepass.lowering.cpu_tuning`.
* ``experts_dtype`` (``None``): quantize the routed experts at compile time: ``int8`` (per output channel) |
  ``int4`` (per group); see :mod:`moepass.compiler.plan.quantize`.
* ``group_size`` (64 for int4): int4: input features per scale (32 | 64 | 128 | 256).
* ``experts_float`` (``"keep"``): with ``experts_dtype``: ``keep`` the float expert weights in memory, or
  ``release`` them once quantized.

Any other key is a parameter of the named policy (``{"policy": "top_p",
"p": 0.4}``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from moepass.policies import POLICIES, Policy, PolicyError, make_policy
from moepass.runtime.ops import CPU_PREPACK, LOWERINGS
from moepass.runtime.tuning import TuningError, tuning_budget

__all__ = ["BackendOptions", "OptionsError", "INNER_COMPILERS", "ExpertParallelOptions"]

INNER_COMPILERS = ("inductor", "aot_eager", "eager")


class OptionsError(ValueError):
    """Bad backend options; the message lists what is valid."""


@dataclass(frozen=True, eq=False)
class ExpertParallelOptions:
    """``options={"expert_parallel": {"mesh": mesh, "mesh_dim": ...}}``: experts split over one mesh dimension."""

    #: A ``torch.distributed.device_mesh.DeviceMesh``.
    mesh: Any
    #: The dimension (index or name) holding the experts; None for a 1-D mesh.
    mesh_dim: int | str | None = None


@dataclass
class BackendOptions:
    """Parsed, validated backend options."""

    policy: Policy = field(default_factory=lambda: POLICIES["static"]())
    inner: str = "inductor"
    lowering: str = "auto"
    validate: bool = True
    stats: bool = False
    #: torch.compile's ``mode`` (forwarded to Inductor).
    mode: str | None = None
    #: Expert offloading (:class:`moepass.runtime.offload.OffloadOptions`), or None.
    offload: Any = None
    #: Pre-packed bfloat16 expert weights on CPU: ``auto`` | ``on`` | ``off``.
    cpu_prepack: str = "auto"
    #: Experts split over a mesh (:class:`ExpertParallelOptions`), or None.
    expert_parallel: ExpertParallelOptions | None = None
    #: Measuring the CPU lowering's choices on first compile: ``auto`` | ``off`` | seconds.
    cpu_tuning: Any = "auto"
    #: Quantized experts (:class:`moepass.quantize.QuantScheme`), or None: the experts stay as they are.
    quantize: Any = None
    #: What happens to the float expert weights once quantized: ``keep`` | ``release``.
    experts_float: str = "keep"
    #: Not a user option: exporters set ``plain`` so quantized blocks keep the portable layout
    #: (``auto``: the lowering's own form, e.g. ATen's operands on CPU).
    quantized_form: str = "auto"

    _BACKEND_KEYS = (
        "policy", "inner", "lowering", "validate", "stats", "offload", "cpu_prepack", "cpu_tuning", "expert_parallel",
        "experts_dtype", "group_size", "experts_float",
    )

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None, mode: str | None = None) -> "BackendOptions":
        """Validate a user's options dict; raise :class:`OptionsError` naming the problem."""
        options = dict(options or {})
        policy = options.pop("policy", "static")
        backend = {key: options.pop(key) for key in list(options) if key in cls._BACKEND_KEYS}
        if isinstance(policy, Policy):
            if options:
                raise OptionsError(
                    f"unknown option(s) {', '.join(map(repr, sorted(options)))}: a policy object carries its own "
                    f"parameters; valid options: {', '.join(cls._BACKEND_KEYS)}"
                )
        elif isinstance(policy, str):
            if policy not in POLICIES:
                raise OptionsError(f"unknown policy {policy!r}; valid policies: {', '.join(sorted(POLICIES))}")
            valid_params = {f.name for f in dataclasses.fields(POLICIES[policy]) if f.init}
            unknown = sorted(set(options) - valid_params)
            if unknown:
                raise OptionsError(
                    f"unknown option(s) {', '.join(map(repr, unknown))} for policy {policy!r}; valid options: "
                    f"{', '.join(cls._BACKEND_KEYS)}"
                    + (f" and the policy's parameters {', '.join(sorted(valid_params))}" if valid_params else "")
                )
            try:
                policy = make_policy(policy, **options)
            except PolicyError as error:
                raise OptionsError(str(error)) from None
        else:
            raise OptionsError(f"option 'policy' must be a policy name or a Policy object, got {type(policy).__name__}")
        inner = backend.get("inner", "inductor")
        if inner not in INNER_COMPILERS:
            raise OptionsError(f"unknown inner compiler {inner!r}; valid: {', '.join(INNER_COMPILERS)}")
        lowering = backend.get("lowering", "auto")
        if lowering not in LOWERINGS:
            raise OptionsError(f"unknown lowering {lowering!r}; valid: {', '.join(LOWERINGS)}")
        for flag in ("validate", "stats"):
            if flag in backend and not isinstance(backend[flag], bool):
                raise OptionsError(f"option {flag!r} must be True or False, got {backend[flag]!r}")
        offload = _parse_offload(backend.get("offload"), lowering)
        cpu_prepack = backend.get("cpu_prepack", "auto")
        if isinstance(cpu_prepack, bool):
            cpu_prepack = "on" if cpu_prepack else "off"
        if cpu_prepack not in CPU_PREPACK:
            raise OptionsError(
                f"option 'cpu_prepack' must be one of {', '.join(CPU_PREPACK)} (or True / False), got {cpu_prepack!r}"
            )
        expert_parallel = _parse_expert_parallel(backend.get("expert_parallel"))
        if expert_parallel is not None and offload is not None:
            raise OptionsError(
                "options 'expert_parallel' and 'offload' cannot be combined (each rank's experts are in memory)"
            )
        cpu_tuning = backend.get("cpu_tuning", "auto")
        if isinstance(cpu_tuning, bool):
            cpu_tuning = "auto" if cpu_tuning else "off"
        try:
            tuning_budget(cpu_tuning, 1.0)
        except TuningError as error:
            raise OptionsError(f"option 'cpu_tuning': {error}") from None
        quantize, experts_float = _parse_quantize(backend, lowering)
        return cls(
            policy=policy,
            inner=inner,
            lowering=lowering,
            validate=backend.get("validate", True),
            stats=backend.get("stats", False),
            mode=mode,
            offload=offload,
            cpu_prepack=cpu_prepack,
            expert_parallel=expert_parallel,
            cpu_tuning=cpu_tuning,
            quantize=quantize,
            experts_float=experts_float,
        )


def _parse_offload(value: Any, lowering: str) -> Any:
    """The ``offload`` option parsed (None when absent); offloaded experts run the CPU lowering."""
    if value is None:
        return None
    from moepass.runtime.offload.options import OffloadOptions, OffloadOptionsError

    if lowering not in ("auto", "cpu"):
        raise OptionsError(f"option 'offload' runs the experts on the cpu lowering; lowering={lowering!r} cannot")
    try:
        return OffloadOptions.parse(value)
    except OffloadOptionsError as error:
        raise OptionsError(str(error)) from None


def _parse_expert_parallel(value: Any) -> ExpertParallelOptions | None:
    """The ``expert_parallel`` option parsed (None when absent)."""
    if value is None:
        return None
    if isinstance(value, ExpertParallelOptions):
        return value
    if not isinstance(value, Mapping):
        raise OptionsError(
            f"option 'expert_parallel' must be a dict such as {{'mesh': mesh}}, got {type(value).__name__}"
        )
    unknown = sorted(set(value) - {"mesh", "mesh_dim"})
    if unknown:
        raise OptionsError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in option 'expert_parallel'; valid: mesh, mesh_dim"
        )
    mesh = value.get("mesh")
    if mesh is None or not all(hasattr(mesh, a) for a in ("get_group", "ndim", "size", "mesh")):
        raise OptionsError(
            "option 'expert_parallel' needs 'mesh': a torch.distributed DeviceMesh "
            f"(init_device_mesh(...)), got {type(mesh).__name__}"
        )
    mesh_dim = value.get("mesh_dim")
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if mesh_dim is None and mesh.ndim != 1:
        raise OptionsError(
            f"option 'expert_parallel': the mesh has {mesh.ndim} dimensions {names}; name the one holding the "
            "experts with 'mesh_dim'"
        )
    if isinstance(mesh_dim, str) and mesh_dim not in names:
        raise OptionsError(f"option 'expert_parallel': the mesh has no dimension {mesh_dim!r}; its dimensions: {names}")
    if isinstance(mesh_dim, int) and not 0 <= mesh_dim < mesh.ndim:
        raise OptionsError(f"option 'expert_parallel': the mesh has no dimension {mesh_dim} (it has {mesh.ndim})")
    if mesh_dim is not None and not isinstance(mesh_dim, (int, str)):
        raise OptionsError(f"option 'expert_parallel': 'mesh_dim' must be an index or a name, got {mesh_dim!r}")
    return ExpertParallelOptions(mesh=mesh, mesh_dim=mesh_dim)


def _parse_quantize(backend: Mapping[str, Any], lowering: str) -> tuple[Any, str]:
    """(scheme or None, experts_float) from ``experts_dtype`` / ``group_size`` / ``experts_float``."""
    from moepass.quantize.scheme import QuantizeError, parse_scheme

    try:
        scheme = parse_scheme(backend.get("experts_dtype"), backend.get("group_size"))
    except QuantizeError as error:
        raise OptionsError(str(error)) from None
    experts_float = backend.get("experts_float", "keep")
    if experts_float not in ("keep", "release"):
        raise OptionsError(f"option 'experts_float' must be 'keep' or 'release', got {experts_float!r}")
    if scheme is None and "experts_float" in backend:
        raise OptionsError("option 'experts_float' needs experts_dtype 'int8' or 'int4'")
    if scheme is not None and lowering not in ("auto", "cpu", "reference"):
        raise OptionsError(
            f"quantized experts run on the cpu lowering (ATen's int8/int4 kernels) or the reference; "
            f"lowering={lowering!r} cannot"
        )
    return scheme, experts_float
