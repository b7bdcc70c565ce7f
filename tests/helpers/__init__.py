"""Helpers for the tests (imported as `helpers.<module>`; pytest puts tests/ on sys.path, see pyproject.toml).

- `indexes`: indexes built in-process with test defaults, and read back (committed rows, a checked snapshot).
- `images`: encoded pictures and the bad files an indexer must skip.
- `servers`: `serve-images` as a subprocess, a Flask app on a werkzeug thread, a free port.
- `waiting`: `wait_for`, polling a condition until it holds or a timeout passes.
- `browser`: headless Chromium through Playwright, and the checks made on every page.
- `postgres`: a private PostgreSQL server in a temporary folder.
- `training_history`: realistic fine-tune history files.
- `vectors`: synthetic vectors shaped like fc7 (unit length, non-negative, all pointing one way).
- `precision`: what `--precision auto` may pick on this CPU; a skip where it has no bf16 units.

Fixtures stay in tests/conftest.py; no test module imports another test module or conftest.
"""
