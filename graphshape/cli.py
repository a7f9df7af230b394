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


#: dtypes an --input-shape may name (":int64")
INPUT_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16",
                "int8", "uint8", "bool")


def parse_input_specs(values) -> list[tuple[tuple[int, ...], str | None]] | None:
    """``--input-shape`` values (one per model input, in order), each ``N,C,H,W`` or
    ``N,L:int64`` -> [(shape, dtype or None)]; None when none was given."""
    if not values:
        return None
    if isinstance(values, str):
        values = [values]
    specs = []
    for text in values:
        shape_text, colon, dtype = text.partition(":")
        if colon and dtype not in INPUT_DTYPES:
            raise UsageError(f"--input-shape {text!r}: unknown dtype {dtype!r} (one of "
                             f"{', '.join(INPUT_DTYPES)})")
        specs.append((parse_shape(shape_text), dtype or None))
    return specs


def load_source(src: str, input_specs, *, seed: int = 0,
                default_shape: tuple[int, ...] = (2, 3, 224, 224), trust: bool = False,
                cache_weight_norms: bool = True):
    """Load SRC (an .onnx file, a .pt/.pth file, or ``package.module:factory``) into a Graph.

    ``input_specs``: [(shape, dtype or None)] per model input (:func:`parse_input_specs`),
    or None. Returns (graph, example_inputs): random inputs of those specs
    (:func:`random_inputs`; for a factory or .pt file, one standard normal batch of
    ``default_shape`` when not given; for an ONNX file, None when not given; for a
    torch.export ``.pt2`` archive, its own example inputs when not given). A ``.pt`` file
    is read with ``torch.load(weights_only=True)``; a pickled module, a TorchScript archive
    and a ``.pt2`` archive need ``trust=True`` (``--trust``). A factory spec imports (runs)
    its module.
    ``cache_weight_norms``: as :func:`graphshape.load` (False when shaping: the weights
    are about to be replaced).
    """
    from graphshape.ir import is_non_float

    if input_specs is not None and not isinstance(input_specs, list):
        input_specs = [(tuple(input_specs), None)]  # (a bare shape)
    graph, inputs, used_specs = _load_source(src, input_specs, seed, default_shape, trust,
                                             cache_weight_norms)
    if used_specs and (inputs is None or any(is_non_float(d) for _, d in used_specs)):
        # (integer inputs again, now that the graph says which embedding table each indexes;
        # an ONNX file's inputs for the first time)
        inputs = random_inputs(used_specs, seed, index_bounds(graph))
    return graph, inputs


def _load_source(src, input_specs, seed, default_shape, trust, cache_weight_norms):
    import graphshape

    if src.endswith((".pt", ".pth", ".pt2")):
        if not os.path.exists(src):
            raise UsageError(f"no such file: {src}")
        from graphshape.api import load_pt

        import torch

        module = load_pt(src, trust=trust)
        if not isinstance(module, torch.nn.Module) and input_specs is None:
            # a torch.export program: traced with its own example inputs (its shapes may
            # be static, which a default shape would not match)
            graph = graphshape.load(module, cache_weight_norms=cache_weight_norms)
            return graph, None, []
        return _load_module(module, input_specs, seed, default_shape, cache_weight_norms)

    if src.endswith(".onnx") or os.path.exists(src):
        if not os.path.exists(src):
            raise UsageError(f"no such file: {src}")
        graph = graphshape.load(src, cache_weight_norms=cache_weight_norms)
        inputs = None
        if input_specs is not None:
            if len(input_specs) != len(graph.inputs):
                raise UsageError(
                    f"{src} has {len(graph.inputs)} input(s) ({', '.join(graph.inputs)}): "
                    f"give --input-shape once for each, in that order "
                    f"({len(input_specs)} given)")
            # an input's dtype, when not given, is the graph's (the inputs are drawn by
            # load_source, with the embedding tables' sizes)
            input_specs = [(shape, dtype or graph[name].dtype)
                           for (shape, dtype), name in zip(input_specs, graph.inputs)]
        return graph, None, input_specs or []
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
    return _load_module(model, input_specs, seed, default_shape, cache_weight_norms)


def _load_module(model, input_specs, seed, default_shape, cache_weight_norms):
    """(graph, example inputs, specs) of a module traced on random inputs of
    ``input_specs`` (one batch of ``default_shape`` when None)."""
    import graphshape

    specs = input_specs or [(default_shape, None)]
    _check_input_count(model, specs)
    inputs = random_inputs(specs, seed)
    return graphshape.load(model, inputs, cache_weight_norms=cache_weight_norms), inputs, specs


