"""Running the project on a lent GPU machine that has no network.

- :mod:`.bundle`: ``sglang-cacheflow gpu-bundle`` builds the folder that travels
  there (cp312 wheels of what SGLang needs beyond the machine's packages, a
  trimmed SGLang, this project, a Redis-compatible server), at most 64 MiB.
- :mod:`.check`: ``sglang-cacheflow gpu-check``, the one prepared run on the
  device: SGLang with ``--enable-cacheflow`` checked against no reuse, restore
  TTFT per policy on SGLang and on the reference runtime, all written as JSON.
- ``run.sh``: the device command (installs the bundle, then runs the check).
"""
