"""The ``graphshape`` command line. One function per subcommand (``cmd_<name>``), each
registered by an ``add_<name>_parser`` function; ``main`` dispatches.

Exit status: 0 on success, 1 when graphshape could not do the job (the message says why),
2 for bad arguments; either way one line on stderr. ``--debug`` (anywhere on the command
line) also prints the full traceback. Every file is written atomically (a temp file in the
destination folder, then ``os.replace``): an error never leaves a half-written output.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from graphshape.atomic import atomic_write as _atomic_write
from graphshape.errors import GraphshapeError


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and exit status 2."""

    def error(self, message):  # noqa: D102 (argparse API)
        self.exit(2, f"{self.prog}: error: {message}\n")


class UsageError(Exception):
    """A bad argument found after parsing (exit 2)."""


# --------------------------------------------------------------------------- shared helpers
def atomic_write(path: str, write) -> None:
    """:func:`graphshape.atomic.atomic_write` (the temp name keeps ``path``'s extension),
    after checking ``path`` as a command-line destination (exit 2 if it is not one)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"destination folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{path!r} is a folder: give a file path")
    _atomic_write(path, write, keep_extension=True)


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)
    atomic_write(path, write)


def check_not_input(src: str, dst: str) -> None:
    """graphshape never overwrites its input."""
    if os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst) or (
            os.path.abspath(src) == os.path.abspath(dst)):
        raise UsageError(f"-o {dst!r} is the input file: graphshape never overwrites its "
                         "input; choose another path")


def parse_shape(text: str) -> tuple[int, ...]:
    """"1,3,224,224" -> (1, 3, 224, 224)."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"--input-shape must be comma-separated positive integers, got {text!r}") from None
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape must be comma-separated positive integers, got {text!r}")
    return shape


def load_source(src: str, input_shape: tuple[int, ...] | None, *, seed: int = 0,
                default_shape: tuple[int, ...] = (2, 3, 224, 224), trust: bool = False,
                cache_weight_norms: bool = True):
    """Load SRC (an .onnx file, a .pt/.pth file, or ``package.module:factory``) into a Graph.

    Returns (graph, example_inputs): a batch of standard normal inputs of ``input_shape``
    (for a factory or .pt file, ``default_shape`` when not given; for an ONNX file, None
    when not given; for a torch.export ``.pt2`` archive, its own example inputs when not
    given). A ``.pt`` file is read with ``torch.load(weights_only=True)``; a pickled module,
    a TorchScript archive and a ``.pt2`` archive need ``trust=True`` (``--trust``). A factory
    spec imports (runs) its module.
    ``cache_weight_norms``: as :func:`graphshape.load` (False when shaping: the weights
    are about to be replaced).
    """
    import graphshape

    if src.endswith((".pt", ".pth", ".pt2")):
        if not os.path.exists(src):
            raise UsageError(f"no such file: {src}")
        from graphshape.api import load_pt

        import torch

        module = load_pt(src, trust=trust)
        if not isinstance(module, torch.nn.Module) and input_shape is None:
            # a torch.export program: traced with its own example inputs (its shapes may
            # be static, which a default shape would not match)
            graph = graphshape.load(module, cache_weight_norms=cache_weight_norms)
            return graph, None
        inputs = _random_inputs(input_shape or default_shape, seed)
        return graphshape.load(module, inputs, cache_weight_norms=cache_weight_norms), inputs

    if src.endswith(".onnx") or os.path.exists(src):
        if not os.path.exists(src):
            raise UsageError(f"no such file: {src}")
        graph = graphshape.load(src, cache_weight_norms=cache_weight_norms)
        inputs = None
        if input_shape is not None:
            inputs = _random_inputs(input_shape, seed)
        return graph, inputs
    module_name, factory_name, args, kwargs = parse_factory_spec(src)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"cannot import {module_name!r} from {src!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - the imported module's own code failed
        raise GraphshapeError(f"importing {module_name!r} failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UsageError(f"{module_name!r} has no callable {factory_name!r}")
    try:
        model = factory(*args, **kwargs)
    except Exception as e:
        call = src if "(" in src else f"{src}()"
        raise GraphshapeError(f"{call} failed: {type(e).__name__}: {e}") from None
    inputs = _random_inputs(input_shape or default_shape, seed)
    return graphshape.load(model, inputs, cache_weight_norms=cache_weight_norms), inputs


def parse_factory_spec(src: str) -> tuple[str, str, tuple, dict]:
    """``package.module:factory`` or ``package.module:factory(arguments)`` -> (module name,
    factory name, positional arguments, keyword arguments). The arguments must be Python
    literals (numbers, strings, booleans, None, tuples, lists, dicts), as in
    ``torchvision.models:resnet50(num_classes=10)`` or
    ``timm:create_model('resnet50', num_classes=10)``: they are read, never evaluated."""
    import ast

    usage = (f"SRC must be an .onnx file or package.module:factory (optionally with literal "
             f"arguments: package.module:factory(num_classes=10)), got {src!r}")
    module_name, colon, call = src.partition(":")
    if not colon or not module_name or not call:
        raise UsageError(usage)
    try:
        tree = ast.parse(call.strip(), mode="eval").body
    except SyntaxError:
        raise UsageError(usage) from None
    if isinstance(tree, ast.Name):
        return module_name, tree.id, (), {}
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)):
        raise UsageError(usage)
    if any(k.arg is None for k in tree.keywords) or any(isinstance(a, ast.Starred)
                                                         for a in tree.args):
        raise UsageError(f"{src!r}: *args / **kwargs are not accepted, only literal arguments")
    try:
        args = tuple(ast.literal_eval(a) for a in tree.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in tree.keywords}
    except ValueError:
        raise UsageError(f"the arguments in {src!r} must be Python literals (numbers, strings, "
                         "True/False/None, tuples, lists, dicts): they are read, not run") from None
    return module_name, tree.func.id, args, kwargs


