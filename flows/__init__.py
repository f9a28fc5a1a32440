"""Prefect flows and the `sparsellama` command line."""

import tasks  # noqa: F401  (sets PREFECT_HOME and telemetry defaults before prefect is imported)
