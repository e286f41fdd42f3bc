"""A deterministic simulation of the whole relay (`make sim`, docs/design.md section 13).

The relay's real stages run against an in-memory Kafka (`kafka.py`) and an in-memory
Scantrust API (`api.py`) on a virtual clock (`vloop.py`), with every random choice
drawn from one seed; an oracle that shares no code with the relay (`oracle.py`)
judges each history.
"""
