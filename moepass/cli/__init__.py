"""The ``moepass`` command line (:mod:`moepass.cli.main`)."""
