"""ONNX in, PyTorch out, with a dynamic batch axis: each model is exported with
``torch.onnx.export(..., dynamo=False)`` (opset 17, axis 0 of the input and output dynamic),
read with ``graphshape.load``, emitted with ``graphshape.to_torch`` and run at a batch size
other than the export's; "same" when it equals onnxruntime on the export to 1e-4 of the
output's scale, or to twice the source model's own distance from onnxruntime where that is
larger (float32 noise), else MISMATCH, "no torch" (a GraphshapeError from the emission) or CRASH.
Also prints how many opaque ONNX nodes the emission wrote as ``graphshape.onnx_functions``
calls (the shape arithmetic around the batch size).

Run:  nice python benchmarks/onnx_to_torch.py [--models a,b] [--timm] [--ort-optimized]
Default models: the torchvision classification builders up to 100M parameters at 224x224
(``--timm``: the timm models of ``benchmarks/shape_timm.py --set wide`` instead).
``--ort-optimized``: check the file onnxruntime saves after optimizing the export
(``ORT_ENABLE_EXTENDED``: FusedConv, FusedGemm, FusedMatMul, QuickGelu, BiasGelu, ...)
instead, count its com.microsoft nodes and compare the DKS parameters it shapes to with the
plain export's ("dks same", or the two answers).
"""

from __future__ import annotations

import argparse
import io
import re
import time


def _export(model, x):
    import onnx
    import torch

    from graphshape.frontends.torch_onnx import quiet_output

    buf = io.BytesIO()
    with quiet_output():
        torch.onnx.export(model, (x,), buf, opset_version=17, dynamo=False,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def _ort_optimized(proto):
    import os
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)


def _dks(proto):
    import os
    import tempfile

    import graphshape

    with tempfile.TemporaryDirectory() as tmp:
        try:
            return graphshape.shape_onnx(proto, os.path.join(tmp, "shaped.onnx"),
                                         method="DKS").activation_params
        except graphshape.GraphshapeError as e:
            # the reason, without the node names (a fused node has its own)
            return "refused: " + re.sub(r"'[^']*'", "'...'", str(e).split("] ")[-1])[:60]


def _check(proto, shape, model):
    import numpy as np
    import onnxruntime as ort
    import torch

    import graphshape

    graph = graphshape.load(proto)
    opaque = sum(n.op == "opaque" for n in graph)
    try:
        gm = graphshape.to_torch(graph)
    except graphshape.GraphshapeError as e:
        return "no torch", opaque, str(e)[:160]
    x = np.random.default_rng(0).normal(size=(3, *shape[1:])).astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    want = ort.InferenceSession(proto.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        got = gm(torch.from_numpy(x))
        source = model(torch.from_numpy(x))
    got = got[0] if isinstance(got, (tuple, list)) else got
    got = got.numpy()
    scale = max(float(np.abs(want).max()), 1e-6)
    err = float(np.abs(got - want).max()) / scale
    # float32 differences between onnxruntime and torch: the source model's own distance
    # from onnxruntime is the noise floor
    floor = float(np.abs(source.numpy() - want).max()) / scale
    same = got.shape == want.shape and err <= max(1e-4, 2 * floor)
    return ("same" if same else "MISMATCH"), opaque, \
        f"max error {err:.1e} of the output's scale (the source model's: {floor:.1e})"


def main():
    import torch
    import torchvision

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=None)
    ap.add_argument("--timm", action="store_true")
    ap.add_argument("--ort-optimized", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.timm:
        import timm

        from shape_timm import WIDE
        names = args.models.split(",") if args.models else list(WIDE)

        def build(name):
            return timm.create_model(name, pretrained=False).eval(), WIDE.get(name, 224)
    else:
        names = args.models.split(",") if args.models else [
            n for n in torchvision.models.list_models(module=torchvision.models)]

        def build(name):
            return torchvision.models.get_model(name, weights=None).eval(), 224
    counts = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            torch.manual_seed(0)
            model, side = build(name)
            if sum(p.numel() for p in model.parameters()) > 100e6:
                continue
            shape = (2, 3, side, side)
            try:
                proto = _export(model, torch.randn(*shape))
            except Exception as e:  # noqa: BLE001 - the exporter's failure, not ours
                status, opaque, detail = "no export", 0, f"{type(e).__name__}"
            else:
                if args.ort_optimized:
                    plain, proto = proto, _ort_optimized(proto)
                status, opaque, detail = _check(proto, shape, model)
                if args.ort_optimized:
                    contrib = sum(n.domain == "com.microsoft" for n in proto.graph.node)
                    mine, theirs = _dks(proto), _dks(plain)
                    detail += f"; {contrib} com.microsoft nodes; " + (
                        "dks same" if mine == theirs else f"DKS DIFFERS: {mine} vs {theirs}")
        except Exception as e:  # noqa: BLE001 - a sweep must survive one model
            status, opaque, detail = "CRASH", 0, f"{type(e).__name__}: {str(e)[:160]}"
        counts[status] = counts.get(status, 0) + 1
        print(f"{name:28s} {status:10s} {time.perf_counter() - t0:5.1f}s  "
              f"{opaque:4d} opaque  {detail}", flush=True)
    print(counts)


if __name__ == "__main__":
    main()
