"""The fault suite: the relay, the broker and the API broken on purpose, with figures.

`make chaos` runs every case at full size on a broker of its own and writes
docs/reliability.md; `tests/repository/test_chaos_smoke.py` runs small
versions inside `make test`.
"""
