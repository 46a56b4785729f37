"""The micro-kernels and how one is chosen.

``_ukernel.pxd`` is the contract (one table of function pointers per ISA and dtype, the typed
call wrappers the drivers use, and the panel copies packing uses); ``_avx2`` (compiled with
``-mavx2 -mfma``) and ``_generic`` (portable C) fill it; ``_dispatch`` reads CPUID/XGETBV
(``_cpu_features.h``) and imports the AVX2 module only where the CPU and OS support it.  mr
and nr are written only here: every driver asks the table.
"""
