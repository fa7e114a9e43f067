"""Environment fixes that must run before timm or torchvision is imported.

PyPI's torchvision is linked against CUDA torch. Next to the CPU torch wheel its C++
extension fails to load, and ``import torchvision`` (so ``import timm``) dies with
``operator torchvision::nms does not exist``. We only use torchvision's pure-Python
parts, so where the extension really does not load we define the two op schemas that
its import-time registrations need. Where it loads (a matching build), we do nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_OP_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# The schemas live only as long as this object: keep a module-level reference.
_torchvision_library: torch.library.Library | None = None


def _op_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


def _extension_loads(package_dir: Path) -> bool:
    for lib in sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd")):
        try:
            torch.ops.load_library(str(lib))
            return True
        except (OSError, RuntimeError):
            return False
    return False


def ensure_torchvision_importable() -> bool:
    """Make ``import timm`` work; returns True when the op-schema fix was applied."""
    global _torchvision_library
    if _torchvision_library is not None or "torchvision" in sys.modules:
        return _torchvision_library is not None
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    if _extension_loads(Path(spec.origin).parent):
        return False
    missing = [name for name in _OP_SCHEMAS if not _op_exists(name)]
    if not missing:
        return False
    library = torch.library.Library("torchvision", "DEF")
    for name in missing:
        library.define(_OP_SCHEMAS[name])
    _torchvision_library = library
    return True
