"""q (mean square) of the residual stream of shaped networks at initialization, measured on
real forward passes: at the 1st, 2nd, 4th and 8th residual join, mid-depth and the last.
DKS/TAT keep q near 1 where the theory applies (ResNets, ConvNeXt with its layer scales set
to 1); attention is outside it and averages over tokens, which shrinks q.

Run:  python benchmarks/residual_q.py [--models resnet50,convnext_tiny,vit_b_16,swin_t]
Models are torchvision builders (weights=None; other names are timm models, input 224 px
where the name ends in 224) shaped with graphshape.shape (seed 0) on
i.i.d. Gaussian pixels, then measured on those and on smooth images (bilinear upsampling of
an 8x8 Gaussian image, unit mean square), 2 examples each.
"""

from __future__ import annotations

import argparse
import warnings

#: input side per model (vit needs 224)
SIZES = {"vit_b_16": 224, "vit_b_32": 224}


def _join_qs(gm, x) -> list[float]:
    """q at the output of every residual join (the normalized sums graphshape emits,
    ``graphshape.torch_modules.WeightedSum``, whatever their names: ``add_3`` from PyTorch,
    ``stages_0_0_Add`` from an ONNX export), in execution order."""
    import torch
    from torch.fx import Interpreter

    from graphshape.torch_modules import WeightedSum

    qs = []

    class Recorder(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if (n.op == "call_module" and isinstance(gm.get_submodule(n.target), WeightedSum)
                    and torch.is_tensor(out)):
                qs.append(float(out.float().pow(2).mean()))
            return out

    with torch.no_grad():
        Recorder(gm).run(x)
    return qs


def main():
    import torch
    import torch.nn.functional as F
    import torchvision

    import graphshape

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet50,convnext_tiny,vit_b_16,swin_t")
    ap.add_argument("--methods", default="TAT,DKS")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print("| model | method | input | joins | q: 1st | 2nd | 4th | 8th | mid | last |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.models.split(","):
        torch.manual_seed(0)
        if name in torchvision.models.list_models():
            model = torchvision.models.get_model(name, weights=None).eval()
        else:  # a timm model
            import timm

            model = timm.create_model(name, pretrained=False).eval()
        size = SIZES.get(name, 224 if name.endswith("224") else 64)
        iid = torch.randn(2, 3, size, size)
        smooth = F.interpolate(torch.randn(2, 3, 8, 8), size=(size, size), mode="bilinear",
                               align_corners=False)
        smooth = smooth / smooth.pow(2).mean().sqrt()
        for method in args.methods.split(","):
            gm = graphshape.shape(model, iid, method=method, seed=0)
            for label, x in (("i.i.d.", iid), ("smooth", smooth)):
                qs = _join_qs(gm, x) or [float("nan")]  # (a network without joins)
                picks = [qs[i] if i < len(qs) else float("nan")
                         for i in (0, 1, 3, 7)] + [qs[len(qs) // 2], qs[-1]]
                print(f"| {name} | {method} | {label} | {len(qs)} | "
                      + " | ".join(f"{q:.3g}" for q in picks) + " |", flush=True)


if __name__ == "__main__":
    main()
