"""Sums of correlated signals under shaping: left as they are vs weighted as independent.

PoolFormer's and EfficientFormer's token mixer ``x + ls * (pool(x) - x)`` and FastViT's
RepMixer ``x + ls * (mixer(x) - norm(x))`` add values computed from one signal with no
conv/linear layer between. graphshape leaves such sums as they are
(``graphshape.passes.subnetworks.Join.linear_mix``); the reference column weights them as
sums of independent signals (normalized sums, layer scale reset to 1), as graphshape did
before. For each model, shaped both ways in one run, the table gives q and c measured on a
batch of Gaussian images (``graphshape.analyze(..., empirical=True)``) at the last additive
join of the residual stream and at the input of the classifier, with the prediction where
there is one. A model without such sums (the control) shapes the same both ways.

    python benchmarks/correlated_sums.py [--method DKS|TAT] [--batch 8] [--models a,b,...]
"""

from __future__ import annotations

import argparse
import contextlib
import warnings

import torch

import graphshape
from graphshape.passes import subnetworks

MODELS = ("poolformer_s12", "efficientformer_l1", "fastvit_t8", "convnext_atto")


@contextlib.contextmanager
def as_independent():
    """The reference: every correlated sum counts as a join of independent signals."""
    saved = subnetworks.Join.linear_mix
    subnetworks.Join.linear_mix = property(lambda self: False)
    try:
        yield
    finally:
        subnetworks.Join.linear_mix = saved


def _fmt(v):
    return "-" if v is None else f"{v:.3f}"


def measure(name: str, method: str, batch: int, reference: bool):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    x = torch.randn(batch, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with as_independent() if reference else contextlib.nullcontext():
            shaped = graphshape.shape(model, x, method=method, seed=0)
    stats = graphshape.analyze(shaped, x, empirical=True)
    joins = [r for r in stats.rows if r["op"] in ("add", "sub", "sum")]
    last = joins[-1] if joins else None
    head = [r for r in stats.rows if r["op"] == "linear"][-1]
    before_head = stats.rows[stats.rows.index(head) - 1]
    return {"last_join": last, "head_in": before_head}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="DKS")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    print(f"{args.method}, batch {args.batch} of Gaussian images; q / c measured "
          "(predicted in brackets)")
    header = (f"{'model':<20} {'sums':<12} {'last join q':>18} {'last join c':>18} "
              f"{'head input q':>18} {'head input c':>18}")
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        for reference in (True, False):
            label = "independent" if reference else "left as is"
            try:
                r = measure(name, args.method, args.batch, reference)
            except graphshape.GraphshapeError as e:
                print(f"{name:<20} {label:<12} refused: {str(e)[:80]}...", flush=True)
                continue
            j, h = r["last_join"], r["head_in"]
            print(f"{name:<20} {label:<12} "
                  f"{_fmt(j['q_emp']):>7} ({_fmt(j['q_pred']):>7}) "
                  f"{_fmt(j['c_emp']):>7} ({_fmt(j['c_pred']):>7}) "
                  f"{_fmt(h['q_emp']):>7} ({_fmt(h['q_pred']):>7}) "
                  f"{_fmt(h['c_emp']):>7} ({_fmt(h['c_pred']):>7})", flush=True)


if __name__ == "__main__":
    main()
