"""Taking expert weights out of memory, and checking a store against the weights in memory.

A *released* parameter keeps its Python object, shape, strides, dtype and
device — everything dynamo's guards look at, so a compiled model does not
recompile — but its storage is resized to 0 bytes: the memory is returned and
any read of its data fails loudly (``setStorage: ... out of bounds for
storage of size 0``) instead of computing with something else.  The backend
releases the weights of every offloaded block after rewriting it; for models
that should never hold their experts at all, :func:`release_experts` does it
before compiling (build the model on the ``meta`` device, load everything
but the experts, call it, then compile with the store).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.weak import WeakIdKeyDictionary

from moepass.runtime.offload.store import StoredBlock, StoreManifest, iter_expert_crc, open_store

__all__ = ["is_released", "release_tensor", "released_from", "release_experts", "check_resident_weights"]

logger = logging.getLogger(__name__)

#: released tensor -> (store folder, block path, tensor name)
_released = WeakIdKeyDictionary()


def is_released(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` has elements but no storage (its data lives in a store)."""
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.device.type != "meta"
        and tensor.numel() > 0
        and tensor.untyped_storage().nbytes() == 0
    )


def released_from(tensor: torch.Tensor) -> tuple[str, str, str] | None:
    """(store folder, block, tensor name) a released tensor's data was left in, if moepass released it."""
    return _released.get(tensor)


def _storageless(shape, stride, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of the given metadata whose storage has 0 bytes."""
    tensor = torch.empty_strided(shape, stride, dtype=dtype, device=device)
    tensor.untyped_storage().resize_(0)  # never touched: the allocation costs no resident memory
    return tensor


def release_tensor(tensor: torch.Tensor, store: Path, block: str, name: str) -> None:
    """Free ``tensor``'s memory in place, keeping the object and its metadata (see the module docstring).

    The tensor is given a storage of its own that is then resized to 0 bytes
    (its old storage is freed once nothing else shares it).  Resizing the old
    storage directly is not an option: inside a dynamo backend the graph
    inputs' storages are not resizable.
    """
    tensor.data = _storageless(tensor.shape, tensor.stride(), tensor.dtype, tensor.device)
    _released[tensor] = (str(store), block, name)


def check_resident_weights(block: StoredBlock, tensors: dict[str, torch.Tensor | None], store: Path) -> None:
    """Raise ValueError unless the in-memory stacked ``tensors`` are byte for byte the store's experts."""
    for stored in block.tensors:
        tensor = tensors.get(stored.name)
        if tensor is None:
            raise ValueError(f"block {block.path}: the model has no {stored.name} but the store {store} has one")
        expected = block.stacked_shape(stored.name)
        if tuple(tensor.shape) != expected or tensor.dtype != stored.torch_dtype:
            raise ValueError(
                f"block {block.path}: {stored.name} is {tuple(tensor.shape)} {tensor.dtype} in the model, "
                f"{expected} {stored.torch_dtype} in the store {store}"
            )
    extra = [n for n, t in tensors.items() if t is not None and block.tensor(n) is None]
    if extra:
        raise ValueError(f"block {block.path}: the model has {', '.join(extra)} but the store {store} does not")
    for expert, crc in iter_expert_crc(tensors, block):
        if crc != block.crc32[expert]:
            raise ValueError(
                f"block {block.path}: expert {expert}'s weights in memory differ from the store {store} "
                "(the store was written from another model or checkpoint)"
            )


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    module_path, _, attribute = name.rpartition(".")
    return (model.get_submodule(module_path) if module_path else model), attribute


def release_experts(model: torch.nn.Module, store: str | Path) -> int:
    """Replace the model's expert parameters named in ``store``'s manifest by released tensors.

    Parameters in memory are checked against the store first (bytes); ones on
    the ``meta`` device are replaced by released CPU parameters of the
    stored shape and dtype.  Returns the number of bytes given back.

    Raises:
        ValueError: a parameter the store names is missing or differs from the store.
    """
    root, manifest = open_store(store)
    return _release_manifest(model, root, manifest)


def _release_manifest(model: torch.nn.Module, root: Path, manifest: StoreManifest) -> int:
    freed = 0
    for block in manifest.blocks:
        params = {}
        for stored in block.tensors:
            if not stored.param:
                raise ValueError(
                    f"block {block.path}: the store {root} does not name the model parameter of {stored.name} "
                    "(its experts were stacked at compile time); compile with the offload option instead"
                )
            try:
                params[stored.name] = model.get_parameter(stored.param)
            except AttributeError:
                raise ValueError(f"the model has no parameter {stored.param} (block {block.path} in {root})") from None
        resident = {n: p for n, p in params.items() if p.device.type != "meta" and not is_released(p)}
        if resident and len(resident) == len(params):
            check_resident_weights(block, {n: p.detach() for n, p in params.items()}, root)
        for stored in block.tensors:
            param = params[stored.name]
            shape = block.stacked_shape(stored.name)
            if tuple(param.shape) != shape or param.dtype != stored.torch_dtype:
                raise ValueError(
                    f"parameter {stored.param} is {tuple(param.shape)} {param.dtype}; the store {root} holds "
                    f"{shape} {stored.torch_dtype}"
                )
            if is_released(param):
                continue
            if param.device.type == "meta":
                placeholder = _storageless(shape, param.stride(), param.dtype, torch.device("cpu"))
                new = torch.nn.Parameter(placeholder, requires_grad=False)
                owner, attribute = _owner(model, stored.param)
                setattr(owner, attribute, new)
                _released[new] = (str(root), block.path, stored.name)
            else:
                freed += param.numel() * param.element_size()
                release_tensor(param, root, block.path, stored.name)
    logger.info("released %.1f MB of expert weights to %s", freed / 1e6, root)
    return freed
