"""The `fxcompress` command line: run | validate | inspect | passes | schema | demo."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import FxCompressError


def _model_for(recipe, spec: str | None, weights: str | None):
    from .models import build_model, load_weights
    spec = spec or recipe.model
    if spec is None:
        raise FxCompressError("no model: set `model:` in the recipe or pass --model SPEC")
    model = build_model(spec, recipe.input_shape, **recipe.model_options)
    weights = weights or recipe.weights
    return load_weights(model, weights) if weights else model


def _publish(tmp: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)


def cmd_run(args) -> int:
    from .api import compress, save
    from .export import export_onnx
    from .recipe import load_recipe
    recipe = load_recipe(args.recipe)
    model = _model_for(recipe, args.model, args.weights)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoints = out.parent / f".{out.name}.checkpoints"
    if args.resume and not checkpoints.is_dir():
        raise FxCompressError(f"nothing to resume: no checkpoints at {checkpoints} (they are kept when a run "
                              f"with the same --out stops before its end)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        result = compress(model, recipe, seed=args.seed, progress=not args.quiet, output_dir=tmp,
                          verify=True if args.verify else None, checkpoint_dir=checkpoints, resume=args.resume)
        if not (tmp / "model.onnx").exists():
            export_onnx(result.model, result.example_inputs, tmp / "model.onnx", seed=result.recipe.seed)
        if args.latency:
            _measure_latency(result, model, tmp / "model.onnx")
        save(result, tmp)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(checkpoints, ignore_errors=True)
    print(result.report.summary())
    print(f"\nwrote {out}/: model.pt, model.onnx, report.json, report.md, recipe.yaml")
    return 0


def _measure_latency(result, model, onnx_path) -> None:
    """`run --latency`: onnxruntime latency of the original and the compressed model, into the report."""
    from .export import compare_latency
    from .trace import trace
    totals = result.report.totals()
    result.report.metrics["onnx_latency"] = compare_latency(
        trace(model, result.recipe.leaf_modules), onnx_path, result.example_inputs,
        macs=(totals["macs_before"], totals["macs_after"]), seed=result.recipe.seed)


def cmd_validate(args) -> int:
    from .api import check_plan
    from .recipe import load_recipe
    from .trace import trace
    recipe = load_recipe(args.recipe)
    if args.model or recipe.model:
        gm = trace(_model_for(recipe, args.model, args.weights), recipe.leaf_modules)
        check_plan(gm, recipe, set())
        print(f"{args.recipe}: valid ({len(recipe.passes)} passes, checked against the traced model)")
    else:
        print(f"{args.recipe}: valid ({len(recipe.passes)} passes; give --model to check targets too)")
    return 0


def cmd_inspect(args) -> int:
    import torch
    from .context import PassContext
    from .models import build_model, load_weights
    from .report import _text_table
    from .trace import trace
    shape = args.input_shape or [1, 3, 224, 224]
    model = build_model(args.model, shape)
    if args.weights:
        load_weights(model, args.weights)
    gm = trace(model, args.leaf_modules or ())
    ctx = PassContext(example_inputs=(torch.randn(shape),), progress=False)
    rows = [[c.name, c.type, "x".join(map(str, c.output_shape or ())), f"{c.params:,}", f"{c.macs:,}"]
            for c in ctx.analysis("cost", gm)]
    print(_text_table(["layer", "type", "output", "params", "MACs"], rows))
    print(f"\n{len(rows)} layers, {sum(p.numel() for p in gm.parameters()):,} params, "
          f"{sum(c.macs for c in ctx.analysis('cost', gm)):,} MACs per example at input {shape}")
    if args.spectrum:
        _inspect_spectrum(gm, ctx, args.spectrum)
    if args.groups:
        _inspect_groups(gm, ctx)
    return 0


def _inspect_groups(gm, ctx) -> None:
    """`inspect --groups`: the channel-dependency groups, which of them can shrink, and the frozen ops."""
    from .graph.channels import format_groups
    print("\n" + format_groups(ctx.analysis("channels", gm)))


def _inspect_spectrum(gm, ctx, out: str) -> None:
    """`inspect --spectrum OUT.json`: per-layer singular-value spectra as JSON, plotted to OUT.png."""
    from .graph.spectrum import write_spectrum
    from .report import _text_table
    spectra = ctx.analysis("spectrum", gm)
    rows = [[s.name, "x".join(map(str, s.shape)), *s.energy_ranks.values(), f"{s.condition_number:.3g}",
             f"{s.effective_rank:.1f}"] for s in spectra]
    levels = [f"r@{float(level):.0%}" for level in (spectra[0].energy_ranks if spectra else ())]
    print("\n" + _text_table(["layer", "matrix", *levels, "cond", "erank"], rows))
    json_path, png_path = write_spectrum(spectra, out)
    print(f"\nwrote {json_path} and {png_path}")


def _type_name(annotation) -> str:
    """A readable type for `fxcompress passes`: Literal values spelled out, module paths dropped."""
    import re
    import typing
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(map(str, typing.get_args(annotation)))
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    text = text or str(annotation).replace("typing.", "")
    text = re.sub(r"\b(?:[a-z_][\w]*\.)+([A-Za-z_]\w*)", r"\1", text)
    return re.sub(r"Union\[TypeTarget, RegexTarget, NameTarget, str\]|Union\[str, TypeTarget, RegexTarget, "
                  r"NameTarget\]", "glob | {type} | {regex} | {name}", text)


def cmd_passes(args) -> int:
    from .registry import available_passes
    for name, info in available_passes().items():
        kind = "exact" if info.exact else "approximate"
        print(f"{name}  ({kind}; from {info.origin})")
        if info.doc:
            print(f"    {info.doc.splitlines()[0]}")
        for field, spec in info.config.model_fields.items():
            default = "required" if spec.is_required() else f"default {spec.get_default(call_default_factory=True)!r}"
            desc = f" — {spec.description}" if spec.description else ""
            print(f"    {spec.alias or field}: {_type_name(spec.annotation)} ({default}){desc}")
    return 0


def cmd_schema(args) -> int:
    from .schema import recipe_schema
    text = json.dumps(recipe_schema(), indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(Path(args.out), recipe=args.recipe, progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxcompress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="compress a model with a recipe; writes model, ONNX and report")
    run.add_argument("recipe", help="recipe file, or the name of a shipped recipe")
    run.add_argument("--model", help="model spec (overrides the recipe's `model`)")
    run.add_argument("--weights", help="state_dict file loaded into the model before tracing")
    run.add_argument("--out", default="out", help="output folder (default: out)")
    run.add_argument("--seed", type=int, default=None, help="random seed (default: the recipe's)")
    run.add_argument("--verify", action="store_true", help="check every exact pass preserves outputs in float64")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--resume", action="store_true",
                     help="continue long passes (lc) from the checkpoints an interrupted run with this --out left")
    run.add_argument("--latency", action="store_true",
                     help="time the original and compressed ONNX models in onnxruntime (batch 1 and 32)")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check a recipe (and its targets against the model)")
    validate.add_argument("recipe")
    validate.add_argument("--model")
    validate.add_argument("--weights")
    validate.set_defaults(func=cmd_validate)

    inspect = sub.add_parser("inspect", help="the traced model's layers with shapes, params and MACs")
    inspect.add_argument("--model", required=True, help="torchvision:NAME, package.module:factory or built-in")
    inspect.add_argument("--input-shape", type=int, nargs="+", help="example input shape (default 1 3 224 224)")
    inspect.add_argument("--weights")
    inspect.add_argument("--leaf-modules", nargs="*", help="class names or name globs kept opaque")
    inspect.add_argument("--spectrum", metavar="OUT.json",
                         help="also write each Linear/Conv layer's singular-value spectrum to OUT.json and "
                              "plot it to OUT.png")
    inspect.add_argument("--groups", action="store_true",
                         help="also print the channel-dependency groups (what can shrink together) and the "
                              "ops that freeze channels")
    inspect.set_defaults(func=cmd_inspect)

    passes = sub.add_parser("passes", help="the registered passes and their options")
    passes.set_defaults(func=cmd_passes)

    schema = sub.add_parser("schema", help="JSON Schema of the recipe format (for editors)")
    schema.add_argument("--out", help="write to this file instead of stdout")
    schema.set_defaults(func=cmd_schema)

    demo = sub.add_parser("demo", help="train LeNet-300-100 on scikit-learn digits, compress it, export ONNX")
    demo.add_argument("--out", default="out/demo")
    demo.add_argument("--recipe", default="demo", help="recipe to apply (default: the shipped `demo`)")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FxCompressError as exc:
        print(f"fxcompress: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fxcompress: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
