"""Process-wide defaults, applied before anything imports prefect, mlflow or dvc.

Telemetry off and Prefect's home inside the project's working folder, so a run is
offline-friendly. The user's Hugging Face cache and login (`HF_HOME`, `HF_TOKEN`,
`~/.cache/huggingface`) are theirs: left as they are, so a checkpoint or dataset already
downloaded is found and a gated model's login works. Values the user has already set win
(`setdefault`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def configure_environment(workdir: str | os.PathLike | None = None) -> None:
    work = Path(workdir or os.getcwd()).resolve()
    defaults = {
        "PREFECT_HOME": str(work / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The temporary server starts in ~10 s on these machines; leave room when the cores are busy.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "DVC_NO_ANALYTICS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # The stages log through `logging` under these packages: Prefect forwards them to the flow run's
        # logs in its UI (otherwise it shows only its own loggers' records).
        "PREFECT_LOGGING_EXTRA_LOGGERS": "sparsify,tasks,flows",
    }
    if not sys.stderr.isatty():
        # In logs (CI, Prefect workers, dvc repro) a progress bar redrawn 10x a second buries the
        # messages; one update every 10 s still shows progress and rate.
        defaults["TQDM_MININTERVAL"] = "10"
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
