"""The loader a registered language model carries (MLflow's "models from code": registry.py logs
this file beside the model's Hugging Face directory, and never imports it).

`mlflow.pyfunc.load_model(uri)` reads the weights (load_context), on the machine that loads it;
`.unwrap_python_model().model` and `.tokenizer` are then the Hugging Face objects, and `predict`
continues each prompt by greedy decoding. Loading needs MLflow, transformers and torch, not
hamu-ray: the file imports nothing of it.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

DIRECTORY = "model"  # the artifact's name (registry.LM_ARTIFACT)


class LanguageModel(PythonModel):
    def load_context(self, context) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory = context.artifacts[DIRECTORY]
        self.model = AutoModelForCausalLM.from_pretrained(directory).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.max_new_tokens = int(context.model_config["max_new_tokens"])  # registry.LM_MODEL_CONFIG

    def predict(self, model_input: list[str], params=None) -> list[str]:
        return [self.continuation(prompt) for prompt in model_input]

    def continuation(self, prompt: str) -> str:
        """The greedy continuation (at most max_new_tokens, up to the end-of-sequence token),
        one prompt at a time: no padding, so none of a batch's pad-token conventions."""
        import torch

        ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=self.max_new_tokens)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


mlflow.models.set_model(LanguageModel())
