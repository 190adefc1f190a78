"""Moved: the adaptive runner is runners/worker/adaptive.py, a job's inputs and answers
runners/worker/job_io.py, loading and warm-up runners/worker/loading.py. This name stays only until
tests/test_export.py (owned elsewhere) imports ``run_jobs`` from runners.worker.adaptive: delete it then."""

from runners.worker.adaptive import run_jobs  # noqa: F401
