"""Pipeline stages: one plain function per stage, wrapped for Prefect, DVC (via the CLI) and MLflow."""

from tasks.env import configure_environment

configure_environment()
