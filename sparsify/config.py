"""The base of every typed options model in sparsify: frozen, and unknown keys are errors.

Each algorithm's options live beside its code (`sparsify.model.ArchConfig`,
`sparsify.training.trainer.TrainConfig`, `sparsify.data.corpus.DataConfig`,
`sparsify.sparsity.pruning.PruneConfig`, ...). The pipeline's `params.yaml` schema, which
composes them, and its loader live in `tasks.config`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A frozen options model that refuses unknown keys (pydantic `extra="forbid"`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
