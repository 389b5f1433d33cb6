"""Imports run one way (docs/architecture.md): every module imports only from layers below its own,
and none imports the package's ``__init__`` (the public API, which imports every layer)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "relevance_finetune"
# Lowest first. A name covers the module or package and everything under it, unless a longer name
# is listed ("masks.command" is a command; the rest of masks is mask making). "" is the package's
# own __init__, which imports the public API from every layer.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("_files", "_version"),                                          # atomic writes; the version
    ("gae",),                                                        # the core (gae.fused: its fused-attention path)
    ("losses", "metrics", "probes", "augment", "viz"),               # on relevance maps and images
    ("images", "masks.imagenet_s", "checkpoint"),                    # files and formats (ImageNet-S's mask format)
    ("data", "masks", "models", "head"),                             # datasets, masks, models, the head refit
    ("groups",),                                                     # group-labelled datasets (Waterbirds, CelebA)
    ("recipes",),                                                    # named finetuning recipes
    ("train", "evaluate", "export", "explain", "masks.command"),     # the commands
    ("bench",),                                                      # the demo: trains, evaluates, exports
    ("cli", ""),                                                     # the command line and the public API
    ("__main__",),                                                   # python -m relevance_finetune
)
_LAYER_OF = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def layer(module: str) -> int:
    """The layer of dotted ``module`` (relative to the package): its longest listed prefix."""
    parts = module.split(".") if module else []
    for end in range(len(parts), -1, -1):
        prefix = ".".join(parts[:end])
        if prefix in _LAYER_OF and (end or not parts):
            return _LAYER_OF[prefix]
    raise AssertionError(f"relevance_finetune.{module} is in no layer: add it to LAYERS and docs/architecture.md")


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, package: Path) -> list[str]:
    """The package modules that ``node`` imports (relative to the package); ``""`` is the package's ``__init__``."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        return [n.partition(".")[2] for n in names if n.split(".")[0] == package.name]
    if node.level:
        base = module.split(".") if module else []
        base = base if is_package else base[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    elif (node.module or "").split(".")[0] == package.name:
        target = node.module.partition(".")[2]
    else:
        return []
    folder = package.joinpath(*target.split(".")) if target else package
    submodules = [a.name for a in node.names if (folder / f"{a.name}.py").is_file() or (folder / a.name).is_dir()]
    targets = [f"{target}.{name}".lstrip(".") for name in submodules]
    if len(submodules) < len(node.names):
        targets.append(target)
    return targets


def violations(package: Path = PACKAGE) -> list[str]:
    """``'a imports b (layer i -> j)'`` for each import that does not run one way, and
    ``'a imports __init__'`` for each import of a name from the package's ``__init__``."""
    found = []
    for path in sorted(package.rglob("*.py")):
        module = _module_name(path, package)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported(node, module, path.name == "__init__.py", package):
                if target == "" and module != "":
                    found.append(f"{module} imports __init__")
                    continue
                same_package = target.split(".")[0] == module.split(".")[0]
                if layer(target) > layer(module) or (layer(target) == layer(module) and not same_package):
                    found.append(f"{module or '__init__'} imports {target} (layer {layer(module)} -> {layer(target)})")
    return sorted(set(found))


def test_imports_run_one_way():
    assert violations() == []


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer(_module_name(path, PACKAGE))


def test_sideways_and_upward_imports_are_found(tmp_path):
    package = tmp_path / "relevance_finetune"
    (package / "masks").mkdir(parents=True)
    (package / "__init__.py").write_text("__version__ = '0'\nfrom .data import x\n")
    (package / "data.py").write_text("from .masks.tokencut import x\n")
    (package / "masks" / "__init__.py").write_text("from .command import y\n")
    (package / "masks" / "command.py").write_text("def f():\n    import relevance_finetune.train\n")
    assert violations(package) == ["data imports masks.tokencut (layer 4 -> 4)",
                                   "masks imports masks.command (layer 4 -> 7)",
                                   "masks.command imports train (layer 7 -> 7)"]


def test_imports_of_the_package_init_are_found(tmp_path):
    package = tmp_path / "relevance_finetune"
    (package / "gae").mkdir(parents=True)
    (package / "__init__.py").write_text("from ._version import __version__\nfrom .gae import attach_gae\n")
    (package / "_version.py").write_text("__version__ = '0'\n")
    (package / "export.py").write_text("from . import __version__\n")
    (package / "cli.py").write_text("from relevance_finetune import attach_gae\n")
    (package / "__main__.py").write_text("def f():\n    import relevance_finetune\n")
    (package / "gae" / "__init__.py").write_text("from .handle import attach_gae\n")
    (package / "gae" / "handle.py").write_text("from .. import _version\nfrom . import handle\n")
    assert violations(package) == ["__main__ imports __init__", "cli imports __init__", "export imports __init__"]