def _check_input_count(model, specs) -> None:
    """A model whose forward needs more tensors than --input-shape gave: say so here (the
    tracer would fail on the missing argument, naming an fx node)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return
    required = [p.name for p in params if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) > len(specs):
        raise UsageError(f"{type(model).__name__}.forward takes {len(required)} inputs "
                         f"({', '.join(required)}): give --input-shape once for each, in that "
                         f"order ({len(specs)} given)")


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


def random_inputs(specs, seed, bounds=None):
    """Random example inputs for [(shape, dtype or None)] (one tensor for one spec, else a
    tuple): floating point standard normal; integers uniform in [0, bound), the bound of
    the i-th input ``bounds.get(i)`` (the rows of the embedding table it indexes:
    :func:`index_bounds`) or 2 (a mask, a flag); bool, half of them True."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, (shape, dtype) in enumerate(specs):
        dt = getattr(torch, dtype or "float32", None)
        if not isinstance(dt, torch.dtype):
            dt = torch.float32
        if dt.is_floating_point:
            out.append(torch.randn(*shape, generator=gen).to(dt))
        elif dt == torch.bool:
            out.append(torch.randint(0, 2, shape, generator=gen).bool())
        else:
            high = (bounds or {}).get(i, 2)
            out.append(torch.randint(0, high, shape, generator=gen).to(dt))
    return out[0] if len(out) == 1 else tuple(out)


def index_bounds(graph) -> dict[int, int]:
    """Model input position -> the number of rows of the smallest embedding table it
    indexes directly (an ``nn.Embedding``, ``F.embedding``, an ONNX ``Gather`` from an
    initializer): valid token ids are below it."""
    from graphshape.ir import is_non_float

    bounds: dict[int, int] = {}
    position = {name: i for i, name in enumerate(graph.inputs)}
    for node in graph:
        if node.op != "opaque":
            continue
        for slot, ref in enumerate(node.inputs):
            i = position.get(ref.node)
            if i is None or not is_non_float(graph[ref.node].dtype):
                continue
            rows = _table_rows(graph, node, slot)
            if rows:
                bounds[i] = min(rows, bounds.get(i, rows))
    return bounds


def _table_rows(graph, node, slot) -> int | None:
    """Rows of the table ``node`` looks up with its input ``slot``, or None."""
    a = node.attrs
    module = a.get("module")
    if module is not None and getattr(module, "num_embeddings", None):
        return int(module.num_embeddings)
    if a.get("framework") == "onnx" and a.get("op_type") == "Gather" and slot == 1:
        table = graph[node.inputs[0].node]
        attrs = a.get("attributes") or {}
        axis = attrs["axis"].i if "axis" in attrs else 0
        if table.op == "constant" and "value" in table.params:
            return int(table.params["value"].shape[axis])
    if getattr(a.get("target"), "__name__", "") == "embedding" and slot == 0 and len(
            node.inputs) > 1:
        table = graph[node.inputs[1].node]
        if table.op == "constant" and "value" in table.params:
            return int(table.params["value"].shape[0])
    return None


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
    p.add_argument("--input-shape", metavar="N,C,H,W[:DTYPE]", action="append",
                   help="shape of a random example batch (standard normal; ':int64' for "
                        "integer inputs, drawn below the size of the embedding table they "
                        "index, else 0 or 1); once per model input, in order. Default for "
                        "factories: 2,3,224,224; for ONNX files without it: two unit-q "
                        "uncorrelated examples (and for --empirical, random inputs of the "
                        "graph's input shapes, unknown dims 2); c needs N >= 2")
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

    specs = parse_input_specs(args.input_shape)
    if args.plot and not args.plot.lower().endswith(".png"):
        raise UsageError(f"--plot writes a PNG: give a path ending in .png, got {args.plot!r}")
    graph, inputs = load_source(args.src, specs, seed=args.seed, trust=args.trust)
    guessed = args.empirical and inputs is None
    if guessed:
        inputs = random_inputs(_graph_input_specs(graph), args.seed, index_bounds(graph))
    from graphshape.api import check_example_inputs

    check_example_inputs(graph, inputs)
    try:
        stats = analyze(graph, inputs, empirical=args.empirical)
    except GraphshapeError as e:
        if not guessed:
            raise
        raise GraphshapeError(f"{e} -- the example inputs had the graph's input shapes "
                              "with every unknown dim 2: give --input-shape (once per "
                              "input) with the sizes the model expects") from None
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


def _graph_input_specs(graph):
    """[(shape, dtype)] of the graph's inputs, unknown dims 2 (a usage error where an
    input's shape is unknown)."""
    from graphshape.passes.analysis import graph_input_specs

    specs = graph_input_specs(graph)
    if specs is None:
        name = next((n for n in graph.inputs if graph[n].shape is None), graph.inputs[0])
        raise UsageError(f"the shape of input {name!r} is unknown: pass --input-shape "
                         "(once per input)")
    return specs


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
