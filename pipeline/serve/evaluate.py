"""``pipeline evaluate``: the lecture's bounds for a trained model on a shard set.

Reports the ELBO, the IWAE-K estimate of ln Q(y), their gap (an estimate of
KL(P_Psi(z|y), Q_Phi(z|y)), the lecture's second ELBO expression), bits/dim, rate and
distortion in bits, active units and PSNR.
"""

from __future__ import annotations

import json
import os

import torch

from pipeline.serve.registry import ModelRef, load


def main(args) -> int:
    from pipeline.data.heldout import iter_images
    from pipeline.model import evaluate

    tracking = os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    m = load(ModelRef.parse(args.model, tracking))
    size = m.model_config["image_size"]
    channels = m.model_config["in_channels"]
    batches = []
    for i, x in enumerate(
        iter_images(args.data, args.batch_size, image_size=size, channels=channels)
    ):
        if args.batches and i >= args.batches:
            break
        batches.append(x)
    with torch.no_grad():
        res = evaluate(m.vae, batches, k=args.k)
    out = {k: float(v) for k, v in res.items() if not torch.is_tensor(v) or v.numel() == 1}
    out.update(model=f"{m.name}/{m.version}", images=sum(len(b) for b in batches), k=args.k)
    print(json.dumps(out, indent=1, sort_keys=True))
    return 0
