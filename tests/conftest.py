import os

from hamu_ray.engine.driver import LOCAL_RAY_ENV, RUNTIME_ENV_DEFAULTS

# The embedded driver's settings (no telemetry, no token files, Ray Train's quick polls) plus CPU
# DeepSpeed (docs/design.md §9).
for key, value in {**RUNTIME_ENV_DEFAULTS, **LOCAL_RAY_ENV, "DS_ACCELERATOR": "cpu"}.items():
    os.environ.setdefault(key, value)

from hypothesis import settings

# CI must be reproducible: the same examples every run (raise max_examples locally to explore).
# HYPOTHESIS_PROFILE=explore draws fresh, many more examples.
settings.register_profile("default", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", max_examples=3000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for one test module (2 CPUs), shut down after it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_run_dir(tmp_path_factory):
    """One output directory for the digits pipeline and search tests: stages are cached by
    content, so whichever runs second reuses the sets, the original and the oracle (~80 s)."""
    return tmp_path_factory.mktemp("digits") / "run"


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A ≈0.85M-parameter Llama and its BPE tokenizer, saved with save_pretrained (tests/lm_fixtures.py)."""
    from tests.lm_fixtures import build_tiny_lm

    return build_tiny_lm(tmp_path_factory.mktemp("tiny-llama") / "model")


# ---- the test process's exit ----------------------------------------------------------------
# Many Ray sessions start and stop in this one process (each pipeline's ray_session); threads
# that used one (Ray Data's executors, a fit's daemon thread) can outlive it, and the interpreter's
# teardown then frees Ray's core-worker state under them: CI saw a segfault after every test had
# passed (exit 139; ray-project/ray#31145 is the same crash). The tests' verdict is final once
# pytest has reported, so the process ends there, without the teardown, naming what was alive.
_exit_status = None


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    import sys
    import threading

    if _exit_status is None or os.environ.get("HAMU_TEST_TEARDOWN") == "1":  # =1: the full teardown
        return
    alive = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
    if alive:
        print(f"conftest: ending without interpreter teardown; {len(alive)} threads still alive "
              f"({', '.join(alive[:8])}{', …' if len(alive) > 8 else ''})", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
