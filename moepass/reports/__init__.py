"""Inspection and reports: what the pass found in a model, as text, JSON and HTML.

:mod:`~moepass.reports.inspection` (``moepass.inspect``) compiles a model and
runs it on an example; :mod:`~moepass.reports.html_report` writes the page,
with :mod:`~moepass.reports.charts` and :mod:`~moepass.reports.graphview` for
its pictures.  The per-model :class:`~moepass.runtime.report.Report` the
backend writes lives in the run time (the backend and the ops fill it in).

May import: :mod:`moepass.compiler`, :mod:`moepass.runtime`, :mod:`moepass.policies`.
"""
