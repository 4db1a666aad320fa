"""The `mcq` command line: parse arguments, call the library, print. Bad input → one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from mcq import __version__
from mcq.errors import McqError
from mcq.models.families import COMPLETE_RELEASES, RELEASES


def cmd_make_tiny(args: argparse.Namespace) -> None:
    from mcq.models.tiny import TinySpec, make_tiny

    spec = TinySpec(version=args.version, seed=args.seed, outliers=args.outliers, real_widths=args.real_widths,
                    llm_layers=args.llm_layers, vision_layers=args.vision_layers, real_vocab=args.real_vocab)
    out = make_tiny(args.out, spec, force=args.force)
    print(json.dumps({"path": str(out), "version": spec.version}) if args.json else f"wrote {out}")


def cmd_inspect(args: argparse.Namespace) -> None:
    from mcq.models.inspect import format_inspection, inspect_model

    report = inspect_model(args.model)
    print(json.dumps(report, indent=2) if args.json else format_inspection(report))


def cmd_chat(args: argparse.Namespace) -> None:
    from mcq.export.onnx.runtime import chat_on_onnxruntime, is_onnx_export
    from mcq.models.familyspec import ChatRequest
    from mcq.models.loading import open_checkpoint
    from mcq.models.minicpmv.video import open_image
    from mcq.validate.coreml.runtime import chat_on_coreml, read_sidecar

    if args.video and args.frames:
        raise McqError("pass --video or --frames, not both")
    request = ChatRequest(model=args.model, question=args.question, images=tuple(open_image(p) for p in args.image),
                          video=args.video, frames=args.frames, fps=args.fps, packing=args.packing,
                          max_new_tokens=args.max_new_tokens, max_slice_nums=args.max_slice_nums,
                          sampling=args.sampling, thinking=args.thinking, stream=args.stream, seed=args.seed,
                          dtype=args.dtype)
    if is_onnx_export(args.model):   # an `mcq export --format onnx` output: run it on onnxruntime
        answer = chat_on_onnxruntime(args.model, request)
    elif read_sidecar(args.model) is not None:   # an `mcq export --format coreml` output
        answer = chat_on_coreml(args.model, request)
    else:
        checkpoint = open_checkpoint(args.model)
        answer = checkpoint.family.chat(checkpoint, request)
    if args.stream:
        for piece in answer:
            print(piece, end="", flush=True)
        print()
    elif args.json:
        print(json.dumps({"answer": answer}, ensure_ascii=False))
    else:
        print(answer)


def cmd_recipes(args: argparse.Namespace) -> None:
    from mcq.quantize.recipe import builtin_recipe_names, format_recipe_list, load_recipe

    if args.recipes_command == "list":
        recipes = [load_recipe(name) for name in builtin_recipe_names()]
        if args.json:
            print(json.dumps([{"name": r.name, "method": r.method, "description": r.description} for r in recipes],
                             indent=2))
        else:
            print(format_recipe_list(recipes))
        return
    recipe = load_recipe(args.recipe)  # validated even when only its text is shown
    print(json.dumps(recipe.to_dict(), indent=2) if args.json else recipe.text.rstrip("\n"))


def cmd_quantize(args: argparse.Namespace) -> None:
    from mcq.quantize.api import format_result, quantize

    result = quantize(args.model, args.out, method=args.method, recipe=args.recipe, target=args.target,
                      calib=args.calib, num_samples=args.num_samples, max_slice_nums=args.max_slice_nums,
                      device=args.device, seed=args.seed, force=args.force)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_result(result))


# Options that belong to one export format: given with another, they would be silently ignored. (The seed picks
# the calibration samples of GGUF's importance matrix; ONNX and Core ML exports draw nothing at random.)
_EXPORT_OPTIONS = {"gguf": ("quant", "mmproj_quant", "imatrix", "calib", "num_samples", "seed"),
                   "onnx": ("precision", "block_size"), "coreml": ("target", "vision", "llm")}


def cmd_export(args: argparse.Namespace) -> None:
    for fmt, options in _EXPORT_OPTIONS.items():
        given = [name for name in options if getattr(args, name) is not None]
        if fmt != args.format and given:
            raise McqError(f"--{given[0].replace('_', '-')} applies to --format {fmt}, not {args.format}")
    if args.format == "gguf":
        from mcq.export.gguf import export_gguf

        result = export_gguf(args.model, args.out, quant=args.quant or "F16", mmproj_quant=args.mmproj_quant or "F16",
                             imatrix=args.imatrix or "auto", from_dir=args.from_dir, calib=args.calib,
                             num_samples=args.num_samples, seed=args.seed or 0, force=args.force)
    elif args.format == "onnx":
        from mcq.export.onnx import export_onnx

        result = export_onnx(args.model, args.out, precision=args.precision or "fp32", block_size=args.block_size,
                             from_dir=args.from_dir, force=args.force)
    else:
        from mcq.export.coreml import export_coreml

        result = export_coreml(args.model, args.out, target=args.target or "iOS18", vision=args.vision or "int8",
                               llm=args.llm or "int4-block32", from_dir=args.from_dir, force=args.force)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())


def cmd_build(args: argparse.Namespace) -> int:
    from mcq.build import build

    result = build(args.model, args.out, plan=args.plan, only=args.only or (), calib=args.calib, eval_data=args.eval,
                   device=args.device, seed=args.seed, validate=not args.no_validate, force=args.force)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    if result.failed:
        print(f"mcq: {len(result.failed)} variant(s) failed: {', '.join(result.failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_matrix(args: argparse.Namespace) -> int | None:
    from mcq.build.matrix import github_matrix, run_matrix
    from mcq.build.plan import load_plan

    if args.emit_github:
        print(github_matrix(load_plan(args.plan), args.versions))
        return None
    if not args.out:
        raise McqError("--run needs --out DIR (a build folder per version, the results and the reports go there)")
    run = run_matrix(args.plan, args.out, versions=args.versions, formats=args.only or (), force=args.force)
    print(json.dumps(run.to_dict(), indent=2) if args.json else run.summary())
    if run.failed:
        print(f"mcq: {len(run.failed)} matrix job(s) failed: {', '.join(run.failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from mcq.outputs import write_file_atomically
    from mcq.validate.api import failed_variants, format_results, parse_threshold, validate

    # Before any work, so a typo fails at once. "a>1,b<2" is two gates (one matrix field holds a job's gates).
    thresholds = [parse_threshold(part) for text in args.fail_if for part in text.split(",")]
    if args.json and Path(args.json).exists() and not args.force:
        raise McqError(f"output {args.json} already exists (pass --force to replace it)")
    if args.report:
        from mcq.outputs import check_output

        check_output(Path(args.report), args.force)
    results = validate(args.reference, args.variant, eval_data=args.eval, num_samples=args.num_samples,
                       max_slice_nums=args.max_slice_nums, device=args.device, dtype=args.dtype,
                       max_new_tokens=args.max_new_tokens, latency_runs=args.latency_runs, seed=args.seed,
                       thresholds=thresholds, runtimes=args.runtime, reference_runtime=args.reference_runtime)
    text = json.dumps(results, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    if args.json:
        write_file_atomically(Path(args.json), text, force=args.force)
    print(format_results(results))
    if args.json:
        print(f"\nresults: {args.json}")
    if args.report:
        from mcq.reports import write_report

        with tempfile.TemporaryDirectory() as tmp:
            # The report reads results files; without --json the results live only for this call.
            source = Path(args.json) if args.json else Path(tmp) / "results.json"
            if not args.json:
                source.write_text(text, encoding="utf-8")
            report = write_report([source], Path(args.report), force=args.force)
        print(f"report: {report.out / 'report.html'}")
    failed = failed_variants(results)
    if failed:
        print(f"mcq: {len(failed)} variant(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> None:
    from mcq.reports import write_report

    report = write_report([Path(p) for p in args.results], Path(args.out), force=args.force)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcq", description="Quantize, export and validate MiniCPM-V models.")
    parser.add_argument("--version", action="version", version=f"mcq {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = sub.add_parser("make-tiny", help="write a tiny MiniCPM-V checkpoint in the official layout")
    tiny.add_argument("out", help="output directory")
    tiny.add_argument("--version", dest="version", choices=list(RELEASES),
                      default=COMPLETE_RELEASES[-1])   # the newest that every format supports
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--outliers", action="store_true", help="give norm channels 20-50x gains (activation outliers)")
    tiny.add_argument("--real-widths", action="store_true",
                      help="the release's true widths with few layers (benchmarks)")
    tiny.add_argument("--real-vocab", action="store_true",
                      help="the release's vocabulary size in the embedding and lm_head rows (4.5: 151,748; 4.6: "
                           "248,094; benchmarks)")
    tiny.add_argument("--llm-layers", type=_positive, help="default: 2 (4.6: 4, both layer kinds)")
    tiny.add_argument("--vision-layers", type=_positive, help="default: 2 (4.6: 3, around the vit_merger)")
    tiny.add_argument("--force", action="store_true", help="replace an existing output directory")
    tiny.add_argument("--json", action="store_true")
    tiny.set_defaults(func=cmd_make_tiny)

    inspect = sub.add_parser("inspect", help="components, Linears and group-size divisibility of a checkpoint")
    inspect.add_argument("model", help="checkpoint directory or tiny:VERSION")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_inspect)

    chat = sub.add_parser("chat", help="ask the model a question about images or a video")
    chat.add_argument("question")
    chat.add_argument("--model", required=True, help="checkpoint directory, tiny:VERSION, or an ONNX or Core ML export")
    chat.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable)")
    chat.add_argument("--video", metavar="PATH", help="a video file (needs PyAV), 4.5 and 4.6")
    chat.add_argument("--frames", metavar="DIR", help="a folder of video frames in name order, 4.5 and 4.6")
    chat.add_argument("--fps", type=float,
                      help="sampling rate of --video (default 1), frames per second of --frames (4.5 only)")
    chat.add_argument("--packing", type=int, help="video frames per 64-token block (1-6, default 3), 4.5 only")
    chat.add_argument("--max-new-tokens", type=_positive, default=64)
    chat.add_argument("--max-slice-nums", type=_positive)
    chat.add_argument("--sampling", action="store_true", help="the release's sampling settings instead of greedy")
    chat.add_argument("--thinking", action="store_true",
                      help="enable_thinking (4.5, and 4.6 where its chat template has the switch)")
    chat.add_argument("--stream", action="store_true")
    chat.add_argument("--seed", type=int, default=0)
    chat.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    chat.add_argument("--json", action="store_true")
    chat.set_defaults(func=cmd_chat)

    quant = sub.add_parser("quantize", help="quantize the whole model (LLM, vision tower, resampler) to a variant dir")
    quant.add_argument("--model", required=True, help="checkpoint directory or tiny:VERSION")
    quant.add_argument("--out", required=True, help="output directory (written atomically)")
    quant.add_argument("--method", choices=["awq", "gptq", "rtn", "bnb-nf4", "bnb-int8"],
                       help="use the method's built-in recipe (see `mcq recipes list`)")
    quant.add_argument("--recipe", help="a built-in recipe name or a recipe .yaml file")
    quant.add_argument("--target", metavar="RUNTIME[,RUNTIME]",
                       help="runtime(s) the output must load in, instead of the recipe's target: vllm-gpu, vllm-cpu, "
                            "mcq, remote-code, remote-code-bnb (see docs/recipes.md)")
    quant.add_argument("--calib", metavar="DATA", help="calibration data: a folder (images + JSONL) or a saved "
                                                      "datasets directory; default: the built-in multimodal set")
    quant.add_argument("--num-samples", type=_positive, help="calibration samples (default: the recipe's)")
    quant.add_argument("--max-slice-nums", type=_positive, help="image slices per sample (default: the recipe's)")
    quant.add_argument("--device", default="cpu", help="cpu or cuda")
    quant.add_argument("--seed", type=int, default=0)
    quant.add_argument("--force", action="store_true", help="replace an existing output directory")
    quant.add_argument("--json", action="store_true")
    quant.set_defaults(func=cmd_quantize)

    export = sub.add_parser("export", help="export for another runtime: GGUF (llama.cpp / Ollama), ONNX, Core ML")
    export.add_argument("--format", required=True, choices=["gguf", "onnx", "coreml"])
    export.add_argument("--model", required=True, help="checkpoint directory or tiny:VERSION")
    export.add_argument("--out", required=True, help="output directory (written atomically)")
    export.add_argument("--from", dest="from_dir", metavar="QUANT_DIR",
                        help="take the weights from this `mcq quantize` output of the model (calibration carries "
                             "into the export)")
    gguf = export.add_argument_group("gguf")
    gguf.add_argument("--quant", metavar="TYPE", help="LLM type: F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, ... "
                                                      "(default F16)")
    gguf.add_argument("--mmproj-quant", metavar="TYPE", help="vision tower + resampler type (default F16)")
    gguf.add_argument("--imatrix", metavar="auto|none|FILE",
                      help="importance matrix for K-quants and i-quants: auto (default) computes it from the "
                           "multimodal calibration set; FILE is a safetensors imatrix")
    gguf.add_argument("--calib", metavar="DATA", help="calibration data for --imatrix auto (default: built-in set)")
    gguf.add_argument("--num-samples", type=_positive, help="calibration samples for --imatrix auto")
    gguf.add_argument("--seed", type=int, help="which calibration samples --imatrix auto draws (default 0)")
    onnx = export.add_argument_group("onnx")
    onnx.add_argument("--precision", choices=["fp32", "fp16", "int8", "int4"], help="default fp32")
    onnx.add_argument("--block-size", type=int, choices=[32, 64, 128],
                      help="int4/int8 block size of onnxruntime's quantizer (default 32; not with --from, whose "
                           "layers keep their own group sizes)")
    coreml = export.add_argument_group("coreml")
    coreml.add_argument("--target", choices=["iOS17", "iOS18"], help="deployment target (default iOS18: the stateful "
                                                                      "int4 LLM package needs it)")
    coreml.add_argument("--vision", choices=["fp16", "int8", "palettize4", "palettize6"],
                        help="vision package weights (default int8, per channel)")
    coreml.add_argument("--llm", choices=["int4-block32", "palettize4", "int8", "fp16", "none"],
                        help="LLM package weights (default int4-block32; none: the vision package only)")
    export.add_argument("--force", action="store_true", help="replace an existing output directory")
    export.add_argument("--json", action="store_true")
    export.set_defaults(func=cmd_export)

    builder = sub.add_parser("build", help="every variant of a plan from one calibration, validated, in one report")
    builder.add_argument("--model", required=True, help="checkpoint directory or tiny:VERSION")
    builder.add_argument("--out", required=True, help="build folder (a later run updates it, rebuilding what changed)")
    builder.add_argument("--plan", metavar="PLAN.yaml", help="the variants to build (default: the built-in plan, "
                                                            "every format)")
    builder.add_argument("--only", nargs="+", metavar="FORMAT",
                         help="build only these formats (compressed-tensors, bitsandbytes, gguf, onnx, coreml) or "
                              "plan variants, and what they export from")
    builder.add_argument("--calib", metavar="DATA", help="calibration data (default: the built-in multimodal set)")
    builder.add_argument("--eval", metavar="DATA", help="evaluation data (default: the built-in held-out split)")
    builder.add_argument("--device", default="cpu", help="cpu or cuda")
    builder.add_argument("--seed", type=int, default=0)
    builder.add_argument("--no-validate", action="store_true", help="build the variants only (gate them later with "
                                                                     "mcq validate)")
    builder.add_argument("--force", action="store_true",
                         help="rebuild everything; replace a folder that is not a build")
    builder.add_argument("--json", action="store_true")
    builder.set_defaults(func=cmd_build)

    matrix = sub.add_parser("matrix", help="the CI matrix (formats x versions of the tiny models): print it for "
                                           "GitHub Actions, or run it here")
    action = matrix.add_mutually_exclusive_group(required=True)
    action.add_argument("--emit-github", action="store_true", help="print the strategy.matrix JSON of a workflow job")
    action.add_argument("--run", action="store_true", help="run every job here: build, gate, one report per version")
    matrix.add_argument("--plan", metavar="PLAN.yaml", help="default: the built-in plan")
    matrix.add_argument("--versions", nargs="+", choices=list(RELEASES), default=list(RELEASES))
    matrix.add_argument("--only", nargs="+", metavar="FORMAT", help="run only these formats' jobs (--run)")
    matrix.add_argument("--out", metavar="DIR", help="where --run builds (DIR/<version>), gates (DIR/results) and "
                                                    "reports (DIR/report-<version>)")
    matrix.add_argument("--force", action="store_true", help="--run: rebuild everything")
    matrix.add_argument("--json", action="store_true")
    matrix.set_defaults(func=cmd_matrix)

    recipes = sub.add_parser("recipes", help="list the built-in quantization recipes, or show one")
    recipes_sub = recipes.add_subparsers(dest="recipes_command", required=True, metavar="ACTION")
    recipes_list = recipes_sub.add_parser("list", help="name, method and description of every built-in recipe")
    recipes_list.add_argument("--json", action="store_true")
    recipes_show = recipes_sub.add_parser("show", help="a recipe's YAML (--json: validated, defaults filled in)")
    recipes_show.add_argument("recipe", metavar="NAME|PATH", help="a built-in recipe name or a .yaml file")
    recipes_show.add_argument("--json", action="store_true")
    recipes.set_defaults(func=cmd_recipes)

    check = sub.add_parser("validate", help="accuracy, memory and latency of variants against the reference")
    check.add_argument("--reference", required=True, help="the unquantized checkpoint directory or tiny:VERSION")
    check.add_argument("--variant", required=True, nargs="+", help="variant directories mcq produced")
    check.add_argument("--eval", metavar="DATA", help="evaluation data (folder with JSONL, or a saved datasets "
                                                     "directory); default: the built-in held-out split")
    check.add_argument("--num-samples", type=_positive, help="evaluate on this many samples (default: all)")
    check.add_argument("--max-slice-nums", type=_positive, default=2, help="image slices per image (default 2)")
    check.add_argument("--runtime", nargs="+", default=["auto"], metavar="RUNTIME",
                       help="what serves each variant (one for all, or one per --variant): auto (its format's "
                            "runtime: transformers, llama.cpp, onnxruntime, Core ML) or vllm (bf16 and "
                            "compressed-tensors, in the Python that MCQ_VLLM_PYTHON names)")
    check.add_argument("--reference-runtime", default="auto", metavar="RUNTIME",
                       help="what serves the reference: auto (transformers) or vllm (variants are then scored "
                            "against vLLM's own bf16)")
    check.add_argument("--device", default="cpu", help="cpu or cuda")
    check.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                       help="compute dtype (auto: float32 on cpu, bfloat16 on cuda)")
    check.add_argument("--max-new-tokens", type=_positive, default=24, help="greedy answer length (default 24)")
    check.add_argument("--latency-runs", type=_positive, default=5, help="timed runs after a warm-up (default 5)")
    check.add_argument("--fail-if", action="append", default=[], metavar="EXPR",
                       help="exit 1 when a variant meets it, e.g. 'kl_mean>0.05' (repeatable, or comma-separated)")
    check.add_argument("--json", metavar="OUT", help="write the results JSON here (mcq report reads it)")
    check.add_argument("--report", metavar="DIR", help="also write the report (as `mcq report` does) here")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--force", action="store_true", help="replace an existing --json file or --report dir")
    check.set_defaults(func=cmd_validate)

    report = sub.add_parser("report", help="report.md, report.html (with plots) and combined JSON from results")
    report.add_argument("results", nargs="+", metavar="RESULTS.json", help="files written by mcq validate --json")
    report.add_argument("--out", required=True, help="output directory (written atomically)")
    report.add_argument("--force", action="store_true", help="replace an existing output directory")
    report.add_argument("--json", action="store_true")
    report.set_defaults(func=cmd_report)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.debug:
        # Native libraries' logs (llama.cpp) and child processes (validate workers) follow the flag too.
        os.environ["MCQ_DEBUG"] = "1"
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        code = func(args)
    except McqError as err:
        if args.debug:
            raise
        print(f"mcq: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mcq: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
