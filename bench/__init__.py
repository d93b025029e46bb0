"""GPU benchmarks and faithfulness checks against the official Wan2.2 code (run from the
repository root: `python -m bench.harness ...`, see bench/run_on_device.sh)."""
