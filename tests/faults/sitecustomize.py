"""Fault injection for tests against a real server, kept out of the product: a test puts this
folder first on PYTHONPATH, and every Python process of ``bentoml serve`` imports it at start-up.
A request whose prompt contains ``FAULT_PROMPT`` makes the model raise inside the denoising loop,
after its second step (the exception says so, for the test to find in the worker's log). One whose
prompt contains ``SLOW_PROMPT`` takes at least ``SLOW_STEP_S`` per step: a long request whose length
does not depend on how loaded the machine is (its real compute is the small part). With
``FLUX_FAULT_LOAD_DELAY_S`` set, loading the model takes that much longer (a model still loading)."""

import importlib.abc
import os
import sys
import time

FAULT_PROMPT = "raise inside the model"
SLOW_PROMPT = "take your time"
SLOW_STEP_S = 0.3


def _patch(module) -> None:
    run = module.Inpainter.run

    def run_or_raise(self, requests, *args, on_step=None, **kwargs):
        poisoned = {i for i, r in enumerate(requests) if FAULT_PROMPT in r.prompt}
        slow = {i for i, r in enumerate(requests) if SLOW_PROMPT in r.prompt}

        def step_then_raise(index, done, total):
            if on_step is not None:
                on_step(index, done, total)
            if index in slow:
                time.sleep(SLOW_STEP_S)
            if index in poisoned and done == 2:
                raise RuntimeError(f"injected fault after step {done}/{total}")

        return run(self, requests, *args, on_step=step_then_raise, **kwargs)

    module.Inpainter.run = run_or_raise
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
