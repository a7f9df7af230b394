"""The ONNX acceptance run: torchvision resnet50, densenet121, mobilenet_v2 and googlenet
exported at opsets 13 and 17, plus an opset-9 caffe2-style ResNet (Sum joins,
BatchNormalization-Mul-Add chains), shaped by one ``graphshape batch``; every output is then
checked: onnx.checker (full), the source opset kept, no normalization node left, onnxruntime
runs it, and different inputs give different outputs.

Run:  nice python benchmarks/shape_onnx_batch.py [--workdir /tmp/gs_batch] [--jobs 2]
      [--method dks --activation softplus --shortcut-weight 0.5]
(DKS with softplus is the option set every one of these models accepts: TAT's default
eta = 0.9 is out of densenet121's reach, and mobilenet_v2's relu6 has no TAT form.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("resnet50", "densenet121", "mobilenet_v2", "googlenet")


def export_all(folder):
    import onnx
    import torch
    import torchvision

    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from shaping_onnx_models import caffe2_style_resnet

    torch.set_num_threads(1)
    os.makedirs(folder, exist_ok=True)
    for name in MODELS:
        kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
        model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
        for opset in (13, 17):
            path = os.path.join(folder, f"{name}_opset{opset}.onnx")
            if not os.path.exists(path):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), path,
                                      opset_version=opset, dynamo=False,
                                      input_names=["image"], output_names=["logits"])
    onnx.save(caffe2_style_resnet(blocks=(3, 3, 3)), os.path.join(folder, "caffe2_resnet_opset9.onnx"))


def verify(src_folder, dst_folder):
    import onnx
    import onnxruntime as ort

    norm = {"BatchNormalization", "LayerNormalization", "InstanceNormalization", "LRN",
            "GroupNormalization"}
    ok = True
    for name in sorted(os.listdir(src_folder)):
        src, dst = os.path.join(src_folder, name), os.path.join(dst_folder, name)
        model = onnx.load(dst)
        onnx.checker.check_model(model, full_check=True)
        opset = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
        src_opset = [o.version for o in onnx.load(src, load_external_data=False).opset_import
                     if o.domain in ("", "ai.onnx")]
        left = {n.op_type for n in model.graph.node} & norm
        sess = ort.InferenceSession(dst, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        rng = np.random.default_rng(0)
        a, b = (sess.run(None, {inp.name: rng.standard_normal(shape).astype(np.float32)})[0]
                for _ in range(2))
        good = opset == src_opset and not left and np.isfinite(a).all() and np.abs(a - b).max() > 1e-4
        ok &= bool(good)
        print(f"{name:28s} opset {opset} norm left {sorted(left) or 'none'} "
              f"max |y1 - y2| {np.abs(a - b).max():.3g}  {'OK' if good else 'FAIL'}")
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/graphshape_onnx_batch")
    ap.add_argument("--jobs", default="2")
    ap.add_argument("--method", default="dks")
    ap.add_argument("--activation", default="softplus")
    ap.add_argument("--shortcut-weight", default="0.5")
    args = ap.parse_args()
    src, dst = os.path.join(args.workdir, "src"), os.path.join(args.workdir, "shaped")
    export_all(src)
    t0 = time.time()
    cmd = [sys.executable, "-m", "graphshape.cli", "batch", src, "-o", dst, "--method",
           args.method, "--activation", args.activation, "--shortcut-weight",
           args.shortcut_weight, "--jobs", args.jobs, "--report",
           os.path.join(args.workdir, "report.json")]
    code = subprocess.call(cmd)
    print(f"graphshape batch exit status {code} ({time.time() - t0:.1f} s)")
    ok = verify(src, dst) and code == 0
    report = json.load(open(os.path.join(args.workdir, "report.json")))
    print(f"{sum(m['status'] == 'ok' for m in report['models'])} of {len(report['models'])} "
          f"shaped; all checks {'passed' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
