"""The model registry's language models: logged from their directory, loaded back whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent.parent

# In a fresh process: a first registration (a tiny model) imports what registering needs; then
# the peak RSS (VmHWM, reset by clear_refs) is measured over the registration of `big`.
MEASURE = """
import json, re, sys
from pathlib import Path
import mlflow
from hamu_ray.pipeline import registry

def kib(field):
    return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))

tiny, big, out = map(Path, sys.argv[1:4])
mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")
experiment = mlflow.create_experiment("rss", artifact_location=str(out / "artifacts"))
with mlflow.start_run(experiment_id=experiment):
    registry.log_model({"kind": "causal_lm", "model_dir": str(tiny)}, "warm-up", {})
    Path("/proc/self/clear_refs").write_text("5")
    before = kib("VmRSS")
    info = registry.log_model({"kind": "causal_lm", "model_dir": str(big)}, "big", {"role": "test"})
    peak = kib("VmHWM")
print(json.dumps({"growth_bytes": (peak - before) * 1024, "version": info.registered_model_version}))
"""


@pytest.fixture(scope="module")
def big_lm(tmp_path_factory) -> Path:
    """A ≈21M-parameter Llama (≈86 MB of fp32 safetensors): enough weights to see in RSS."""
    from hamu_ray.tasks import small_llama
    from hamu_ray.tasks.small_llama import SmallLlama
    from tests.lm_fixtures import documentation

    shape = SmallLlama(hidden_size=512, intermediate_size=1536, layers=6, heads=8, vocab_size=1024)
    return small_llama.build(tmp_path_factory.mktemp("big-llama") / "model", shape, documentation().values())


def test_registering_a_language_model_never_loads_its_weights(tiny_lm, big_lm, tmp_path):
    """The driver logs a model from its directory: registering it raises the process's peak RSS
    by less than a quarter of the weights' size (measured: tens of KiB; loading the weights, as
    the registry did, added their whole size), and the registered version is the directory, byte
    for byte, and loads back with the same weights."""
    import mlflow
    import torch
    from safetensors.torch import load_file

    from hamu_ray import receipt

    weights = big_lm / "model.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tiny_lm), str(big_lm), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"weights {weights.stat().st_size / 2**20:.1f} MiB, peak RSS growth {measured['growth_bytes'] / 2**20:.1f} MiB")
    assert measured["growth_bytes"] < weights.stat().st_size / 4

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        uri = f"models:/big/{measured['version']}"
        local = Path(mlflow.artifacts.download_artifacts(uri))
        loaded = mlflow.pyfunc.load_model(uri).unwrap_python_model().model.state_dict()
    finally:
        mlflow.set_tracking_uri(None)
    assert receipt.model_digest(local / "artifacts" / "model") == receipt.model_digest(big_lm)
    exported = load_file(weights)
    assert sorted(loaded) == sorted(exported)
    for name, value in exported.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)


def test_a_registered_language_model_continues_each_prompt_greedily(tiny_lm, tmp_path):
    """The loader's predict (pyfunc): each prompt's greedy continuation, against an argmax loop
    written here over the model's logits (up to max_new_tokens, or the end-of-sequence token)."""
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hamu_ray.pipeline import registry

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        experiment = mlflow.create_experiment("predict", artifact_location=str(tmp_path / "artifacts"))
        with mlflow.start_run(experiment_id=experiment):
            info = registry.log_model({"kind": "causal_lm", "model_dir": str(tiny_lm)}, "tiny", {})
        prompts = ["What is the Python module json for?", "The"]
        continued = mlflow.pyfunc.load_model(info.model_uri, model_config={"max_new_tokens": 6}).predict(prompts)
    finally:
        mlflow.set_tracking_uri(None)

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_lm).eval(), AutoTokenizer.from_pretrained(tiny_lm)
    expected = []
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        start = len(ids)
        with torch.no_grad():
            while len(ids) < start + 6 and (len(ids) == start or ids[-1] != tokenizer.eos_token_id):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        expected.append(tokenizer.decode(ids[start:], skip_special_tokens=True))
    assert continued == expected
    assert all(expected)  # six tokens of a random model: some text to compare
