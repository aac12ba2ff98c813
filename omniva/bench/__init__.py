"""Benchmark suites of `manage.py bench` that compose every app (see LAYOUT.md: `omniva/bench/`).

`web` lives here (web.py, with its reference app in reference/); the older suites
still live beside the code they measure and move here as they are touched.
"""
