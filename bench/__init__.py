"""spoolagent benchmarks (issue 7): ``python -m bench``; see bench/RESULTS.md."""
