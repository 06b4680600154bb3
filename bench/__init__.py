"""The benchmark (`make bench`, `python -m bench`): batch against bare clients on the same simulator, as ratios
measured in one run. Not part of the runtime: `batch` never imports it, and it is not installed with it."""
