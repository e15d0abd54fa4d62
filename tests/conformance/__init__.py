"""The backend conformance suite: the session, log, replay and crash tests every backend runs.

Each test asks for the ``substrate`` fixture (``conftest.py``): one per usable backend and
memory it serves, chosen by capability (``Capability.HOST_MEMORY``: NumPy arrays and CPU
torch tensors; ``Capability.DEVICE_MEMORY``: CuPy arrays and CUDA torch tensors), never by
backend name. Test bodies make, change and read back their arrays through it
(``substrate.py``), so one body runs unchanged on the host backend and, where a GPU is
usable, on the CuPy backend. ``test_log_bytes.py`` checks that each backend's commit paths
write the host backend's log byte for byte.
"""
