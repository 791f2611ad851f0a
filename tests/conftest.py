import os

# No telemetry, no token files, CPU DeepSpeed: the same settings the CLI applies (DESIGN §5).
for key, value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                   "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                   "DS_ACCELERATOR": "cpu"}.items():
    os.environ.setdefault(key, value)
