"""microtile's hardware-aware autotuner: ``python -m autotune``.

It probes the machine (``probes``), seeds the blocking from the analytical cache model and
refines it by measurement (on the harness in ``measure``), and writes the per-machine
profile that ``import microtile`` reads (``profile``).  ``tuner`` runs it all; ``report``
prints the result beside NumPy.

The search: ``plan`` runs one dtype's steps in order on the shared state and primitives of
``tuning``: the cache blocking (``blocking_search``), then the thresholds (``thresholds``);
``conv_search`` tunes the convolution's option.
"""
