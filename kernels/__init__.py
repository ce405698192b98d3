"""Triton kernels of cvt_fast, shipped as cvt_fast.kernels. One file per fused op; see each module's docstring. A leaf:
nothing here imports the rest of cvt_fast, and the launchers take tensors and plain numbers.

This folder sits at the top of the repository, so from the repository root (where the working directory comes first
on sys.path) it would also pass for a top-level module `kernels`: the name of a PyPI package that transformers
probes for at import. Under any name but cvt_fast.kernels it therefore steps aside (see _step_aside).
"""

import sys


def _step_aside(name: str) -> None:
    """Leave in sys.modules[name] what `import kernels` would give without this folder: the installed PyPI package
    when there is one, else an empty namespace-like module, which transformers' probe (import it, then look for
    __version__ or __file__) takes for a stray folder rather than an install. Nothing of cvt_fast is reachable
    under this name: the stand-in's __path__ is empty, so `import kernels.attention` fails."""
    import importlib.machinery
    import importlib.util
    import os
    import types

    if name != "kernels":
        raise ImportError(f"{name}: the repository's kernels/ folder is the package cvt_fast.kernels; import that")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is not None and spec.loader is not None and spec.origin not in (None, "namespace"):
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # the import statement returns whatever sys.modules holds once this file has run
        spec.loader.exec_module(module)
        return
    stand_in = types.ModuleType(name, "Not a package: a folder named kernels/ shadowed nothing here.")
    stand_in.__path__ = []
    stand_in.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    stand_in.__spec__.submodule_search_locations = []
    sys.modules[name] = stand_in


if __name__ == "cvt_fast.kernels":
    # The launchers import Triton; launch.py and shapes.py do not, so they are imported on their own and the
    # launchers only on first use (cvt_fast runs without Triton, on its eager path).
    _LAUNCHERS = {"flash_attention": "attention", "qkv_conv_bn": "conv_projection"}
    __all__ = list(_LAUNCHERS)

    def __getattr__(name: str):
        if name not in _LAUNCHERS:
            raise AttributeError(f"module 'cvt_fast.kernels' has no attribute {name!r}")
        import importlib

        return getattr(importlib.import_module(f".{_LAUNCHERS[name]}", __name__), name)

else:
    _step_aside(__name__)
