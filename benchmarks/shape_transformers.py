"""Shape Hugging Face transformers models (small configs, random weights: nothing is
downloaded); each must be shaped and return what the source returns, or be refused with a
clear GraphshapeError -- never crash.

Run:  nice python benchmarks/shape_transformers.py [--methods TAT,DKS] [--models resnet,vit]
      [--labels]
Needs the ``transformers`` package, which graphshape and its tests do not use.
``--labels``: the image classifiers are shaped with ``(pixel_values, labels)`` instead, as a
trainer calls them; the shaped model must return a finite ``loss`` that backpropagates.
Prints one line per model and method: ok (how the model was read: torch.fx, or its ONNX
export when fx cannot trace it; the output class the shaped model returns, which must be
the source's: a ``ModelOutput`` subclass; seconds), refused (the message) or CRASH (the
exception: a bug). A shaped model that returns another class, or outputs of other shapes,
is counted as a CRASH too.
"""

from __future__ import annotations

import argparse
import inspect
import time
import traceback
import warnings


def _models():
    """name -> (model builder, example inputs): small configs of Hugging Face's vision
    models (classifiers, backbones, segmentation and depth models), a text encoder, and a
    decoder."""
    import torch
    import transformers as T

    def image(side):
        return (torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0)),)

    def tokens():
        return (torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0)),)

    four = dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128])
    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               image_size=32, patch_size=8)
    text = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64)
    return {
        "resnet": (lambda: T.ResNetForImageClassification(
            T.ResNetConfig(**four, embedding_size=16, num_labels=10)), image(64)),
        "resnet_backbone": (lambda: T.ResNetModel(
            T.ResNetConfig(depths=[2, 2, 2, 2], hidden_sizes=[16, 32, 64, 128],
                           embedding_size=16)), image(64)),
        "regnet": (lambda: T.RegNetForImageClassification(
            T.RegNetConfig(**four, embedding_size=16, groups_width=8, num_labels=10)), image(64)),
        "convnext": (lambda: T.ConvNextForImageClassification(
            T.ConvNextConfig(**four, num_labels=10)), image(64)),
        "convnextv2": (lambda: T.ConvNextV2ForImageClassification(
            T.ConvNextV2Config(**four, num_labels=10)), image(64)),
        "poolformer": (lambda: T.PoolFormerForImageClassification(
            T.PoolFormerConfig(**four, num_labels=10)), image(64)),
        "mobilenet_v2": (lambda: T.MobileNetV2ForImageClassification(
            T.MobileNetV2Config(depth_multiplier=0.35, num_labels=10)), image(64)),
        "efficientnet": (lambda: T.EfficientNetForImageClassification(
            T.EfficientNetConfig(width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320, image_size=64,
                                 num_labels=10)), image(64)),
        "mobilevit": (lambda: T.MobileViTForImageClassification(
            T.MobileViTConfig(image_size=64, hidden_sizes=[16, 24, 32],
                              neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32], num_labels=10)),
                      image(64)),
        "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(**vit, num_labels=10)), image(32)),
        "deit": (lambda: T.DeiTForImageClassification(T.DeiTConfig(**vit, num_labels=10)),
                 image(32)),
        "dinov2": (lambda: T.Dinov2Model(T.Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8)), image(32)),
        "swin": (lambda: T.SwinForImageClassification(T.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
            window_size=4, num_labels=10)), image(32)),
        "segformer": (lambda: T.SegformerForSemanticSegmentation(T.SegformerConfig(
            hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2],
            decoder_hidden_size=32, num_labels=5)), image(64)),
        "levit": (lambda: T.LevitForImageClassification(T.LevitConfig(
            image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2],
            depths=[1, 1, 1], key_dim=[8, 8, 8], num_labels=10)), image(64)),
        "bit": (lambda: T.BitForImageClassification(
            T.BitConfig(**four, embedding_size=16, num_groups=8, num_labels=10)), image(64)),
        "mobilenet_v1": (lambda: T.MobileNetV1ForImageClassification(
            T.MobileNetV1Config(depth_multiplier=0.25, num_labels=10)), image(64)),
        "mobilevitv2": (lambda: T.MobileViTV2ForImageClassification(
            T.MobileViTV2Config(image_size=64, width_multiplier=0.5, num_labels=10)), image(64)),
        "pvt_v2": (lambda: T.PvtV2ForImageClassification(T.PvtV2Config(
            hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
            num_attention_heads=[1, 1, 2, 2], num_labels=10)), image(64)),
        "swinv2": (lambda: T.Swinv2ForImageClassification(T.Swinv2Config(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
            window_size=4, num_labels=10)), image(32)),
        "focalnet": (lambda: T.FocalNetForImageClassification(
            T.FocalNetConfig(embed_dim=16, depths=[1, 1, 1, 1], num_labels=10)), image(64)),
        "beit": (lambda: T.BeitForImageClassification(T.BeitConfig(**vit, num_labels=10)),
                 image(32)),
        "hiera": (lambda: T.HieraForImageClassification(T.HieraConfig(
            embed_dim=16, image_size=[64, 64], patch_size=[7, 7], patch_stride=[4, 4],
            patch_padding=[3, 3], depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
            num_labels=10)), image(64)),
        "convnext_ls": (lambda: T.ConvNextModel(  # with layer scale
            T.ConvNextConfig(**four, layer_scale_init_value=1e-6)), image(64)),
        "upernet": (lambda: T.UperNetForSemanticSegmentation(T.UperNetConfig(
            backbone_config=T.ConvNextConfig(
                **four, out_features=["stage1", "stage2", "stage3", "stage4"]),
            hidden_size=32, auxiliary_in_channels=64, num_labels=5)), image(64)),
        "dpt": (lambda: T.DPTForDepthEstimation(T.DPTConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
            image_size=32, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
            neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=16)),
                image(32)),
        "glpn": (lambda: T.GLPNForDepthEstimation(T.GLPNConfig(
            hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2],
            decoder_hidden_size=16)), image(64)),
        "textnet": (lambda: T.TextNetForImageClassification(T.TextNetConfig(num_labels=10)),
                    image(64)),
        "bert": (lambda: T.BertModel(T.BertConfig(**text)), tokens()),
        "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2,
                                                        n_head=2, bos_token_id=0,
                                                        eos_token_id=0)), tokens()),
    }


