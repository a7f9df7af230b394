"""One model per timm module (the smallest by parameter count, up to 90M), shaped with TAT
and with DKS at its pretrained input size: each must be shaped and run with a finite output,
or be refused with a GraphshapeError; anything else is a CRASH (a bug). A wider net than
``shape_timm.py``'s fixed families: it picks up whatever timm adds.

Run:  nice python benchmarks/scan_timm_modules.py [--modules beit,byobnet,...]
Prints one line per model saying how graphshape reads it (torch.fx, or the ONNX export and
why fx could not), then one line per model and method: ok (seconds, whether the output is finite, the
activations solved), refused (the message's start), CRASH (type, message, where), TIMEOUT
(over 240 s), SKIP (over 90M parameters) or NOBUILD (timm cannot build or run it here);
then the counts. Models are created on the meta device to count parameters, then for real
(``pretrained=False``), eval mode, 2 Gaussian images, seed 0.
"""

from __future__ import annotations

import argparse
import signal
import time
import traceback
import warnings
from collections import Counter

#: parameters above which a module's smallest model is skipped (time on 2 cores)
MAX_PARAMS = 90e6
#: seconds per shaping before it counts as a TIMEOUT
TIMEOUT_S = 240


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout()


def _smallest(timm, module: str):
    """(parameters, name) of the module's smallest model, or None."""
    sized = []
    for name in timm.list_models(module=module):
        if name.startswith("test_"):
            continue
        try:
            model = timm.create_model(name, pretrained=False, device="meta")
        except Exception:  # noqa: BLE001 - timm cannot build it here: not a candidate
            continue
        sized.append((sum(p.numel() for p in model.parameters()), name))
    return min(sized) if sized else None


def main():
    import torch
    import timm

    import graphshape
    from graphshape.frontends.torch_fx import load_module

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--modules", default=None, help="comma-separated timm module names")
    args = ap.parse_args()
    modules = args.modules.split(",") if args.modules else timm.list_modules()
    signal.signal(signal.SIGALRM, _alarm)
    counts = Counter()
    for module in modules:
        found = _smallest(timm, module)
        if found is None:
            print(f"{module:24s} {'-':34s} NOBUILD", flush=True)
            counts["NOBUILD"] += 1
            continue
        params, name = found
        if params > MAX_PARAMS:
            print(f"{module:24s} {name:34s} SKIP {params / 1e6:.0f}M", flush=True)
            counts["SKIP"] += 1
            continue
        try:
            model = timm.create_model(name, pretrained=False).eval()
            x = torch.randn(2, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
            with torch.no_grad():
                model(x)
        except Exception as e:  # noqa: BLE001 - timm's own failure, not graphshape's
            print(f"{module:24s} {name:34s} NOBUILD {type(e).__name__}: {str(e)[:100]}",
                  flush=True)
            counts["NOBUILD"] += 1
            continue
        try:  # which way in: torch.fx, or the ONNX export where fx cannot trace it
            read = load_module(model, (x,))
            via = read.meta.get("traced_with", "torch.fx")
            print(f"{module:24s} {name:34s} read by {via}"
                  + (f": {read.meta.get('fx_error', '')[:160]}" if via != "torch.fx" else ""),
                  flush=True)
            counts[f"read by {via}"] += 1
        except graphshape.GraphshapeError as e:
            print(f"{module:24s} {name:34s} not read: {str(e)[:160]}", flush=True)
            counts["not read"] += 1
        for method in ("TAT", "DKS"):
            start = time.time()
            signal.alarm(TIMEOUT_S)
            try:
                shaped = graphshape.shape(model, x, method=method, seed=0)
                with torch.no_grad():
                    y = shaped(x)
                y = y[0] if isinstance(y, (tuple, list)) else y
                finite = bool(torch.isfinite(y).all())
                acts = list(shaped.meta["graphshape"].activation_params)
                status = "ok" if finite else "non-finite"
                print(f"{module:24s} {name:34s} {method} {status} {time.time() - start:5.1f}s "
                      f"{acts}", flush=True)
            except graphshape.GraphshapeError as e:
                status = "refused"
                print(f"{module:24s} {name:34s} {method} refused {time.time() - start:5.1f}s "
                      f"{str(e)[:160]}", flush=True)
            except _Timeout:
                status = "TIMEOUT"
                print(f"{module:24s} {name:34s} {method} TIMEOUT", flush=True)
            except Exception as e:  # noqa: BLE001 - a crash: what the scan looks for
                status = "CRASH"
                where = traceback.extract_tb(e.__traceback__)[-1]
                print(f"{module:24s} {name:34s} {method} CRASH {type(e).__name__}: "
                      f"{str(e)[:200]} @ {where.filename}:{where.lineno}", flush=True)
            finally:
                signal.alarm(0)
            counts[f"{method} {status}"] += 1
    print(dict(counts))


if __name__ == "__main__":
    main()
