"""Export the MONAI bundle as a self-contained Model-Zoo bundle (folder + ZIP) and the network as TorchScript.

``export_bundle`` writes ``<out>/<name>/`` and ``<out>/<name>.zip``. The bundle runs with the Model Zoo's
requirements only (monai, torch, numpy, pytorch-ignite, nibabel, SimpleITK, scikit-image, pandas, matplotlib,
tqdm, scipy, itk): the package's code is vendored under ``scripts/medsegdiff_bundle/`` and every config reference
``medsegdiff_bundle.`` becomes ``scripts.medsegdiff_bundle.`` (plus ``"$import scripts"`` in ``imports``).

``scripts`` must be importable when the configs are parsed. MONAI evaluates the ``imports`` import statements at
the first resolution (``initialize``) and only puts the bundle folder on ``sys.path`` later, inside
``ConfigWorkflow.run()``; a ``"$sys.path.insert(...)"`` entry in ``imports`` is never evaluated (only import
statements there are). So, as for every Model-Zoo bundle with a ``scripts/`` folder, run from the bundle folder
(``python -m monai.bundle run ...`` puts the current folder on ``sys.path``) or put the bundle folder on
``PYTHONPATH``. ``--bundle_root`` (where ``models/``, ``eval/``, ``data/`` go) may point anywhere.

TorchScript: ``torch.jit.script`` of :class:`~medsegdiff_bundle.networks.MedSegDiffV2` fails (the
``ConditionFeatures`` dataclass, the U-SA closure passed as ``stage0_hook``, ``int`` properties computed with
``**``), so :func:`export_torchscript` traces ``forward(x_t, image, timesteps) -> (eps_or_x0, anchor_logits)`` with
``torch.jit.trace``. The traced graph keeps the timestep dependence (the NBP-Filter and AdaGN inputs) and the
spatial and batch sizes dynamic; only the input-validation branches are frozen. ``timesteps`` must have shape
``(B,)``. MONAI's ``ckpt_export`` cannot export ``network_def`` itself: without ``--use_trace`` it scripts (fails as
above) and with ``--use_trace`` it feeds ONE random input (``input_shape``) to a three-input network. The exported
``inference.json`` therefore has a ``network_ts`` item (the traced ``network_def``), which ``ckpt_export`` loads the
checkpoint into and saves as is (``torch.jit.script`` returns a ScriptModule unchanged)::

    python -m monai.bundle ckpt_export network_ts --filepath models/model.ts --ckpt_file models/model.pt \\
        --meta_file configs/metadata.json --config_file configs/inference.json --bundle_root .
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import re
import shutil
import sys
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["export_bundle", "export_torchscript", "trace_network", "example_inputs"]

PKG = "medsegdiff_bundle"  # never spelled out next to "from"/"import" here: this file is vendored and rewritten too
VENDOR_PREFIX = "scripts."
PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_BUNDLE = PACKAGE_DIR.parent / "bundle"

# the python-fire command line (fire is no Model-Zoo requirement); configs never use these modules
EXCLUDED_MODULES = ("cli.py", "__main__.py")
# top-level import name -> distribution, for the packages a Model-Zoo bundle may use (pillow comes with
# matplotlib and scikit-image; monai, torch and numpy have their own metadata fields)
ZOO_IMPORTS = {
    "monai": None, "torch": None, "numpy": None, "ignite": "pytorch-ignite", "nibabel": "nibabel",
    "SimpleITK": "SimpleITK", "skimage": "scikit-image", "pandas": "pandas", "matplotlib": "matplotlib",
    "tqdm": "tqdm", "scipy": "scipy", "itk": "itk", "PIL": "pillow",
}  # fmt: skip
# run-time dependencies that no import statement shows: pandas.DataFrame.to_markdown (metrics_summary.md)
HIDDEN_DEPENDENCIES = ("tabulate",)
DROPPED_PACKAGES = ("medsegdiff-bundle", "fire")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)

_CONFIG_REF = re.compile(rf"(?<![\w.]){PKG}\b")
_CODE_IMPORT = re.compile(rf"\b(from|import)(\s+){PKG}\b")
_VENDORED_BUNDLE_CONFIGS = ('parents[2] / "bundle" / "configs"', 'parents[3] / "configs"')

_LARGE_FILES = """\
# Large files of this bundle (MONAI Model-Zoo convention): weights are not stored in the Zoo repository but
# downloaded from `url` (python -m monai.bundle download / download_large_files) and checked against hash_val.
# PLACEHOLDER: `url` is empty -- upload models/model.pt and put its download URL here before publishing.{note}
large_files:
  - path: "models/model.pt"
    url: ""
    hash_val: "{md5}"
    hash_type: "md5"
