"""Shape timm models of many families; each must be shaped and runnable, or refused with a
clear GraphshapeError -- never crash.

Run:  nice python benchmarks/shape_timm.py [--method TAT] [--shortcut-weight 0.5] [--set wide]
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

#: ``--set wide``: 44 more families (transformers, MLP mixers, attention CNNs, re-param
#: nets), model name -> input side
WIDE = {
    **{name: 224 for name in (
        "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
        "mixer_s16_224", "resmlp_12_224", "cait_xxs24_224", "xcit_nano_12_p16_224",
        "levit_128s", "efficientformer_l1", "gmlp_ti16_224", "sequencer2d_s",
        "coat_lite_tiny", "pit_ti_224", "twins_svt_small", "visformer_tiny", "convit_tiny",
        "pvt_v2_b0", "mvitv2_tiny", "efficientvit_b0", "repvit_m1", "eva02_tiny_patch14_224",
        "nest_tiny")},
    **{name: 64 for name in (
        "poolformer_s12", "mobilevit_xxs", "nf_resnet26", "resnest14d", "skresnet18",
        "res2net50_26w_4s", "dpn68", "ghostnet_100", "rexnet_100", "edgenext_xx_small",
        "fastvit_t8", "hgnetv2_b0", "ese_vovnet19b_dw", "selecsls42b", "inception_next_tiny",
        "mobileone_s0", "densenetblur121d", "tresnet_m", "convmixer_768_32")},
    **{name: 256 for name in ("botnet26t_256", "halonet26t", "lambda_resnet26t")},
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
    ap.add_argument("--set", choices=("default", "wide"), default="default",
                    help="the 13 families above, or the 44 of WIDE")
    ap.add_argument("--models", default=None, help="comma-separated names (default: the set)")
    args = ap.parse_args()
    sizes = WIDE if args.set == "wide" else MODELS
    counts = {"ok": 0, "refused": 0, "CRASH": 0}
    for name in (args.models.split(",") if args.models else sizes):
        size = sizes.get(name, MODELS.get(name, WIDE.get(name, 64)))
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
