"""Benchmarks of the Heimdall service: wrk load, side-by-side systems, profiles, comparisons.

* :mod:`benchmarks.bench`: ``make bench``: wrk against the service in six
  scenarios and against ``mlflow models serve`` and a no-queue reference.
* :mod:`benchmarks.stack`: an isolated stack (private Redis, temporary registry,
  real prefork worker, gunicorn) for one benchmark run.
* :mod:`benchmarks.profile`: py-spy of the API and the workers under load.
* :mod:`benchmarks.load`: closed-loop Python HTTP load against ``POST /api/v1/predict``.
* :mod:`benchmarks.compare`: the measurements behind design choices (message
  forms, batch chords, onnxruntime batch size and threads).

Benchmarks print numbers and write JSON reports; they never assert on timing.
See ``benchmarks/README.md``.
"""