"""

_DOCS_NOTE = """\
## This exported bundle

This folder is self-contained: the code of the `{pkg}` package is vendored under `scripts/{pkg}/`
and the configs reference it as `scripts.{pkg}`, so only the Model-Zoo requirements in
`configs/metadata.json` need to be installed. Run the commands from this folder (`python -m monai.bundle run`
puts the current folder on `sys.path`, which `scripts` needs) or add this folder to `PYTHONPATH`; `--bundle_root`
may point elsewhere. The weights are `models/model.pt` (see `large_files.yml`). A TorchScript version of the
network, `forward(x_t, image, timesteps) -> (prediction, anchor_logits)` (traced; `timesteps` of shape `(B,)`):

```bash
python -m monai.bundle ckpt_export network_ts --filepath models/model.ts --ckpt_file models/model.pt \\
    --meta_file configs/metadata.json --config_file configs/inference.json --bundle_root .
```

"""


# -- bundle -----------------------------------------------------------------------------------------------------


def export_bundle(
    out: str | Path = "dist", name: str = "medsegdiff_v2", weights: str | Path | None = None
) -> tuple[Path, Path]:
    """Write the Model-Zoo bundle folder ``<out>/<name>/`` and its ZIP ``<out>/<name>.zip``.

    The folder holds ``configs/`` (references rewritten to ``scripts.medsegdiff_bundle``; ``inference.json`` gains
    ``network_ts`` for ``ckpt_export``), ``docs/README.md``, ``LICENSE``, ``scripts/medsegdiff_bundle/`` (the
    package without its python-fire CLI), ``large_files.yml`` and, when ``weights`` is given, ``models/model.pt``.
    ``metadata.json`` drops ``medsegdiff-bundle`` and ``fire`` from ``required_packages_version`` and adds the
    installed versions of the packages the vendored code uses. The ZIP lists ``<name>/...`` in sorted order with
    fixed timestamps, so the same inputs give the same bytes.

    Args:
        out: output folder.
        name: bundle name (folder and ZIP name).
        weights: a state dict to ship as ``models/model.pt`` (e.g. a training run's ``models/model.pt``).

    Returns:
        ``(folder, zip_path)``.
    """
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"name must be a plain folder name, got {name!r}.")
    if not (SOURCE_BUNDLE / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"the source bundle {SOURCE_BUNDLE} is missing (export needs a source checkout).")
    weights = Path(weights) if weights is not None else None
    if weights is not None and not weights.is_file():
        raise FileNotFoundError(f"weights file {weights} does not exist.")
    out = Path(out)
    folder = out / name
    if folder.exists():
        if any(folder.iterdir()) and not (folder / "configs" / "metadata.json").is_file():
            raise FileExistsError(f"{folder} exists and is not a bundle; refusing to overwrite it.")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    _copy_files(SOURCE_BUNDLE / "configs", folder / "configs")
    _copy_files(SOURCE_BUNDLE / "docs", folder / "docs")
    shutil.copy2(SOURCE_BUNDLE / "LICENSE", folder / "LICENSE")
    imports = _vendor_package(folder / "scripts")
    for path in sorted((folder / "configs").glob("*.json")):
        if path.name != "metadata.json":
            _rewrite_config(path)
    _write_metadata(folder / "configs" / "metadata.json", imports)
    _write_docs(folder / "docs" / "README.md")

    (folder / "models").mkdir()
    md5, note = "", "\n# No weights were exported: models/model.pt is not in this bundle."
    if weights is not None:
        shutil.copyfile(weights, folder / "models" / "model.pt")
        md5, note = _md5(folder / "models" / "model.pt"), ""
    (folder / "large_files.yml").write_text(_LARGE_FILES.format(md5=md5, note=note), encoding="utf-8")

    zip_path = out / f"{name}.zip"
    _write_zip(folder, zip_path)
    return folder, zip_path


def _copy_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        if path.is_file():
            shutil.copy2(path, dst / path.name)


def _package_files() -> list[Path]:
    """The package's files (relative paths) that could be vendored: inside a package, no caches, no dotfiles."""
    files = []
    for path in sorted(PACKAGE_DIR.rglob("*")):
        rel = path.relative_to(PACKAGE_DIR)
        if not path.is_file() or "__pycache__" in rel.parts or any(p.startswith(".") for p in rel.parts):
            continue
        if path.suffix in (".pyc", ".pyo"):
            continue
        if all((PACKAGE_DIR / Path(*rel.parts[:i]) / "__init__.py").is_file() for i in range(1, len(rel.parts))):
            files.append(rel)
    return files


def _module_name(rel: Path) -> str:
    """``data/transforms.py`` -> ``data.transforms``; ``data/__init__.py`` -> ``data``; the root is ``""``."""
    parts = rel.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, rel: Path) -> tuple[set[str], set[str]]:
    """(top-level names of absolute imports, package-internal modules imported) anywhere in a module."""
    external: set[str] = set()
    internal: set[str] = set()
    here = list(rel.parent.parts)

    def add(parts: list[str], names: list[str] = ()) -> None:
        for i in range(len(parts) + 1):
            internal.add(".".join(parts[:i]))
        internal.update(".".join([*parts, n]) for n in names)  # `from . import x`: x may be a submodule

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top, *rest = alias.name.split(".")
                add(rest) if top == PKG else external.add(top)
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            module = node.module.split(".") if node.module else []
            if node.level:
                if node.level - 1 <= len(here):
                    add(here[: len(here) - (node.level - 1)] + module, names)
            elif module and module[0] == PKG:
                add(module[1:], names)
            elif module:
                external.add(module[0])
    return external, internal


