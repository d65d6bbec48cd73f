"""Benchmarks of the Heimdall service: a load test and side-by-side comparisons.

* :mod:`benchmarks.stack`: an isolated stack (private Redis, temporary registry,
  real prefork worker, gunicorn) for one benchmark run.
* :mod:`benchmarks.load`: closed-loop HTTP load against ``POST /api/v1/predict``.
* :mod:`benchmarks.compare`: the measurements behind design choices (message
  forms, batch chords, onnxruntime batch size and threads).

Benchmarks print numbers and write JSON reports; they never assert on timing.
See ``benchmarks/README.md``.
"""
