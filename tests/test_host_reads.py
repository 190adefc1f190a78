"""A denoising step makes no host-device transfer in a steady state (a GPU proxy, counted on the CPU).

On a GPU each such transfer stalls the host until the queued kernels have run, and rules out CUDA
graphs (runners/pipeline/host_reads.py). The counter is checked first, so that a count of zero means
something; then a steady step of "none" samples (mixed LoRAs included) must count 0, and a step of
the first-block cache exactly its one stated read.
"""

from __future__ import annotations

import pytest
import torch

from runners.config import AccelerationSettings, LoraSettings, ModelSettings
from runners.pipeline.host_reads import count_host_reads
from runners.pipeline.inpaint import Inpainter, InpaintInputs
from runners.pipeline.model import load_model
from tests.test_loop import inputs
from tests.test_lora import write_lora


def test_the_counter_sees_every_kind_of_transfer():
    x = torch.arange(4.0)
    for action, kind in [
        (lambda: x[1].item(), "reads"),
        (lambda: float(x[2]), "reads"),
        (lambda: bool(x[0] > 1), "reads"),
        (lambda: x.tolist(), "reads"),
        (lambda: x.numpy(), "reads"),
        (lambda: torch.tensor([1, 2]), "writes"),
        (lambda: x[[0, 2]], "writes"),
        (lambda: x.to("cpu"), "writes"),
        (lambda: x.to(device=torch.device("cpu"), dtype=torch.float64), "writes"),
    ]:
        with count_host_reads() as counted:
            action()
        assert getattr(counted, kind) == 1 and counted.count == 1, (kind, counted)
    with count_host_reads() as counted:  # device-side work only
        torch.stack([x, x * 2]).sum(dim=0).to(torch.float64)
        x.index_select(0, torch.zeros(2, dtype=torch.long))
    assert counted.count == 0, counted
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0]  # and the patches are gone after the block


@pytest.fixture(scope="module")
def lora_inpainter(tiny_dir):
    settings = ModelSettings(
        model=str(tiny_dir), max_sequence_length=32, safety_checker=str(tiny_dir / "safety_checker")
    )
    model = load_model(settings, LoraSettings(max_per_request=4, max_rank=16, memory_max_bytes=64 * 1024**2))
    # threshold above 2: every step the rules allow is skipped, so the cache's read happens each step
    return Inpainter(model, AccelerationSettings(threshold=5.0, max_consecutive_skips=50))


@pytest.fixture(scope="module")
def two_loras(lora_inpainter, tmp_path_factory):
    from runners.lora.formats import linear_shapes

    model = lora_inpainter.model
    shapes = linear_shapes(model.pipeline.transformer)
    directory = tmp_path_factory.mktemp("host-read-loras")
    files = [write_lora(directory, f"l{rank}", rank, rank, shapes) for rank in (2, 4)]
    return [model.adapters.get(f.path, f.sha256, f.name) for f in files]


def requests(acceleration: str, loras) -> list[InpaintInputs]:
    return [
        inputs(
            prompt=f"prompt {i}",
            seed=i,
            num_inference_steps=8,
            guidance_scale=3.5 + i,
            num_images=1 + i % 2,
            acceleration=acceleration,
            loras=request_loras,
        )
        for i, request_loras in enumerate(loras)
    ]


def counted_steps(inpainter: Inpainter, group: list[InpaintInputs], warm_steps: int, counted: int):
    with torch.inference_mode():
        samples = inpainter.prepare(group, 64, 48)
        with inpainter.loras_applied([r.loras for r in group]):
            for _ in range(warm_steps):  # the first steps make the per-size constants and row indices
                inpainter.step(samples, 64, 48)
            counts = []
            for _ in range(counted):
                with count_host_reads() as transfers:
                    inpainter.step(samples, 64, 48)
                counts.append(transfers)
    return counts


def test_a_steady_step_makes_no_transfer_with_mixed_loras(lora_inpainter, two_loras):
    first, second = two_loras
    group = requests("none", [[(first, 0.8)], [(second, 1.0), (first, 0.3)], []])
    for transfers in counted_steps(lora_inpainter, group, warm_steps=1, counted=3):
        assert transfers.count == 0, transfers.by_op


def test_a_first_block_cache_step_makes_its_one_stated_read_and_no_copy(lora_inpainter, two_loras):
    first, _ = two_loras
    group = requests("regular", [[(first, 1.0)], []])
    # step 0 is a warm-up step (no candidate, no read); from step 1 the cache decides every step
    steps = counted_steps(lora_inpainter, group, warm_steps=2, counted=4)
    for transfers in steps:
        assert transfers.reads == 1 and transfers.writes == 0, transfers.by_op
        assert transfers.by_op == {"Tensor.tolist": 1}
