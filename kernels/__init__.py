"""Attention kernels behind one entry point, `causal_attention`.

Installed as `minigpt.kernels`. A Python started in the repository's root
sees this folder as a top-level `kernels` too, the name of HuggingFace's
package that transformers imports when it loads a model: imported under that
name, this module puts the installed package in its place.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        raise ImportError("No module named 'kernels' besides this repository's folder (minigpt.kernels); "
                          "pip install kernels", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement hands out what sys.modules holds once this ends
    _spec.loader.exec_module(_module)
else:
    from minigpt.kernels.backends import causal_attention

    __all__ = ["causal_attention"]
