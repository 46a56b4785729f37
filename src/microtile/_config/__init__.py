"""Configuration: what runs, with which blocking and threads.

``_schema`` names every tunable and option once; ``_context`` holds the values in force,
``get_config``, ``set_num_threads`` and ``config_context``; ``_params`` keeps them as C structs
for the nogil drivers; ``_profile`` reads and writes the tuner's per-machine profile;
``_blocking`` is the analytical cache model and ``_hwinfo`` what the OS says about the caches
and CPUs; ``_threadpool`` is the threadpoolctl controller.
"""
