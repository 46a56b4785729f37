"""The tuner's compiled timing probes (``python -m autotune`` stays pure Python): CPUID cache
leaves (``_cpuid``), a pointer-chasing latency curve (``_latency``) and the micro-kernel's
peak (``_peak``)."""
