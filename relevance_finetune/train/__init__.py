"""The finetuning loop: the paper's recipe, checkpoints with exact resume, DDP, and the ``train`` command.

- :mod:`.config`: ``TrainConfig``, the paper's ``PRESETS``, config files, ``resolve_config``;
- :mod:`.loop`: ``finetune``, one epoch, validation, ``build_criterion``;
- :mod:`.selection`: the rules that pick ``best.safetensors`` (``SELECTION_RULES``);
- :mod:`.groups`: group-labelled data: validation accuracy by group, ``--select worst_group``;
- :mod:`.outputs`: the run directory, the trainer state in a checkpoint, resume;
- :mod:`.distributed` and :mod:`.randomness`: processes under torchrun; seeds and RNG states;
- :mod:`.stopping`: stop signals (a resumable checkpoint mid-epoch) and non-finite losses;
- :mod:`.refit`: the head refit stage (``refit_stage``, ``--head-refit``);
- :mod:`.command`: ``relevance-finetune train``.

Each epoch writes ``last.safetensors`` (with the trainer state, for an exact resume) and, when it
is the best so far, ``best.safetensors``, in the format of :mod:`relevance_finetune.checkpoint`.
With ``head_refit`` the finetune's best is ``best_before_head.safetensors`` and the refit model
``best.safetensors``.
"""
from .command import add_arguments, run
from .config import PRESETS, TrainConfig, read_config_file, resolve_config
from .loop import build_criterion, finetune
from .refit import refit_stage
from .stopping import NonFiniteLossError, TrainingInterrupted

__all__ = [
    "NonFiniteLossError",
    "PRESETS",
    "TrainConfig",
    "TrainingInterrupted",
    "add_arguments",
    "build_criterion",
    "finetune",
    "read_config_file",
    "refit_stage",
    "resolve_config",
    "run",
]
