"""Peak memory of a stretch of the export, for its manifest.

Host: the process's resident-set high-water mark (``VmHWM`` in /proc/self/status), reset at the start
of each stretch by writing 5 to /proc/self/clear_refs (Linux >= 4.0), so a stretch's peak is its own
and not the model load's. Where that file cannot be written the mark is the process's lifetime peak
(``ru_maxrss``), which can only overstate, and ``reset`` says so. CUDA: torch's allocator peak on the
model's device (ONNX Runtime's own CUDA allocations are not in it; ``nvidia-smi`` sees them).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def resident_bytes() -> int:
    """The process's resident set now."""
    return _status_bytes("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_resident_bytes() -> int:
    """The process's resident-set high-water mark since the last reset."""
    return _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Start a new high-water mark at the current resident set; False where the kernel does not allow it."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


@dataclass
class Stretch:
    """What one stretch of work took: host bytes resident at its start and at its peak (and on CUDA,
    torch's allocator at its start and peak)."""

    start: int
    peak: int
    reset: bool
    cuda_start: int | None = None
    cuda_peak: int | None = None

    @property
    def added(self) -> int:
        """Host bytes the stretch added at its peak over what was resident when it began."""
        return max(0, self.peak - self.start)

    def as_dict(self) -> dict:
        row = {"rss_start": self.start, "rss_peak": self.peak, "rss_added": self.added, "peak_reset": self.reset}
        if self.cuda_peak is not None:
            row.update(cuda_start=self.cuda_start, cuda_peak=self.cuda_peak)
        return row


class PeakMemory:
    """``with PeakMemory(device) as stretch: ...``; ``stretch.result`` is a ``Stretch`` afterwards."""

    def __init__(self, device=None):
        self.device = device
        self.result: Stretch | None = None

    def __enter__(self) -> PeakMemory:
        import gc

        gc.collect()
        self._reset = reset_peak()
        self._start = resident_bytes()
        self._cuda_start = None
        if self.device is not None and getattr(self.device, "type", str(self.device)) == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        cuda_peak = None
        if self._cuda_start is not None:
            import torch

            cuda_peak = torch.cuda.max_memory_allocated(self.device)
        self.result = Stretch(self._start, peak_resident_bytes(), self._reset, self._cuda_start, cuda_peak)
