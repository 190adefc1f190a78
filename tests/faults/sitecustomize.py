"""Fault injection for tests against a real server, kept out of the product: a test puts this
folder first on PYTHONPATH, and every Python process of ``bentoml serve`` imports it at start-up.
A request whose prompt contains ``FAULT_PROMPT`` makes the model raise inside the denoising loop."""

import importlib.abc
import sys

FAULT_PROMPT = "raise inside the model"


def _patch(module) -> None:
    run = module.Inpainter.run

    def run_or_raise(self, requests, *args, **kwargs):
        if any(FAULT_PROMPT in r.prompt for r in requests):
            raise RuntimeError("injected fault")
        return run(self, requests, *args, **kwargs)

    module.Inpainter.run = run_or_raise


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches runners.pipeline.inpaint when something imports it (the worker does so lazily)."""

    def find_spec(self, name, path, target=None):
        if name != "runners.pipeline.inpaint":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


import importlib.util  # noqa: E402

sys.meta_path.insert(0, _PatchOnImport())
