"""Training code behind the bundled model and its policy artefacts.

Nothing here runs at import time or downloads anything; every entry point is
seeded and deterministic on one thread.

================================= =============================================
module                            what it makes
================================= =============================================
:mod:`moepass.bundled.train.lm`           the bundled Mixtral byte LM (``examples/train_bundled.py``)
:mod:`moepass.bundled.train.routed`       eager Mixtral forward with a per-token k-rule
                                  (rewards, fine-tunes)
:mod:`moepass.bundled.train.adak`         Ada-K allocators (SFT warm start + PPO)
:mod:`moepass.bundled.train.adamoe`       AdaMoE null experts (router rows + fine-tune)
:mod:`moepass.bundled.train.calibrations` AdapMoE sensitivity / skip-ratio artefacts
================================= =============================================
"""

__all__: list[str] = []
