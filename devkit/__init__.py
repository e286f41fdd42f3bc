"""scm-relay's development kit: the Scantrust API simulator, the demo and the generators
of the committed schemas and settings reference.

Not part of the production wheel or image (pyproject.toml builds the wheel from
`service` alone): `make setup` makes it importable from the source checkout, where
`scm-relay simulator` and `scm-relay demo` load it when they run.
"""
