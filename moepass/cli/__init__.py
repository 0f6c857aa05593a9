"""The ``moepass`` command line (:mod:`moepass.cli.main`; ``python -m moepass.cli``).

The only package that prints.  May import anything; nothing imports it
(``tests/test_layout.py``).  :mod:`~moepass.cli.modelspec` turns a ``--model``
argument (``bundled``, a zoo family, a Hub id) into a model and an example.
"""