def _plan_vendoring() -> tuple[dict[Path, str], dict[Path, str]]:
    """Which package files to vendor (relative path -> source text, ``None`` for data files) and which not (reason).

    Left out: the python-fire CLI, every module that imports a package outside the Model-Zoo requirements (e.g. a
    MONAI Label app), every module that imports a left-out module, and everything inside a left-out package.
    """
    files = _package_files()
    sources = {rel: (PACKAGE_DIR / rel).read_text(encoding="utf-8") for rel in files if rel.suffix == ".py"}
    modules = {_module_name(rel): rel for rel in sources}
    deps: dict[Path, set[str]] = {}
    excluded: dict[Path, str] = {}
    for rel, text in sources.items():
        external, internal = _imports(ast.parse(text, filename=str(rel)), rel)
        deps[rel] = {m for m in internal if m in modules and modules[m] != rel}
        foreign = sorted(m for m in external if m not in ZOO_IMPORTS and m not in sys.stdlib_module_names)
        if len(rel.parts) == 1 and rel.name in EXCLUDED_MODULES:
            excluded[rel] = "command-line entry point (python-fire)"
        elif foreign:
            excluded[rel] = f"imports {', '.join(foreign)} (not a Model-Zoo requirement)"
    changed = True
    while changed:
        changed = False
        left_out_packages = [rel.parent for rel in excluded if rel.name == "__init__.py" and rel.parent.parts]
        for rel in files:
            if rel in excluded:
                continue
            package = next((p for p in left_out_packages if rel.parts[: len(p.parts)] == p.parts), None)
            if package is not None:
                excluded[rel] = f"its package {package.as_posix()}/ is not vendored"
                changed = True
                continue
            bad = sorted(m for m in deps.get(rel, ()) if modules[m] in excluded)
            if bad:
                excluded[rel] = f"imports {', '.join(bad)}, which is not vendored"
                changed = True
    vendored = {rel: sources.get(rel) for rel in files if rel not in excluded}
    return vendored, excluded


def _vendor_package(scripts: Path) -> set[str]:
    """Copy the package to ``scripts/medsegdiff_bundle`` and return the top-level modules its code imports."""
    vendored, excluded = _plan_vendoring()
    left_out = "".join(f"\n* ``{rel.as_posix()}``: {why}" for rel, why in sorted(excluded.items()))
    scripts.mkdir()
    (scripts / "__init__.py").write_text(
        f'"""Code of the ``{PKG}`` package, vendored so that the bundle needs no extra install.\n'
        + (f"\nNot vendored:\n{left_out}\n" if left_out else "")
        + '"""\n',
        encoding="utf-8",
    )
    target = scripts / PKG
    imports: set[str] = set()
    for rel, text in vendored.items():
        dst = target / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if text is None:  # package data (e.g. planning/memory_model.json)
            shutil.copyfile(PACKAGE_DIR / rel, dst)
            continue
        text = _CODE_IMPORT.sub(lambda m: f"{m.group(1)}{m.group(2)}{VENDOR_PREFIX}{PKG}", text)
        if rel.as_posix() == "engine/workflow.py":  # BUNDLE_CONFIGS: <bundle>/configs next to scripts/
            text = text.replace(*_VENDORED_BUNDLE_CONFIGS)
        dst.write_text(text, encoding="utf-8")
        imports |= _imports(ast.parse(text, filename=str(rel)), rel)[0]
    foreign = sorted(m for m in imports if m not in ZOO_IMPORTS and m not in sys.stdlib_module_names and m != "scripts")
    if foreign:  # cannot happen after _plan_vendoring; a guard against editing one without the other
        raise ValueError(f"the vendored code imports {foreign}, which are not Model-Zoo requirements.")
    return imports


