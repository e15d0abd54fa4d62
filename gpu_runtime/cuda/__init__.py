"""The CUDA side of the device substrate: the CuPy backend and what it runs on.

Importing this package imports neither CuPy nor the CUDA bindings (CI, with no
GPU, compiles the kernels and checks the task layouts through it); the
modules that need them import them when used. One module per concept:

* ``backend`` — ``CupyBackend``, the backend contract on the GPU;
  ``region`` — its per-region state.
* ``commit`` — the commit paths; ``fences`` — stream fences; ``memory`` —
  pinned and registered memory; ``restore`` — restore pipelines.
* ``executor`` — the persistent kernel's host side; ``tasks`` — typed task
  layouts (and the generated ``kernels/tasks.cuh``); ``compiler`` — NVRTC
  with a cache; ``compile_all`` — every shipped specialization, for CI.
* ``instrument`` / ``ptx`` — the module-load interposer that inserts
  pause/checkpoint hooks into user kernels.

Kernel sources are in ``kernels/`` (``executor.cu``, ``verify.cu``,
``concordia.cuh``, ``tasks.cuh``).
"""

__all__: list[str] = []
