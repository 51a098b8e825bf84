"""Running the project on a lent GPU machine that has no network.

- :mod:`.bundle`: ``sglang-cacheflow gpu-bundle`` builds the folder that travels
  there (cp312 wheels of what SGLang needs beyond the machine's packages, a
  trimmed SGLang, this project, a Redis-compatible server), at most 64 MiB.
- :mod:`.check`: ``sglang-cacheflow gpu-check``: SGLang with ``--enable-cacheflow``
  on the GPU, forced split restores from Redis checked against no reuse.
- ``run.sh``: the one prepared device command: unpacks the bundle, then runs
  ``restore-bench`` (reference runtime), ``gpu-check`` and ``sglang-bench --device
  cuda``, each within its own time limit, everything written to ``$OUT``.
"""
