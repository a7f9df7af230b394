"""Measured kernels: run the model on example inputs and record q and c at every node.

The graph is emitted as a ``torch.fx.GraphModule`` (``graphshape.backend_torch.emit``) and
run with a ``torch.fx.Interpreter`` that keeps, for every IR node (found through
``gm.meta["graphshape_nodes"]``), the kernel of its output: q per example (mean squared
entry over features and locations) and c per pair (over features, per location, averaged
over locations) — the same definitions as the predictions (:func:`analysis.kernel_of`).

The model runs as at the start of training: normalization layers use batch statistics
(training mode), dropout is off (the analysis treats it as the identity at init). The
module is copied first, so batch-norm running statistics of the caller's module never move.
"""

from __future__ import annotations

import copy

import numpy as np

from graphshape.errors import GraphshapeError
from graphshape.ir import Graph


def measure(graph: Graph, example_inputs, *, module=None) -> dict:
    """IR node name -> measured :class:`~graphshape.passes.analysis.Kernel` of its output."""
    return measure_with_values(graph, example_inputs, module=module)[0]


def measure_with_values(graph: Graph, example_inputs, *, module=None, values_of=(),
                        kernels_of=None) -> tuple[dict, dict]:
    """:func:`measure` (of the nodes named in ``kernels_of``; None: all), and the output
    values (float64 arrays) of the IR nodes named in ``values_of``: ({name: Kernel},
    {name: np.ndarray})."""
    import torch
    import torch.fx

    from graphshape.frontends.torch_fx import PlainArgsMixin
    from graphshape.passes.analysis import kernel_of

    if module is None:
        from graphshape.backend_torch import emit

        module = emit(graph, copy_params=False)  # (the deepcopy below copies it once)
    mapping = getattr(module, "meta", {}).get("graphshape_nodes")
    if mapping is None:
        raise GraphshapeError("the module has no meta['graphshape_nodes'] map from IR nodes to "
                              "fx nodes: pass a module emitted by graphshape.to_torch")
    fx_to_ir = {fx: ir for ir, fx in mapping.items()}
    module = copy.deepcopy(module)
    module.train()
    for sub in module.modules():
        if isinstance(sub, torch.nn.modules.dropout._DropoutNd):
            sub.eval()
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    args = [torch.as_tensor(x) if isinstance(x, np.ndarray) else x for x in example_inputs]
    # (the leaves of a container input too: forward(self, batch) called with a dict)
    leaves = torch.utils._pytree.tree_leaves(args)
    batch = next((a.shape[0] for a in leaves if torch.is_tensor(a) and a.dim() > 0), None)

    result: dict = {}
    values: dict = {}
    values_of = frozenset(values_of)
    kernels_of = None if kernels_of is None else frozenset(kernels_of)

    class _Recorder(PlainArgsMixin, torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            name = fx_to_ir.get(n.name)
            if name is not None:
                value = out[0] if isinstance(out, (tuple, list)) and out else out
                if name in values_of and torch.is_tensor(value) and value.is_floating_point():
                    values[name] = value.detach().double().cpu().numpy()
                if (torch.is_tensor(value) and value.is_floating_point() and value.dim() >= 1
                        and value.shape[0] == batch
                        and (kernels_of is None or name in kernels_of)):
                    # kernel_of works in float64 by chunks: no float64 copy of the whole
                    # (numpy has no bfloat16: half types as float32)
                    value = value.detach()
                    if value.dtype in (torch.float16, torch.bfloat16):
                        value = value.float()
                    result[name] = kernel_of(value.cpu().numpy())
            return out

    try:
        with torch.no_grad():
            _Recorder(module).run(*args)
    except Exception as e:  # the user's model failed on the user's inputs: say where
        # (the first line: fx appends the whole node and a traceback hint)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise GraphshapeError(f"running the model on the example inputs failed: "
                              f"{type(e).__name__}: {first}") from e
    return result, values
