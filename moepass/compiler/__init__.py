"""The graph pass: from the backend entry to detected, rewritten and validated MoE blocks.

Read top to bottom from :mod:`~moepass.compiler.backend` (the ``adaptive_moe``
entry point): :mod:`~moepass.compiler.options` parses what ``torch.compile``
was given; :mod:`~moepass.compiler.dataflow` says what each FX node computes;
:mod:`~moepass.compiler.detect` finds the MoE blocks by what they compute and
describes them as :mod:`~moepass.compiler.spec` objects (with programs from
:mod:`~moepass.compiler.lifted` for formulas it does not name);
:mod:`~moepass.compiler.rewrite` replaces each block by the moepass ops and
:mod:`~moepass.compiler.validate` checks the replacement against the original
before it is kept.

May import: :mod:`moepass.runtime`, :mod:`moepass.policies`, ``moepass.lowering``, :mod:`moepass.quantize`.
Imported by everyone for its contract only (``spec`` and ``lifted``); nothing in
the run time imports the rest of it (``tests/test_layout.py``).
"""
