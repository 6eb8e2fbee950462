"""The pure policy core: typed snapshots in, decisions out; no I/O, no clock reads.

Used unchanged by the live runtime (orchestrator.runtime) and by the simulator
(simulations). Time always arrives as an argument (``now_s``) or via a Clock.
"""
