"""Shape torchvision's ResNet-50 with DKS and with TAT, inspect it, train it, run it in ONNX.

For each method this script

1. converts ``torchvision.models.resnet50(weights=None)`` with ``graphshape.shape`` and prints
   the shaping report (what was removed / rewritten, the solved activation parameters);
2. prints the per-node kernel statistics of the shaped network (``graphshape.analyze``,
   predicted and measured q and c; the first rows and the last rows);
3. trains it for a few Adam steps on random images and labels (the loss must fall: the
   network memorizes the batch);
4. exports it to ONNX twice: at initialization with graphshape's own ONNX backend
   (``graphshape.to_onnx`` of the shaped IR graph), and after training with
   ``torch.onnx.export(dynamo=False)``; runs both in onnxruntime and prints the largest
   difference from PyTorch's output.

    python examples/resnet_torchvision.py                       # resnet50, 224x224, 4 images
    python examples/resnet_torchvision.py --model resnet18 --size 64 --steps 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

import graphshape
from graphshape.passes.shaping import shape_graph
from graphshape.stats import KernelStats


def run_method(model_name: str, method: str, x: torch.Tensor, labels: torch.Tensor, *,
               steps: int, lr: float, onnx_dir: str, stats_rows: int) -> dict:
    """Shape, inspect, train and export one network; returns what was measured."""
    import torchvision

    torch.manual_seed(0)
    source = getattr(torchvision.models, model_name)(weights=None)
    start = time.perf_counter()
    # graphshape.shape(source, x, ...) does these three steps and returns the PyTorch module;
    # here the shaped IR graph is kept too, for analyze() and the ONNX backend.
    graph = graphshape.load(source, x)
    # TAT needs a leaky_relu (ReLU has no TAT transform); DKS keeps ReLU
    activation = "leaky_relu" if method == "TAT" else None
    shaped_graph, report = shape_graph(graph, method=method, activation=activation, seed=0)
    shaped = graphshape.to_torch(shaped_graph)
    shape_seconds = time.perf_counter() - start
    print(f"\n=== {model_name} {method}: shaped in {shape_seconds:.2f} s")
    print(report.summary())
    removed_ops: dict[str, int] = {}
    for entry in report.removed:
        removed_ops[entry["op"]] = removed_ops.get(entry["op"], 0) + 1
    print(f"removed by op: {removed_ops or 'none'}")
    for warning in report.warnings:
        print(f"warning: {warning}")

    stats = graphshape.analyze(shaped_graph, x, empirical=True)
    rows = stats.rows
    print(f"\nper-node kernel statistics ({len(rows)} nodes; first and last {stats_rows}):")
    print(KernelStats(rows[:stats_rows] + rows[-stats_rows:], stats.meta).table())

    # the IR's own ONNX backend, before training: same function as the PyTorch module?
    import onnx

    shaped.eval()
    with torch.no_grad():
        expected_init = shaped(x).numpy()
    init_path = os.path.join(onnx_dir, f"{model_name}_{method.lower()}_init.onnx")
    onnx.save(graphshape.to_onnx(shaped_graph), init_path)
    init_diff = _max_abs_diff_onnxruntime(init_path, x, expected_init)
    print(f"graphshape.to_onnx ({os.path.getsize(init_path) / 1e6:.1f} MB) in onnxruntime vs "
          f"PyTorch, at initialization: max |difference| {init_diff:.2e} "
          f"(output max |value| {np.abs(expected_init).max():.2f})")

    optimizer = torch.optim.Adam(shaped.parameters(), lr=lr)
    shaped.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(shaped(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"training on one random batch ({steps} Adam steps, lr {lr:g}): loss "
          + " -> ".join(f"{v:.3f}" for v in losses))

    # the trained module, exported by PyTorch's TorchScript-based exporter
    shaped.eval()
    with torch.no_grad():
        expected = shaped(x).numpy()
    onnx_path = os.path.join(onnx_dir, f"{model_name}_{method.lower()}_trained.onnx")
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(shaped, (x[:1],), onnx_path, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}},
                          opset_version=17, dynamo=False)
    max_abs_diff = _max_abs_diff_onnxruntime(onnx_path, x, expected)
    print(f"trained model via torch.onnx.export in onnxruntime vs PyTorch: max |difference| "
          f"{max_abs_diff:.2e} (output max |value| {np.abs(expected).max():.2f})")
    return {"report": report, "stats": stats, "losses": losses,
            "onnx_init_max_abs_diff": init_diff, "onnx_max_abs_diff": max_abs_diff,
            "output_scale": float(np.abs(expected).max()), "shape_seconds": shape_seconds}


def _max_abs_diff_onnxruntime(path: str, x: torch.Tensor, expected: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float(np.abs(got - expected).max())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a torchvision.models name")
    parser.add_argument("--methods", default="DKS,TAT")
    parser.add_argument("--size", type=int, default=224, help="image side")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="training steps")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--stats-rows", type=int, default=8)
    parser.add_argument("--onnx-dir", default="", help="where the .onnx files go "
                        "(default: a temporary folder, deleted at the end)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    labels = torch.randint(0, 1000, (args.batch,), generator=generator)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = args.onnx_dir or tmp
        os.makedirs(onnx_dir, exist_ok=True)
        for method in args.methods.split(","):
            results[method] = run_method(args.model, method, x, labels, steps=args.steps,
                                         lr=args.lr, onnx_dir=onnx_dir,
                                         stats_rows=args.stats_rows)
    return results


if __name__ == "__main__":
    main()
