"""Runtime cost of shaping: shaped ResNet-50 against the BatchNorm original (CPU or CUDA).

    python benchmarks/runtime.py [--batch 8] [--size 128] [--steps 5] [--compile] [--fold-scales]
                                 [--channels-last] [--threads 1] [--device cuda] [--onnx]
                                 [--bias-floor]

Networks (torchvision resnet50, weights=None):

* ``original``     the BatchNorm network (train mode for the training step, eval for inference);
* ``bn->identity`` the original with every BatchNorm2d replaced by nn.Identity: the floor a
                   normalizer-free network can reach (no φ̂ cost);
* ``bn->identity + bias`` (``--bias-floor``) that floor with a zero bias on every conv, as
                   the shaped networks have (batch norm's shift moves there): what is left
                   over it is φ̂'s cost and the scaled weights';
* ``dks``, ``tat`` ``graphshape.shape(method=...)`` (TAT: leaky_relu), as shaped by default:
                   activation scales and sum weights moved onto the conv layers, which
                   compute with scaled weights (``fold_scales="weights"``: the parameters
                   and the training are those of the unfolded network);
* ``... (unfolded)``, ``... (folded params)`` (``--fold-scales``) the same with
                   ``fold_scales="none"`` (the scales as elementwise passes) and with
                   ``fold_scales="parameters"`` (multiplied into the stored parameters:
                   a different parametrization for training).

Measured: one training step (forward, cross-entropy, backward, SGD step) and one inference
forward pass in eval mode under ``torch.no_grad``. Every network is timed in turn in each
round (so that load from other processes hits them alike); the table shows median times and
the medians over rounds of the per-round ratios to the original (goal: training step <= 0.85x)
and to ``bn->identity`` (issue #6: shaped nets at most ~5% over that floor). ``--compile`` also times
``torch.compile``d versions (compilation is slow, so it is opt-in; warm-up steps excluded).
``--device cuda`` runs everything on the GPU (each timing between ``torch.cuda.synchronize``
calls); ``--onnx`` also times every network exported to ONNX under onnxruntime (its CUDA
provider on a cuda device).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings


def _networks(x, fold_scales=False, bias_floor=False):
    import torch.nn as nn
    import torchvision

    import graphshape

    def original():
        import torch

        torch.manual_seed(0)
        return torchvision.models.resnet50(weights=None)

    def no_bn():
        model = original()
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.BatchNorm2d):
                    setattr(module, child_name, nn.Identity())
        return model

    def no_bn_with_bias():
        import torch

        model = no_bn()
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and module.bias is None:
                module.bias = nn.Parameter(torch.zeros(module.out_channels))
        return model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nets = {"original": original(), "bn->identity": no_bn()}
        if bias_floor:
            nets["bn->identity + bias"] = no_bn_with_bias()
        modes = {"weights": ""}
        if fold_scales:
            modes.update({"none": " (unfolded)", "parameters": " (folded params)"})
        for mode, suffix in modes.items():
            nets["dks" + suffix] = graphshape.shape(original(), x[:1], method="DKS", seed=0,
                                                    fold_scales=mode)
            nets["tat" + suffix] = graphshape.shape(original(), x[:1], method="TAT",
                                                    activation="leaky_relu", seed=0,
                                                    fold_scales=mode)
        return nets


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--channels-last", action="store_true",
                        help="every network and the input in torch.channels_last")
    parser.add_argument("--fold-scales", action="store_true",
                        help="also time dks and tat shaped with fold_scales='none' and "
                             "fold_scales='parameters'")
    parser.add_argument("--device", default="cpu",
                        help="torch device for the networks and the batch (cpu, cuda, cuda:1)")
    parser.add_argument("--bias-floor", action="store_true",
                        help="also time the bn->identity floor with a zero bias on every conv")
    parser.add_argument("--onnx", action="store_true",
                        help="also export every network (eval mode, opset 17) and time "
                             "onnxruntime inference: CUDAExecutionProvider for a cuda "
                             "--device (where onnxruntime has it), CPUExecutionProvider else")
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device")
    x = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 1000, (args.batch,))
    networks = _networks(x, fold_scales=args.fold_scales, bias_floor=args.bias_floor)
    onnx_rows = _onnx_inference(networks, x, device, args.steps) if args.onnx else None
    x, labels = x.to(device), labels.to(device)
    networks = {name: m.to(device) for name, m in networks.items()}
    # CUDA runs asynchronously: wait for the device before reading the clock
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        networks = {name: m.to(memory_format=torch.channels_last)
                    for name, m in networks.items()}
    variants = dict(networks)
    if args.compile:
        variants.update({f"{name} (compiled)": torch.compile(model)
                         for name, model in networks.items()})
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-4) for name, m in variants.items()}

    def train_step(name):
        model = variants[name]
        model.train()
        loss = F.cross_entropy(model(x), labels)
        optimizers[name].zero_grad()
        loss.backward()
        optimizers[name].step()

    def infer(name):
        model = variants[name]
        model.eval()
        with torch.no_grad():
            model(x)

    for name in variants:  # warm-up (and compilation)
        for _ in range(2 if "compiled" in name else 1):
            train_step(name)
            infer(name)
    times = {(name, what): [] for name in variants for what in ("train", "infer")}
    for _ in range(args.steps):
        for name in variants:
            for what, fn in (("train", train_step), ("infer", infer)):
                sync()
                start = time.perf_counter()
                fn(name)
                sync()
                times[(name, what)].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}

    layout = ", channels_last" if args.channels_last else ""
    where = (f"CPU, {args.threads} thread(s)" if device.type == "cpu"
             else f"{device} ({torch.cuda.get_device_name(device)})")
    print(f"resnet50, batch {args.batch}x3x{args.size}x{args.size}{layout}, {where}, "
          f"median of {args.steps}, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| network | training step | vs original | vs bn->identity | inference (eval) | "
          "vs original | vs bn->identity |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    ratios, floor_ratios = {}, {}
    for name in variants:
        compiled = " (compiled)" if "compiled" in name else ""
        for what in ("train", "infer"):
            # median of the per-round ratios: each pair was timed back to back, so a burst of
            # load from other processes tends to hit both sides of a ratio
            for out, base in ((ratios, "original"), (floor_ratios, "bn->identity")):
                out[(name, what)] = statistics.median(
                    a / b for a, b in zip(times[(name, what)], times[(base + compiled, what)]))
        cells = " | ".join(f"{med[(name, what)]:.3f} s | {ratios[(name, what)]:.2f}x | "
                           f"{floor_ratios[(name, what)]:.2f}x" for what in ("train", "infer"))
        print(f"| {name} | {cells} |")
    if onnx_rows is not None:
        provider, rows = onnx_rows
        base = rows["original"]
        print(f"\nonnxruntime inference ({provider}), median of {args.steps}")
        print("| network | inference | vs original |")
        print("| --- | ---: | ---: |")
        for name, seconds in rows.items():
            print(f"| {name} | {seconds:.4f} s | {seconds / base:.2f}x |")
    return {"median_seconds": med, "ratios": ratios, "floor_ratios": floor_ratios,
            "onnx": onnx_rows}


def _onnx_inference(networks, x, device, steps: int):
    """Export each network (eval mode, opset 17, TorchScript exporter) to a temporary
    folder and time one onnxruntime inference of ``x`` per round, all networks in turn:
    ``(provider, {name: median seconds})``. On a cuda device the CUDA provider is used
    where onnxruntime has it; the input is fed from host memory, as a serving caller would."""
    import io

    import onnxruntime as ort
    import torch

    available = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise SystemExit("--onnx on cuda: this onnxruntime has no CUDAExecutionProvider "
                             f"(available: {available}); install onnxruntime-gpu")
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0})]
    else:
        providers = ["CPUExecutionProvider"]
    sessions = {}
    for name, model in networks.items():
        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (x,), buffer, opset_version=17, dynamo=False,
                              input_names=["x"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        sessions[name] = ort.InferenceSession(buffer.getvalue(), options, providers=providers)
    feed = {"x": x.numpy()}
    for session in sessions.values():  # warm-up (CUDA: kernels, memory arenas)
        session.run(None, feed)
    times = {name: [] for name in sessions}
    for _ in range(steps):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[name].append(time.perf_counter() - start)
    provider = sessions["original"].get_providers()[0]
    return provider, {name: statistics.median(v) for name, v in times.items()}


if __name__ == "__main__":
    main()
