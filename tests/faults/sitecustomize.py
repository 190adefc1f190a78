"""Fault injection for tests against a real server, kept out of the product: a test puts this
folder first on PYTHONPATH, and every Python process of ``bentoml serve`` imports it at start-up.
A request whose prompt contains ``FAULT_PROMPT`` makes the model raise inside the denoising loop,
in any step that includes it."""

import importlib.abc
import sys

FAULT_PROMPT = "raise inside the model"


def _patch(module) -> None:
    """Samples of a faulty request carry a mark from ``prepare``; a ``step`` with any marked sample
    raises, as a CUDA error in a shared forward would: both batching modes must isolate it."""
    prepare, step = module.Inpainter.prepare, module.Inpainter.step

    def prepare_and_mark(self, requests, *args, **kwargs):
        samples = prepare(self, requests, *args, **kwargs)
        for sample in samples:
            sample.faulty = FAULT_PROMPT in requests[sample.request].prompt
        return samples

    def step_or_raise(self, active, *args, **kwargs):
        if any(getattr(s, "faulty", False) for s in active):
            raise RuntimeError("injected fault")
        return step(self, active, *args, **kwargs)

    module.Inpainter.prepare = prepare_and_mark
    module.Inpainter.step = step_or_raise


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
