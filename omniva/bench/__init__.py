"""Every benchmark suite of `manage.py bench`, in the composition layer (see LAYOUT.md:
like urls.py, it may import every app).

harness.py holds what the suites share (BenchError, the suite's database and work
folder, the table); each suite is a module: api.py, queue.py, events.py, live.py,
gpu.py, web.py (with its reference app in reference/) and soak.py. The processes they
start are omniva.processes.ManagedProcess, as for `serve` and the tests.
"""