def _shapes(out):
    import torch
    values = out.values() if isinstance(out, dict) else out if isinstance(out, tuple) else [out]
    return [tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in values]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="TAT,DKS")
    ap.add_argument("--models", default=None, help="comma-separated subset")
    ap.add_argument("--labels", action="store_true",
                    help="image classifiers only, shaped with (pixel_values, labels)")
    args = ap.parse_args()
    import torch
    import transformers

    import graphshape

    models = _models()
    names = args.models.split(",") if args.models else list(models)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    counts: dict[str, int] = {}
    for name in names:
        build, inputs = models[name]
        torch.manual_seed(0)
        model = build().eval()
        if args.labels:
            # (example inputs are positional: labels must be forward's second parameter)
            params = list(inspect.signature(model.forward).parameters)
            if (not type(model).__name__.endswith("ForImageClassification")
                    or params[1:2] != ["labels"]):
                continue
            inputs = (*inputs, torch.arange(inputs[0].shape[0]) % model.config.num_labels)
        with torch.no_grad():
            reference = model(*inputs)
        for method in args.methods.split(","):
            start = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    shaped = graphshape.shape(model, inputs, method=method, seed=0)
                report = shaped.meta["graphshape"]
                with torch.no_grad():
                    out = shaped(*inputs)
                if type(out) is not type(reference) or _shapes(out) != _shapes(reference):
                    raise AssertionError(f"returns {type(out).__name__} {_shapes(out)}, the "
                                         f"source {type(reference).__name__} {_shapes(reference)}")
                if args.labels:
                    loss = shaped(*inputs).loss
                    loss.backward()
                    if not torch.isfinite(loss) or not any(
                            p.grad is not None and p.grad.abs().sum() > 0
                            for p in shaped.parameters()):
                        raise AssertionError(f"loss {float(loss)} or its gradient is not usable")
                read = ("its ONNX export" if any("torch.onnx.export" in w for w in report.warnings)
                        else "torch.fx")
                status = (f"ok        {time.perf_counter() - start:5.1f}s  {read}, returns "
                          f"{type(out).__name__}")
                counts[f"{method} ok"] = counts.get(f"{method} ok", 0) + 1
            except graphshape.GraphshapeError as e:
                status = f"refused   {str(e).splitlines()[0][:150]}"
                counts[f"{method} refused"] = counts.get(f"{method} refused", 0) + 1
            except Exception as e:  # noqa: BLE001 - a bug: report and go on
                status = f"CRASH     {type(e).__name__}: {str(e)[:200]}"
                traceback.print_exc(limit=-3)
                counts[f"{method} CRASH"] = counts.get(f"{method} CRASH", 0) + 1
            print(f"{name:16s} {method:4s} {status}", flush=True)
    print("; ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
