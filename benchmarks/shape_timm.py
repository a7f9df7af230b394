"""Shape timm models of many families; each must be shaped and runnable, or refused with a
clear GraphshapeError -- never crash.

Run:  nice python benchmarks/shape_timm.py [--method TAT] [--shortcut-weight 0.5]
Prints one line per model: ok (with parameters and seconds), refused (the message) or
CRASH (the exception type and message: a bug).
"""

from __future__ import annotations

import argparse
import time
import traceback

#: model name -> input side (small, but large enough for every downsampling)
MODELS = {
    "resnet18d": 64,            # ResNet-D: avg-pool projection shortcuts, deep stem
    "resnetv2_50": 64,          # pre-activation ResNet
    "densenet121": 64,          # concatenations
    "cspresnet50": 64,          # cross-stage partial
    "dla34": 64,                # deep layer aggregation
    "hrnet_w18_small": 64,      # multi-resolution fusion
    "inception_v3": 96,         # concatenations, max pools
    "legacy_xception": 96,      # separable convs
    "repvgg_a0": 64,            # multi-branch training-time blocks
    "convnext_atto": 64,        # LayerNorm and GELU
    "efficientnet_b0": 64,      # squeeze-excitation, SiLU
    "regnety_002": 64,          # squeeze-excitation
    "mobilenetv3_small_050": 64,  # hard-swish, SE with hard-sigmoid gates
}


def main():
    import torch
    import timm

    import graphshape

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="TAT")
    ap.add_argument("--activation", default=None)
    ap.add_argument("--shortcut-weight", type=float, default=0.5)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    counts = {"ok": 0, "refused": 0, "CRASH": 0}
    for name in args.models.split(","):
        size = MODELS.get(name, 64)
        t0 = time.time()
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, num_classes=10).eval()
            x = torch.randn(2, 3, size, size)
            gm = graphshape.shape(model, x, method=args.method, activation=args.activation,
                                  shortcut_weight=args.shortcut_weight, seed=0)
            out = gm(x)
            out.float().square().mean().backward()
            assert torch.isfinite(out).all(), "non-finite output"
            rep = gm.meta["graphshape"]
            params = "; ".join(f"{k}: " + ", ".join(f"{p}={v:.4g}" for p, v in d.items())
                               for k, d in rep.activation_params.items())
            status, detail = "ok", f"{params} ({len(rep.removed)} removed, " \
                                   f"{len(rep.warnings)} warnings)"
        except graphshape.GraphshapeError as e:
            status, detail = "refused", str(e)
        except Exception as e:  # noqa: BLE001 - reported as a crash
            status = "CRASH"
            detail = f"{type(e).__name__}: {e}\n" + traceback.format_exc(limit=-3)
        counts[status] += 1
        print(f"{name:24s} {status:8s} {time.time() - t0:6.1f}s  {detail[:400]}", flush=True)
    print(counts)


if __name__ == "__main__":
    main()
