"""The ``graphshape shape`` and ``graphshape batch`` subcommands (registered in
:mod:`graphshape.cli`).

``shape SRC -o DST``: SRC is an .onnx file, a ``package.module:factory`` spec (imported: it
runs code), or a .pt file holding a pickled ``nn.Module``, a TorchScript archive or a
torch.export ``.pt2`` archive (each read only with ``--trust``: reading them can run code;
see docs/security.md); DST is .onnx,
or .pt for a saved ``torch.fx.GraphModule`` (from any source; ``torch.load(path,
weights_only=False)`` reads it back, the report is in its ``graphshape_report`` attribute).

``batch SRC_DIR -o DST_DIR``: every .onnx file under SRC_DIR (recursively) is shaped into the
same relative path under DST_DIR, ``--jobs`` at a time in worker processes; a failing model
is recorded and the batch goes on. No output may be an input; DST_DIR inside SRC_DIR needs
``--force`` (and is then never read as input). Every file is written atomically. A JSON report (``--report``) holds, per model: status,
error, activations found, parameters, nodes removed and rewritten, and seconds; a summary
table goes to stdout. Exit status 1 if any model failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from graphshape.errors import GraphshapeError

_METHODS = {"dks": "DKS", "tat": "TAT", "untransformed": "untransformed"}


def _unit_float(name):
    def parse(text):
        import argparse

        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if value != value:  # NaN
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}")
        return value
    return parse


def _add_shaping_options(p) -> None:
    from graphshape.passes.shaping import DEFAULT_SHORTCUT_WEIGHT

    p.add_argument("-o", "--output", required=True, metavar="DST",
                   help="where to write the shaped model(s)")
    p.add_argument("--method", default="tat", type=str.lower, choices=sorted(_METHODS),
                   help="dks, tat (default) or untransformed (structure and init only)")
    p.add_argument("--activation", metavar="NAME",
                   help="replace the main-path nonlinearities by this activation "
                        "(e.g. leaky_relu, softplus, tanh)")
    p.add_argument("--shortcut-weight", type=_unit_float("--shortcut-weight"),
                   default=DEFAULT_SHORTCUT_WEIGHT, metavar="W",
                   help=f"residual shortcut weight in [0, 1]; 0 removes skip connections "
                        f"(default {DEFAULT_SHORTCUT_WEIGHT})")
    p.add_argument("--zeta", type=_unit_float("--zeta"), default=1.5, metavar="Z",
                   help="DKS: target maximal C_f'(1) (default 1.5)")
    p.add_argument("--eta", type=_unit_float("--eta"), default=0.9, metavar="E",
                   help="TAT leaky_relu: target maximal C_f(0) (default 0.9)")
    p.add_argument("--tau", type=_unit_float("--tau"), default=0.3, metavar="T",
                   help="TAT smooth activations: target maximal C_f''(1) (default 0.3)")
    p.add_argument("--pln", action="store_true",
                   help="per-location normalization of the inputs (q = 1 everywhere)")
    p.add_argument("--max-pool-to-avg", action="store_true",
                   help="replace max pooling by average pooling")
    p.add_argument("--preactivation-shortcuts", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="let V1 residual blocks' identity shortcuts read the residual stream "
                        "before the activation (pre-activation, V2-style; default: on for "
                        "tat, off for dks and untransformed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the orthogonal initialization")
    p.add_argument("--fold-scales", nargs="?", const="parameters", default="weights",
                   choices=("weights", "parameters", "none"), metavar="MODE",
                   help="move the activations' positive scales and the normalized sums' "
                        "weights onto the conv/linear layers after initialization: "
                        "'weights' (default) computes them on the weights in each forward "
                        "(training unchanged); 'parameters' (also the bare flag) multiplies "
                        "them into the stored parameters (a little faster; changes the "
                        "parametrization training sees); 'none' leaves them elementwise")


def _check_options(args) -> None:
    from graphshape.cli import UsageError

    if not 0.0 <= args.shortcut_weight <= 1.0:
        raise UsageError(f"--shortcut-weight must lie in [0, 1], got {args.shortcut_weight}")
    if args.zeta <= 1.0:
        raise UsageError(f"--zeta must be greater than 1, got {args.zeta}")
    if not 0.0 <= args.eta <= 1.0:
        raise UsageError(f"--eta must lie in [0, 1], got {args.eta}")
    if args.tau <= 0.0:
        raise UsageError(f"--tau must be positive, got {args.tau}")
    if args.activation is not None:
        from graphshape import activations

        if args.activation not in activations.names():
            raise UsageError(f"unknown --activation {args.activation!r}; known: "
                             + ", ".join(activations.names()))


def _options(args) -> dict:
    return dict(method=_METHODS[args.method], activation=args.activation,
                shortcut_weight=args.shortcut_weight, zeta=args.zeta, eta=args.eta,
                tau=args.tau, pln=args.pln, max_pool_to_avg=args.max_pool_to_avg,
                preactivation_shortcuts=args.preactivation_shortcuts, seed=args.seed,
                fold_scales=args.fold_scales)


# --------------------------------------------------------------------------- shape
def add_shape_parser(sub) -> None:
    p = sub.add_parser(
        "shape", help="shape a model with DKS / TAT (no normalization layers needed)",
        description="Remove normalization, normalize the sums, transform the activations "
                    "(DKS or TAT) and re-initialize the weights; write the shaped model.")
    p.add_argument("src", metavar="SRC", help="an .onnx file, a .pt file holding an "
                                             "nn.Module or a TorchScript archive, a "
                                             "torch.export .pt2 archive (these need "
                                             "--trust), or "
                                             "package.module:factory (imports and runs it; "
                                             "e.g. torchvision.models:resnet50), optionally "
                                             "with literal arguments: 'timm:create_model("
                                             "\"resnet50\", num_classes=10)'")
    _add_shaping_options(p)
    p.add_argument("--input-shape", metavar="N,C,H,W[:DTYPE]", action="append",
                   help="example input shape for tracing a factory's or .pt file's model "
                        "(default 1,3,224,224; a .pt2 program's own example inputs); "
                        "':int64' for integer inputs (token ids: drawn below the size of "
                        "the embedding table they index); once per model input, in order")
    p.add_argument("--report", metavar="REPORT.json", help="also write the report as JSON")
    p.add_argument("--trainable-initializers", action="store_true",
                   help="ONNX in, .pt out: the file's float initializers that are no layer's "
                        "weight (a ViT's pos_embed, a layer scale) become parameters of the "
                        "module (default: buffers, frozen in training; the file does not "
                        "say which were parameters)")
    from graphshape.cli import add_trust_option

    add_trust_option(p)
    p.set_defaults(func=cmd_shape)


def cmd_shape(args) -> int:
    from graphshape.cli import UsageError, check_not_input, parse_input_specs, write_text

    _check_options(args)
    dst = args.output
    if not dst.endswith((".onnx", ".pt")):
        raise UsageError(f"-o must end in .onnx or .pt, got {dst!r}")
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise UsageError(f"destination folder {folder!r} does not exist")
    check_not_input(args.src, dst)
    if args.report:
        check_not_input(args.src, args.report)
    options = _options(args)
    is_onnx = args.src.endswith(".onnx") or (
        os.path.isfile(args.src) and not args.src.endswith((".pt", ".pth", ".pt2")))
    if args.trainable_initializers and not (is_onnx and dst.endswith(".pt")):
        raise UsageError("--trainable-initializers is for an ONNX source and a .pt output "
                         "(a PyTorch source keeps its own parameters; an ONNX output's "
                         "initializers are all alike)")
    if is_onnx:
        if not os.path.exists(args.src):
            raise UsageError(f"no such file: {args.src}")
        if dst.endswith(".pt"):  # ONNX in, PyTorch out
            report = _shape_factory(args.src, dst, parse_input_specs(args.input_shape),
                                    options, trainable_initializers=args.trainable_initializers)
        else:
            from graphshape.shaping_api import shape_onnx

            report = shape_onnx(args.src, dst, **options)
    else:
        specs = (parse_input_specs(args.input_shape) if args.input_shape
                 else None if args.src.endswith(".pt2") else [((1, 3, 224, 224), None)])
        report = _shape_factory(args.src, dst, specs, options, trust=args.trust)
    if args.report:
        write_text(args.report, json.dumps(report.to_dict(), indent=1))
    print(f"{args.src} -> {dst}: {report.summary()}")
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _shape_factory(src, dst, shape, options, trust=False, trainable_initializers=False):
    import torch

    from graphshape.cli import UsageError, atomic_write, load_source

    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise UsageError(f"destination folder {folder!r} does not exist")
    graph, inputs = load_source(src, shape, seed=0, trust=trust,
                                cache_weight_norms=False)  # the weights will be replaced
    from graphshape.passes.shaping import shape_graph
    from graphshape.shaping_api import check_shapeable

    options = dict(options)
    pln = options.pop("pln")
    check_shapeable(graph, options["method"])
    shaped, report = shape_graph(graph, **options, copy=False)  # graph is ours to use up
    del graph
    report.options["pln"] = pln
    if dst.endswith(".pt"):
        from graphshape.backend_torch import emit
        from graphshape.shaping_api import _add_pln_torch, warn_frozen_initializers

        gm = emit(shaped, trainable_initializers=trainable_initializers)
        report.options["trainable_initializers"] = trainable_initializers
        warn_frozen_initializers(shaped, report, trainable_initializers,
                                 flag="--trainable-initializers")
        if pln:
            _add_pln_torch(gm)
        # GraphModule.meta is not pickled; a plain attribute is
        gm.meta["graphshape"] = report
        gm.graphshape_report = report.to_dict()
        atomic_write(dst, lambda tmp: torch.save(gm, tmp))
    else:
        from graphshape.backend_onnx import emit
        from graphshape.frontends.torch_onnx import EXPORT_OPSET
        from graphshape.shaping_api import _add_pln_onnx, _check_emitted, save

        try:
            model = emit(shaped, opset=17)
        except GraphshapeError as exc:
            failed = shaped[exc.node] if exc.node in shaped else None
            if failed is None or failed.op != "opaque" or failed.attrs.get("framework") != "torch":
                raise
            # a PyTorch call the writer has no ONNX form for: the PyTorch module's export
            model = _exported_by_torch(shaped, inputs)
            report.warnings.append(
                f"written with torch.onnx.export (TorchScript exporter, opset "
                f"{EXPORT_OPSET}, batch axis dynamic) of the shaped PyTorch module, since "
                f"graphshape's own ONNX writer has no form for PyTorch call {exc.node!r} "
                f"({failed.attrs.get('description', 'opaque')}); the export was "
                "checked against the module in onnxruntime")
        if pln:
            _add_pln_onnx(model)
        entry = model.metadata_props.add()
        entry.key, entry.value = "graphshape", report.to_json()
        _check_emitted(model)
        save(model, dst)  # atomic; external data past 2 GB
    return report


def _exported_by_torch(shaped, inputs):
    """``shaped`` (a graph read from PyTorch) as an ONNX ModelProto written by
    ``torch.onnx.export`` of its emitted module, checked in onnxruntime on other inputs
    (``frontends.torch_onnx.export_checked``); the inputs keep the graph's names. A
    GraphshapeError, before anything is written, where the export fails."""
    from graphshape.backend_torch import emit
    from graphshape.frontends.torch_onnx import export_checked

    module = emit(shaped).eval()
    names = [str(shaped[n].attrs.get("name") or n) for n in shaped.inputs]
    try:
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        proto, _, _ = export_checked(module, args, names)
    except GraphshapeError as exc:
        raise GraphshapeError(f"the shaped model has PyTorch calls without an ONNX form in "
                              f"graphshape's writer, and writing it with torch.onnx.export "
                              f"failed: {exc}; write a .pt instead") from None
    except Exception as exc:  # the exporter raises many types
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise GraphshapeError(
            f"the shaped model has PyTorch calls without an ONNX form in graphshape's writer, "
            f"and torch.onnx.export of it failed ({type(exc).__name__}: {first}); write a "
            ".pt instead") from None
    return proto


# --------------------------------------------------------------------------- batch
def add_batch_parser(sub) -> None:
    p = sub.add_parser(
        "batch", help="shape every .onnx file under a folder",
        description="Shape every .onnx file under SRC_DIR into the same relative path under "
                    "DST_DIR, in parallel; a failing model does not stop the batch. Exit "
                    "status 1 if any model failed.")
    p.add_argument("src", metavar="SRC_DIR", help="folder searched recursively for .onnx files")
    _add_shaping_options(p)
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="models shaped at once, in worker processes (default 1)")
    p.add_argument("--report", metavar="REPORT.json", help="write the per-model JSON report")
    p.add_argument("--force", action="store_true",
                   help="allow DST_DIR inside SRC_DIR (its contents are then never read as "
                        "inputs); existing inputs are never overwritten, even with --force")
    p.set_defaults(func=cmd_batch)


def _shape_one(job):
    """Worker: shape one file; never raises (the batch goes on past failures)."""
    src, dst, options = job
    t0 = time.perf_counter()
    entry = {"model": src, "output": dst, "status": "ok", "error": None,
             "activations_found": {}, "parameters": {}, "removed": 0, "rewritten": 0,
             "warnings": []}
    try:
        import torch

        torch.set_num_threads(1)
        from graphshape.shaping_api import shape_onnx

        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        report = shape_onnx(src, dst, **options)
        entry.update(activations_found=report.activations_found,
                     parameters=report.activation_params, removed=len(report.removed),
                     rewritten=len(report.rewritten), warnings=report.warnings)
    except GraphshapeError as e:
        entry.update(status="failed", error=str(e))
    except Exception as e:  # noqa: BLE001 - a batch must survive any one model
        entry.update(status="failed", error=f"internal error: {type(e).__name__}: {e}")
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    return entry


class _Progress:
    """A one-line progress bar on stderr (a line per model when stderr is not a terminal)."""

    def __init__(self, total):
        self.total, self.done, self.failed = total, 0, 0
        self.tty = sys.stderr.isatty()

    def update(self, entry):
        self.done += 1
        self.failed += entry["status"] != "ok"
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        line = (f"[{bar}] {self.done}/{self.total} ({self.failed} failed) "
                f"{os.path.basename(entry['model'])}: {entry['status']}")
        if self.tty:
            print("\r" + line[:120].ljust(120), end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self):
        if self.tty:
            print(file=sys.stderr)


def _summary_table(entries) -> str:
    rows = [("model", "status", "activations", "removed", "rewritten", "seconds", "error")]
    for e in entries:
        acts = ",".join(sorted(e["activations_found"])) or "-"
        err = (e["error"] or "")
        rows.append((os.path.basename(e["model"]), e["status"], acts, str(e["removed"]),
                     str(e["rewritten"]), f"{e['seconds']:.1f}",
                     err if len(err) <= 60 else err[:59] + "…"))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:6], widths)) + "  " + r[6] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  -----")
    ok = sum(e["status"] == "ok" for e in entries)
    lines.append(f"{ok} of {len(entries)} models shaped, {len(entries) - ok} failed")
    return "\n".join(lines)


def cmd_batch(args) -> int:
    from graphshape.cli import UsageError

    _check_options(args)
    if args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    if not os.path.isdir(args.src):
        raise UsageError(f"SRC_DIR {args.src!r} is not a folder")
    src_root, dst_root = os.path.realpath(args.src), os.path.realpath(args.output)
    if dst_root == src_root:
        raise UsageError("-o must differ from SRC_DIR: graphshape never overwrites its inputs")
    if os.path.exists(dst_root) and not os.path.isdir(dst_root):
        raise UsageError(f"-o {args.output!r} is a file: give a folder")
    if dst_root.startswith(src_root + os.sep) and not args.force:
        raise UsageError(f"-o {args.output!r} lies inside SRC_DIR {args.src!r}: a later batch "
                         "would read the shaped models as inputs; choose a folder outside it, "
                         "or pass --force")
    files = []
    dst_inside_src = dst_root.startswith(src_root + os.sep)
    for folder, dirs, names in os.walk(src_root):
        if dst_inside_src and (os.path.abspath(folder).startswith(dst_root + os.sep)
                               or os.path.abspath(folder) == dst_root):
            dirs[:] = []  # never re-shape our own outputs if DST_DIR is inside SRC_DIR
            continue
        dirs.sort()
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".onnx")]
    if not files:
        raise UsageError(f"no .onnx files under {args.src!r}")
    options = _options(args)
    jobs = [(f, os.path.join(dst_root, os.path.relpath(f, src_root)), options) for f in files]
    inputs = {os.path.realpath(f) for f in files}
    for _, dst, _ in jobs:
        # SRC_DIR inside DST_DIR could map an output onto an input
        if os.path.realpath(dst) in inputs:
            raise UsageError(f"the output {dst!r} would overwrite an input: graphshape never "
                             "overwrites its inputs; choose another -o")
    if args.report:
        report_path = os.path.realpath(args.report)
        if report_path in inputs or os.path.realpath(args.report) in {
                os.path.realpath(d) for _, d, _ in jobs}:
            raise UsageError(f"--report {args.report!r} would overwrite a model file")
        if not os.path.isdir(os.path.dirname(report_path)):
            raise UsageError(f"--report folder {os.path.dirname(report_path)!r} does not exist")
    progress = _Progress(len(jobs))
    entries = []
    if args.jobs == 1 or len(jobs) == 1:
        for job in jobs:
            entries.append(_shape_one(job))
            progress.update(entries[-1])
    else:
        import concurrent.futures as cf
        import multiprocessing

        # spawn: torch and fork do not mix (OpenMP thread pools in the parent)
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=min(args.jobs, len(jobs)), mp_context=ctx) as pool:
            futures = [pool.submit(_shape_one, job) for job in jobs]
            for fut in cf.as_completed(futures):
                entries.append(fut.result())
                progress.update(entries[-1])
        order = {f: i for i, f in enumerate(files)}
        entries.sort(key=lambda e: order[e["model"]])
    progress.close()
    print(_summary_table(entries))
    if args.report:
        from graphshape.cli import write_text

        write_text(args.report, json.dumps({"options": options, "models": entries}, indent=1))
    return 0 if all(e["status"] == "ok" for e in entries) else 1
