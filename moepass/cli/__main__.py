"""``python -m moepass.cli``: the command line (:mod:`moepass.cli.main`)."""

import sys

from moepass.cli.main import main

sys.exit(main())