def _rewrite(value: Any) -> Any:
    if isinstance(value, str):
        return _CONFIG_REF.sub(f"{VENDOR_PREFIX}{PKG}", value)
    if isinstance(value, list):
        return [_rewrite(v) for v in value]
    if isinstance(value, dict):
        return {k: _rewrite(v) for k, v in value.items()}
    return value


def _rewrite_config(path: Path) -> None:
    """``medsegdiff_bundle.`` -> ``scripts.medsegdiff_bundle.`` everywhere, ``"$import scripts"`` in the imports."""
    config = _rewrite(json.loads(path.read_text(encoding="utf-8")))
    for key in ("imports", "+imports"):
        entries = config.get(key)
        if isinstance(entries, list) and "$import scripts" not in entries:
            first = next((i for i, e in enumerate(entries) if f"import {VENDOR_PREFIX}{PKG}" in str(e)), None)
            if first is not None:
                entries.insert(first, "$import scripts")  # the name `scripts` for the "$scripts...." expressions
    if path.name == "inference.json" and "network_def" in config and "network_ts" not in config:
        config["imports"] = [*config.get("imports", []), f"$import {VENDOR_PREFIX}{PKG}.export"]
        config["network_ts"] = f"${VENDOR_PREFIX}{PKG}.export.trace_network(@network_def, @spatial_dims, @in_channels)"
    path.write_text(json.dumps(config, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _write_metadata(path: Path, imports: set[str]) -> None:
    meta = json.loads(path.read_text(encoding="utf-8"))
    version = meta.get("version")
    if version not in meta.get("changelog", {}):
        raise ValueError(f"metadata.json: version {version!r} has no changelog entry; add one before exporting.")
    packages = {k: v for k, v in meta.get("required_packages_version", {}).items() if k not in DROPPED_PACKAGES}
    needed = [ZOO_IMPORTS[m] for m in sorted(imports) if ZOO_IMPORTS.get(m)] + list(HIDDEN_DEPENDENCIES)
    have = {k.lower() for k in packages}
    for dist in needed:
        installed = _installed(dist)
        if dist.lower() not in have and installed is not None:
            packages[dist] = installed.split("+")[0]
            have.add(dist.lower())
    meta["required_packages_version"] = packages
    path.write_text(json.dumps(meta, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_docs(path: Path) -> None:
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8").replace("bundle/configs/", "configs/")
    text = text.replace(
        f"the Python package `{PKG}`", f"the Python package `{PKG}` (vendored here under `scripts/{PKG}/`)"
    )
    note = _DOCS_NOTE.format(pkg=PKG)
    at = text.find("\n## ")
    text = text + "\n" + note if at < 0 else text[: at + 1] + note + text[at + 1 :]
    path.write_text(text, encoding="utf-8")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_zip(folder: Path, zip_path: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    tmp = zip_path.with_name(zip_path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for path in files:
            info = zipfile.ZipInfo(f"{folder.name}/{path.relative_to(folder).as_posix()}", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes())
    tmp.replace(zip_path)


# -- TorchScript ------------------------------------------------------------------------------------------------


def _spatial_size(network: Any, spatial_dims: int, size: int | Sequence[int] | None) -> tuple[int, ...]:
    if size is None:
        size = 2 * int(getattr(network, "divisor", 8))
    sizes = (int(size),) * spatial_dims if isinstance(size, int) else tuple(int(s) for s in size)
    if len(sizes) != spatial_dims:
        raise ValueError(f"size {size} does not match spatial_dims={spatial_dims}.")
    return sizes


def example_inputs(
    network: Any, spatial_dims: int, in_channels: int, size: int | Sequence[int] | None = None, batch: int = 2,
    seed: int = 0,
) -> tuple[Any, Any, Any]:
    """A fixed ``(x_t, image, timesteps)`` for ``network``: ``(B, M, *S)``, ``(B, in_channels, *S)``, ``(B,)``."""
    import torch

    sizes = _spatial_size(network, spatial_dims, size)
    device = next(network.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    mask_channels = int(getattr(network, "mask_channels", 1))
    x_t = torch.randn((batch, mask_channels, *sizes), generator=gen)
    image = torch.rand((batch, in_channels, *sizes), generator=gen)
    steps = torch.randint(0, 1000, (batch,), generator=gen)
    return x_t.to(device), image.to(device), steps.to(device)


def trace_network(
    network: Any, spatial_dims: int, in_channels: int, size: int | Sequence[int] | None = None
) -> Any:
    """``torch.jit.trace`` of ``network.forward(x_t, image, timesteps)`` on :func:`example_inputs` (eval mode).

    The input checks of the network are Python branches on shapes; the trace freezes them (their TracerWarnings are
    silenced), the computation itself stays dynamic in batch and spatial size. The traced module's parameters are
    the network's, so loading a state dict afterwards (``load_state_dict``, ignite's ``Checkpoint.load_objects``)
    changes its outputs like the network's. Used by the exported ``inference.json``'s ``network_ts`` for
    ``python -m monai.bundle ckpt_export network_ts ...``.
    """
    import torch

    network.eval()
    inputs = example_inputs(network, spatial_dims, in_channels, size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.*", category=FutureWarning)
        traced = torch.jit.trace(network, inputs, check_trace=False)
    # tracing forgets which buffers are non-persistent (U-SA's kernel offsets): without this, loading a state dict
    # (as ckpt_export does, strictly) would ask for keys that checkpoints never contain
    traced_modules = dict(traced.named_modules())
    for name, module in network.named_modules():
        if module._non_persistent_buffers_set and name in traced_modules:
            traced_modules[name]._non_persistent_buffers_set.update(module._non_persistent_buffers_set)
    return traced


def export_torchscript(
    network: Any,
    out_path: str | Path,
    spatial_dims: int,
    in_channels: int,
    size: int | Sequence[int] | None = None,
    method: str = "auto",
    atol: float = 1e-5,
) -> Path:
    """Save ``network`` as TorchScript and check that the saved file reproduces the eager outputs.

    ``method="auto"`` tries ``torch.jit.script`` of the whole model first and falls back to ``torch.jit.trace``
    (:func:`trace_network`). With the current MedSegDiffV2 scripting fails (dataclass ``ConditionFeatures``, the
    U-SA closure, ``2 ** n`` annotated ``int``), so the artefact is TRACED: ``forward(x_t, image, timesteps) ->
    (prediction, anchor_logits)`` with ``timesteps`` of shape ``(B,)``, dynamic in batch and spatial size.

    Args:
        network: a :class:`~medsegdiff_bundle.networks.MedSegDiffV2` (weights loaded).
        out_path: the ``.ts`` file to write.
        spatial_dims, in_channels: the network's input layout.
        size: spatial size of the example input (int or per axis; default twice the network's divisor).
        method: ``auto``, ``script`` or ``trace``.
        atol: tolerance of the eager vs loaded-TorchScript check on the example input.

    Returns:
        ``out_path``.
    """
    import torch

    if method not in ("auto", "script", "trace"):
        raise ValueError(f"method must be auto, script or trace, got {method!r}.")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    network.eval()
    inputs = example_inputs(network, spatial_dims, in_channels, size)
    module = None
    if method in ("auto", "script"):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.jit.*", category=DeprecationWarning)
                warnings.filterwarnings("ignore", message=".*torch.jit.*", category=FutureWarning)
                module = torch.jit.script(network)
        except Exception as error:  # noqa: BLE001 -- TorchScript raises several types for unsupported Python
            if method == "script":
                raise RuntimeError(f"torch.jit.script failed: {error}") from error
    if module is None:
        module = trace_network(network, spatial_dims, in_channels, size)
    torch.jit.save(module, str(out_path))
    loaded = torch.jit.load(str(out_path), map_location=inputs[0].device)
    with torch.no_grad():
        expected = network(*inputs)
        got = loaded(*inputs)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=atol, rtol=0)
    return out_path
