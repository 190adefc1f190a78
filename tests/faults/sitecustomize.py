"""Fault injection for tests against a real server, kept out of the product: a test puts this
folder first on PYTHONPATH, and every Python process of ``bentoml serve`` imports it at start-up.
A request whose prompt contains ``FAULT_PROMPT`` makes the model raise inside the denoising loop,
after its second step, in whichever batching mode (the exception says so, for the test to find in
the worker's log): ``step`` raises for a shared forward that holds such a sample, as a CUDA error
would, and both modes must isolate it. One whose prompt contains ``SLOW_PROMPT`` takes at least
``SLOW_STEP_S`` per step: a long request whose length does not depend on how loaded the machine is
(its real compute is the small part). With ``FLUX_FAULT_LOAD_DELAY_S`` set, loading the model takes
that much longer (a model still loading)."""

import importlib.abc
import os
import sys
import time

FAULT_PROMPT = "raise inside the model"
SLOW_PROMPT = "take your time"
SLOW_STEP_S = 0.3


def _patch(module) -> None:
    """Samples of a faulty request carry a mark from ``prepare``; a ``step`` with any marked sample
    raises, as a CUDA error in a shared forward would: both batching modes must isolate it."""
    prepare, step = module.Inpainter.prepare, module.Inpainter.step

    def prepare_and_mark(self, requests, *args, **kwargs):
        samples = prepare(self, requests, *args, **kwargs)
        for sample in samples:
            sample.faulty = FAULT_PROMPT in requests[sample.row].prompt
            sample.slow = SLOW_PROMPT in requests[sample.row].prompt
        return samples

    def step_or_raise(self, active, *args, **kwargs):
        if any(getattr(s, "slow", False) for s in active):
            time.sleep(SLOW_STEP_S)
        for sample in active:
            if getattr(sample, "faulty", False) and sample.step == 2:
                raise RuntimeError(f"injected fault after step 2/{len(sample.timesteps)}")
        return step(self, active, *args, **kwargs)

    module.Inpainter.prepare = prepare_and_mark
    module.Inpainter.step = step_or_raise
    init = module.Inpainter.__init__

    def slow_init(self, *args, **kwargs):
        time.sleep(float(os.environ.get("FLUX_FAULT_LOAD_DELAY_S", "0")))
        init(self, *args, **kwargs)

    module.Inpainter.__init__ = slow_init


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
