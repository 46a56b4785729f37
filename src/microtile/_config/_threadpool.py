"""threadpoolctl integration: ``threadpool_info()`` lists microtile's pool and
``threadpool_limits(n)`` limits it, like OpenBLAS's or OpenMP's.

threadpoolctl finds libraries by the file names of loaded shared objects; the extension
``_mt_pool`` is microtile's, so its name is the prefix the controller claims.
"""
import threadpoolctl


class MicrotileController(threadpoolctl.LibController):
    user_api = "microtile"
    internal_api = "microtile"
    filename_prefixes = ("_mt_pool",)

    def get_num_threads(self):
        from microtile._config._context import get_num_threads
        return get_num_threads()

    def set_num_threads(self, num_threads):
        # A limit, not a request: above the usable CPUs it means all of them (see
        # ``_context._limit_threads``), so no warning, and a forced count is restored.
        from microtile._config._context import _limit_threads
        _limit_threads(num_threads)

    def get_version(self):
        from microtile._version import __version__
        return __version__

    def set_additional_attributes(self):
        from microtile._config._context import get_config
        cfg = get_config()
        self.isa = cfg["isa"]


def register():
    if getattr(threadpoolctl, "_microtile_registered", False):
        return
    threadpoolctl.register(MicrotileController)
    threadpoolctl._microtile_registered = True
