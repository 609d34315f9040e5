"""The registered model's pyfunc (MLflow "models from code": nothing is pickled).

``predict`` takes images (N, C, H, W) float32 in [0, 1] and returns reconstructions
(the decoder's mean at the posterior mode). The sampling job does not use this: it reads
the ``weights`` and ``config`` artifacts directly and rebuilds the VAE.
"""

from __future__ import annotations

import json

import mlflow.pyfunc
from mlflow.models import set_model


class VAEPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from pipeline.model import build_model, load_weights

        with open(context.artifacts["config"]) as f:
            self.meta = json.load(f)
        with open(context.artifacts["weights"], "rb") as f:
            self.vae = build_model(self.meta["model"])
            self.vae.load_state_dict(load_weights(f.read()))
            self.vae.eval()

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            out, _ = self.vae(x, sample_posterior=False)
            return self.vae.likelihood.mean(out).clamp(0, 1).numpy()


set_model(VAEPyfunc())
