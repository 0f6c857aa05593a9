"""Triton kernels of the experts op (installs as ``moepass.kernels``; used by lowering/triton.py).

::

    ids [T,K] ──► align.py     align_slots_kernel    non-empty slots by expert, padded to BLOCK_M
    x [T,H]   ──► gate_up.py   gate_up_kernel        h = act(x W1ᵀ + b1), activation in the epilogue
    h         ──► down.py      down_kernel           y[slot] = w · (h W2ᵀ + b2), weight in the epilogue
    y         ──► down.py      combine_slots_kernel  out[t] = Σ_j y[t*K + j], deterministic

Kernel files hold the jitted kernels and their config spaces; ``launch.py``
holds the host launchers, registered as ``torch.ops.moepass.triton_*`` custom
ops; ``config_store.py`` the tuned-config files, lookup and heuristics;
``tune.py`` the ``moepass tune`` search; ``_jit.py`` the launch-time choice
between compiled and interpreted kernels.  Importing this package does not
import triton: import the submodules.
"""
