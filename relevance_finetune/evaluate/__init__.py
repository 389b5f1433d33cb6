"""The paper's evaluations (robustness accuracy, the segmentation test, the perturbation test and shortcuts)
and the folder suite, which scores the user's own classes.

- :mod:`.datasets`: one loader per benchmark (published layouts) and the label mappings;
- :mod:`.suites`: the suites and their protocols (``standard`` and ``paper``), :func:`run_suite`;
- :mod:`.folder`: the folder suite (ImageFolder-style splits, with or without masks, with or without groups);
- :mod:`.waterbirds`: the waterbirds suite (per-group and worst-group accuracy on the test split);
- :mod:`.report`: the markdown tables (the paper's layouts);
- :mod:`.figures`: the folder suite's pictures;
- :mod:`.command`: ``relevance-finetune evaluate`` and the ``examples/table*.py`` plumbing.

``relevance-finetune evaluate`` runs one suite for one or two sets of weights and writes
``<suite>.json`` and ``<suite>.md``. Models are built by :func:`relevance_finetune.models.build_model`.
"""
from ..models import build_model, find_weights
from .command import (add_arguments, add_data_arguments, add_table_arguments, evaluate_grid, folder_splits,
                      options_from_args, run, table_models)
from .datasets import (CARTON_CLASS, DATASETS, IN9_CLASSES, IN9_VARIANTS, ROBUSTNESS_DATASETS, SHORTCUT_DATASETS,
                       EvalSet, ImageNetSegmentation, eval_loader, imagenet_synsets, in9_superclasses, load_eval_set,
                       load_imagenet9, load_imagenet_v2, load_objectnet, load_set_a, load_si_score, load_wnid_folders,
                       resolve_path, si_score_label_to_index)
from .figures import probe_chart, relevance_grid, write_folder_figures
from .folder import FolderSplit, evaluate_folder, folder_class_indices
from .report import (FOLDER_COLUMNS, GROUP_MEANS, SEGMENTATION_METRICS, folder_changes, folder_markdown,
                     group_markdown, metric_table, robustness_table, shortcut_rows, write_table)
from .suites import (PAPER_NORMALIZATION, PROTOCOLS, SUITES, EvalOptions, evaluate_imagenet9, evaluate_imagenet_w,
                     evaluate_perturbation, evaluate_robustness, evaluate_segmentation, evaluate_shortcut, run_suite,
                     segmentation_protocol, topk_correct, watermark_transform)
from .waterbirds import evaluate_waterbirds, group_report

__all__ = [
    "CARTON_CLASS",
    "DATASETS",
    "FOLDER_COLUMNS",
    "GROUP_MEANS",
    "IN9_CLASSES",
    "IN9_VARIANTS",
    "PAPER_NORMALIZATION",
    "PROTOCOLS",
    "ROBUSTNESS_DATASETS",
    "SEGMENTATION_METRICS",
    "SHORTCUT_DATASETS",
    "SUITES",
    "EvalSet",
    "ImageNetSegmentation",
    "EvalOptions",
    "FolderSplit",
    "add_arguments",
    "add_data_arguments",
    "add_table_arguments",
    "build_model",
    "eval_loader",
    "evaluate_folder",
    "evaluate_grid",
    "evaluate_imagenet9",
    "evaluate_imagenet_w",
    "evaluate_perturbation",
    "evaluate_robustness",
    "evaluate_segmentation",
    "evaluate_shortcut",
    "evaluate_waterbirds",
    "find_weights",
    "folder_changes",
    "folder_class_indices",
    "folder_markdown",
    "folder_splits",
    "group_markdown",
    "group_report",
    "imagenet_synsets",
    "in9_superclasses",
    "load_eval_set",
    "load_imagenet9",
    "load_imagenet_v2",
    "load_objectnet",
    "load_set_a",
    "load_si_score",
    "load_wnid_folders",
    "metric_table",
    "options_from_args",
    "probe_chart",
    "relevance_grid",
    "resolve_path",
    "robustness_table",
    "run",
    "run_suite",
    "segmentation_protocol",
    "shortcut_rows",
    "si_score_label_to_index",
    "table_models",
    "topk_correct",
    "watermark_transform",
    "write_folder_figures",
    "write_table",
]