def _random_inputs(shape, seed):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen)


# --------------------------------------------------------------------------- inspect
def add_inspect_parser(sub) -> None:
    p = sub.add_parser(
        "inspect", help="per-node kernel statistics (q and c at initialization)",
        description="Propagate the kernel of example inputs through the network and print, "
                    "per node, predicted (and with --empirical measured) q and c, C_f(0), "
                    "C_f'(1), C_f''(1) and flags.")
    p.add_argument("src", metavar="SRC", help="an .onnx file or package.module:factory "
                                             "(e.g. torchvision.models:resnet50, or with "
                                             "literal arguments 'torchvision.models:"
                                             "resnet50(num_classes=10)')")
    p.add_argument("--input-shape", metavar="N,C,H,W",
                   help="shape of the random normal example batch (default for factories: "
                        "2,3,224,224; for ONNX files without it: two unit-q uncorrelated "
                        "examples); c needs N >= 2")
    p.add_argument("--empirical", action="store_true",
                   help="also run the model and measure q and c at every node")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", metavar="OUT.png", help="write a q/c-along-depth plot (PNG)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random example batch")
    add_trust_option(p)
    p.set_defaults(func=cmd_inspect)


def add_trust_option(p) -> None:
    p.add_argument("--trust", action="store_true",
                   help="allow a .pt SRC that holds a pickled module or a TorchScript "
                        "archive, or a torch.export .pt2 SRC (reading them can run "
                        "arbitrary code: only for files you trust); see docs/security.md")


def cmd_inspect(args) -> int:
    from graphshape.passes.analysis import analyze

    shape = parse_shape(args.input_shape) if args.input_shape else None
    if args.plot and not args.plot.lower().endswith(".png"):
        raise UsageError(f"--plot writes a PNG: give a path ending in .png, got {args.plot!r}")
    graph, inputs = load_source(args.src, shape, seed=args.seed, trust=args.trust)
    if args.empirical and inputs is None:
        inputs = _random_inputs(_graph_input_shape(graph), args.seed)
    from graphshape.api import check_example_inputs

    check_example_inputs(graph, inputs)
    stats = analyze(graph, inputs, empirical=args.empirical)
    if args.json:
        print(stats.to_json())
    else:
        print(stats.table())
    for warning in stats.meta.get("warnings", ()):
        print(f"warning: {warning}", file=sys.stderr)
    if args.plot:
        atomic_write(args.plot, stats.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def _graph_input_shape(graph):
    if len(graph.inputs) != 1:
        raise UsageError("--empirical on a model with several inputs needs example inputs "
                         "(use the Python API, graphshape.analyze)")
    shape = graph[graph.inputs[0]].shape
    if shape is None:
        raise UsageError("the model's input shape is unknown: pass --input-shape")
    # symbolic or unknown dims (a dynamic batch, say) become 2
    return tuple(d if isinstance(d, int) and d > 0 else 2 for d in shape)


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphshape",
                     description="Deep Kernel Shaping and Tailored Activation Transformations "
                                 "as a compiler pass over PyTorch and ONNX graphs.")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, also print the full traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    add_inspect_parser(sub)
    from graphshape.cli_shape import add_batch_parser, add_shape_parser  # shaping helper

    add_shape_parser(sub)
    add_batch_parser(sub)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the command line
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = f"graphshape {args.command}: error:"
    try:
        return args.func(args)
    except UsageError as e:
        if debug:
            traceback.print_exc()
        print(f"{prefix} {_one_line(e)}", file=sys.stderr)
        return 2
    except GraphshapeError as e:
        if debug:
            traceback.print_exc()
        hint = "" if debug or e.__cause__ is None else " (run with --debug for the traceback)"
        print(f"{prefix} {_one_line(e)}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"graphshape {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback with --debug
        if debug:
            traceback.print_exc()
        print(f"{prefix} internal error ({type(e).__name__}: {_one_line(e)}); this is a "
              "graphshape bug: please report it"
              + ("" if debug else " (run with --debug for the traceback)"), file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
