"""The trainer tests compile the same tiny train step many times (each CLI run, the
SIGTERM subprocess, the resumed run); a persistent compilation cache private to this
session lets the later ones load it instead of compiling again."""

import atexit
import os
import shutil
import tempfile

import jax

_CACHE = tempfile.mkdtemp(prefix="modjax-test-jit-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE  # inherited by subprocesses
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
