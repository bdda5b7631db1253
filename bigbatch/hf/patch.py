"""Put bigbatch's ``TrainingArguments`` and ``Trainer`` where a Hugging Face script imports them from.

:func:`install` replaces ``TrainingArguments`` and ``Trainer`` in ``transformers``,
``transformers.training_args`` and ``transformers.trainer`` by
:class:`~bigbatch.hf.BigBatchTrainingArguments` and :class:`~bigbatch.hf.BigBatchTrainer`. A script
that imports them afterwards (``from transformers import Trainer, TrainingArguments``; the
``HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))`` of the examples)
gets bigbatch's: ``--optim adabound|amsbound|radam``, ``--optim_args``, ``--reference_batch_size``,
``--batch_schedule`` and DeepSpeed configs whose optimizer block names them. Subclasses the
script defines after the call inherit them too. The classes are subclasses of the originals, so
``isinstance`` checks inside transformers keep working. Only the transformers versions in
:data:`TESTED` are patched; another version is refused (:class:`UntestedTransformers`).
"""

from __future__ import annotations

import re

#: transformers versions the patch was run against (lowest, below which; release versions)
TESTED = ("5.25.0", "5.26")


class UntestedTransformers(RuntimeError):
    """The installed transformers is outside :data:`TESTED`."""


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0].split(".dev")[0])[:3])


def check_version(version: str | None = None) -> str:
    """The installed transformers version; raises :class:`UntestedTransformers` outside :data:`TESTED`."""
    if version is None:
        import transformers

        version = transformers.__version__
    low, high = TESTED
    if not _release(low) <= _release(version) < _release(high):
        raise UntestedTransformers(f"transformers {version}: bigbatch.hf patches the versions >= {low}, < {high} "
                                   f"(tested); install one (pip install 'transformers>={low},<{high}')")
    return version


def install() -> None:
    """Patch transformers (once; idempotent) so that every ``TrainingArguments`` and ``Trainer`` a script
    makes from then on is bigbatch's. Call it before the script imports them."""
    check_version()
    import transformers
    import transformers.trainer
    import transformers.training_args

    from bigbatch.hf.trainer import BigBatchTrainer, BigBatchTrainingArguments

    for module in (transformers, transformers.training_args):
        module.TrainingArguments = BigBatchTrainingArguments
    for module in (transformers, transformers.trainer):
        module.Trainer = BigBatchTrainer


def installed() -> bool:
    import transformers

    from bigbatch.hf.trainer import BigBatchTrainer

    return transformers.Trainer is BigBatchTrainer
