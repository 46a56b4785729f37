"""microtile's hardware-aware autotuner: ``python -m autotune``.

It probes the machine (``probes``), seeds the blocking from the analytical cache model and
refines it by measurement (``search``, on the harness in ``measure``), and writes the
per-machine profile that ``import microtile`` reads (``profile``).  ``report`` prints the
result beside NumPy.
"""
