import os

# No telemetry, no token files, CPU DeepSpeed: the same settings the CLI applies (DESIGN §5).
for key, value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                   "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                   "DS_ACCELERATOR": "cpu"}.items():
    os.environ.setdefault(key, value)

from hypothesis import settings

# CI must be reproducible: the same examples every run (raise max_examples locally to explore).
# HYPOTHESIS_PROFILE=explore draws fresh, many more examples.
settings.register_profile("default", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", max_examples=3000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
