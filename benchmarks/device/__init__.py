"""The prepared GPU run (benchmarks/device/run.sh, ``python -m benchmarks device``): see run.py."""
