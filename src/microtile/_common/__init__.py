"""What every layer shares: the index and float types (``_typedefs.pxd``), small inline helpers
(``_inline.pxd``), the input rules of the public calls (``_checks``), the thread pool every
threaded kernel runs on (``_mt_pool``, whose file name threadpoolctl matches), per-thread
aligned scratch memory (``_scratch``), atomic 64-bit integers for state that threads share
(``_atomic64.pxd``), a monotonic clock (``_clock.pxd``), signal polling that lets Ctrl-C stop
a long kernel (``_interrupt``), and atomic writes and safe reads of files (``_files``)."""
