"""`sdlora <command>`: a thin face over the library. Library errors become one line and exit code 2."""

from __future__ import annotations

import argparse
import functools
import logging
import re
import sys
import typing
from pathlib import Path

from . import __version__
from .config import (
    SAVE_PRECISION,
    DemoConfig,
    Params,
    StudioConfig,
    build_config,
    default_of,
    load_toml,
    option_fields,
)
from .errors import Interrupted, SdloraError
from .schedulers import SCHEDULERS
from .toy.render import STYLES

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; defaults are shown from the dataclasses but applied by them, not argparse."""
    parser.add_argument("--config", type=Path, help="TOML file setting any option below (flags override it).")
    for _group, f, tp in option_fields():
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base = args[0] if args and typing.get_origin(tp) is not list else tp
        default = default_of(f)
        help_text = f.metadata.get("help", "") + (f" (default: {default})" if default not in (None, "", []) else "")
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is list:
            kw["action"] = "append"
        else:
            kw["type"] = {int: int, float: float, Path: Path}.get(base, str)
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
        parser.add_argument(_flag(f.name), **kw)


def train_config_from_args(ns: argparse.Namespace):
    values = load_toml(ns.config) if getattr(ns, "config", None) else {}
    names = {f.name for _, f, _ in option_fields()}
    values.update({k: v for k, v in vars(ns).items() if k in names})
    return build_config(values)


def cmd_doctor(ns: argparse.Namespace) -> int:
    import json

    from .doctor import diagnose

    if ns.folder is not None:
        ns.data = ns.folder
    cfg = train_config_from_args(ns)
    folder = Path(cfg.data.data) if cfg.data.data else Path(".")
    report = diagnose(cfg, sheet=ns.sheet or cfg.output_dir / f"doctor-{folder.resolve().name}.png")
    print(json.dumps(report.to_json(), indent=2) if ns.json else report.text())
    empty = [f for f, scan in ((cfg.data.data, report.scan), (cfg.data.reg_data, report.reg)) if scan and not scan.items]
    for folder in empty:  # the report above says why; a script checking before it trains sees the exit code
        print(f"error: no usable image in {folder}: train would refuse it", file=sys.stderr)
    return 2 if empty else 0


def cmd_report(ns: argparse.Namespace) -> int:
    import json

    from .report import make_report

    report = make_report(ns.run_dir, ns.name)
    rec = report["recommended"]
    if ns.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"recommended: {rec['file']} at weight {rec['weight']:g} ({rec['why']})\n"
              f"scores: {'; '.join(report['scores']) or 'none'}\nreport: {Path(ns.run_dir) / 'report.html'}")
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    from .train import train

    cfg = train_config_from_args(ns)
    result = train(cfg, progress=not ns.quiet)  # (-q: no progress bar either)
    from accelerate import PartialState

    if PartialState().is_main_process:  # (under torchrun every process returns here; one wrote the adapter)
        print(result.summary())
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    from .engine import BlendItem, Engine
    from .errors import ConfigError
    from .recipe import next_output_path, save_png

    n, named = ns.batch_size * ns.batch_count, []  # the --out files, known before anything runs
    if ns.out and ns.out.is_dir():
        raise ConfigError(f"--out {ns.out} is a folder; give a file name (or --output-dir for numbered files)")
    if ns.out and not ns.out.suffix:
        ns.out = ns.out.with_suffix(".png")
    if ns.out and ns.out.suffix.lower() != ".png":
        raise ConfigError(f"--out {ns.out}: images are written as PNG (with the generation parameters A1111 reads "
                          "back); give a .png name")
    if ns.out:
        named = [ns.out] if n == 1 else [ns.out.with_name(f"{ns.out.stem}-{k}{ns.out.suffix}") for k in range(n)]
    existing = [p for p in named if p.exists()]
    if existing and not ns.overwrite:  # checked before loading anything: nothing the user made is replaced unasked
        raise ConfigError(f"{existing[0]} already exists; pass --overwrite to replace it, or another --out")
    loras = [parse_lora_arg(arg) for arg in ns.lora or []]
    engine = Engine(ns.base, lora_files=[path for path, _, _ in loras], base_config=ns.base_config,
                    quantize=ns.quantize_base or "", quantize_backend=ns.quantize_backend)
    blend = [BlendItem(engine.library.name_of(path), unet=unet_w, te=te_w) for path, unet_w, te_w in loras]
    params = Params(prompt=ns.prompt, negative_prompt=ns.negative_prompt, seed=ns.seed, steps=ns.steps,
                    cfg_scale=ns.cfg, width=ns.width, height=ns.height, batch_size=ns.batch_size,
                    batch_count=ns.batch_count, scheduler=ns.scheduler)
    result = engine.generate(params, blend, mode="fast" if ns.fuse else "exact")
    for k, (image, seed, text) in enumerate(zip(result.images, result.seeds, result.infotexts, strict=True)):
        path = named[k] if ns.out else next_output_path(ns.output_dir, seed)
        save_png(image, path, text)
        print(f"wrote {path} (seed {seed})")
    return 0


def parse_lora_arg(arg: str, what: str = "--lora"):
    """`PATH[:W]` or `PATH[:TE_W:UNET_W]`; `what` names the argument in errors."""
    from .errors import ConfigError

    m = re.match(r"^(.*?\.safetensors)(?::([-+0-9.]+))?(?::([-+0-9.]+))?$", arg)
    if not m:
        raise ConfigError(f"{what} {arg!r}: expected PATH.safetensors[:WEIGHT] or PATH.safetensors[:TE_W:UNET_W]")
    try:
        a = float(m.group(2)) if m.group(2) else 1.0
        b = float(m.group(3)) if m.group(3) else None
    except ValueError:
        raise ConfigError(f"{what} {arg!r}: weights must be numbers") from None
    return (Path(m.group(1)), b, a) if b is not None else (Path(m.group(1)), a, None)


def cmd_inspect(ns: argparse.Namespace) -> int:
    import json

    from .convert import format_info, info

    d = info(ns.file)
    print(json.dumps(d, indent=2) if ns.json else format_info(d))
    return 0


def cmd_convert(ns: argparse.Namespace) -> int:
    from .convert import convert

    out, result = convert(ns.input, ns.output, ns.to, base=ns.base, overwrite=ns.overwrite)
    print(f"wrote {out} ({ns.to} layout, {len(result.targets)} modules)")
    return 0


def cmd_merge(ns: argparse.Namespace) -> int:
    from .tools.merge import Item, merge, write_merge

    items = [Item(path, unet, te) for path, unet, te in (parse_lora_arg(a, "merge: LoRA") for a in ns.loras)]
    _refuse_existing(ns.out, ns.overwrite)
    result = merge(items, rank=ns.rank, base=ns.base)
    out = write_merge(result, ns.out, overwrite=ns.overwrite, layout=ns.format, precision=ns.precision)
    how = "ranks concatenated (exact)" if ns.rank is None else (
        f"rank {ns.rank} by SVD; relative error median {_median(result.errors.values()):.4f}, worst "
        f"{max(result.errors.values()):.4f}")
    print(f"wrote {out}: {len(items)} LoRAs, {len(result.updates)} modules, {how}")
    return 0


def cmd_resize(ns: argparse.Namespace) -> int:
    from .tools.resize import resize, write_resize

    _refuse_existing(ns.out, ns.overwrite)
    result = resize(ns.input, rank=ns.rank, energy=ns.energy, base=ns.base)
    out = write_resize(result, ns.out, overwrite=ns.overwrite, precision=ns.precision)
    errors = [r["relative_error"] for r in result.rows]
    ranks = [r["rank_after"] for r in result.rows]
    for r in result.rows if ns.verbose else []:
        print(f"  {r['module']}: rank {r['rank_before']} -> {r['rank_after']}, error {r['relative_error']:.4f}")
    print(f"wrote {out}: {len(ranks)} modules, rank {min(ranks)}-{max(ranks)}, relative error median "
          f"{_median(errors):.4f}, worst {max(errors):.4f}; {result.bytes_before / 1e6:.2f} MB -> "
          f"{out.stat().st_size / 1e6:.2f} MB")
    return 0


def cmd_extract(ns: argparse.Namespace) -> int:
    from .tools.extract import extract, write_extract

    _refuse_existing(ns.out, ns.overwrite)
    result = extract(ns.base, ns.tuned, ns.rank, ns.conv_rank, base_config=ns.base_config)
    out = write_extract(result, ns.out, overwrite=ns.overwrite)
    errors = [r["relative_error"] for r in result.rows]
    print(f"wrote {out}: {len(result.updates)} modules that differ, relative error median {_median(errors):.4f}, "
          f"worst {max(errors):.4f}")
    return 0


def cmd_bake(ns: argparse.Namespace) -> int:
    from .tools.bake import bake
    from .tools.merge import Item

    _refuse_existing(ns.out, ns.overwrite)
    items = [Item(path, unet, te) for path, unet, te in (parse_lora_arg(a) for a in ns.lora)]
    out = bake(ns.base, items, ns.out, layout=ns.format, precision=ns.precision, base_config=ns.base_config,
               overwrite=ns.overwrite)
    print(f"wrote {out} ({'diffusers folder' if ns.format == 'diffusers' else 'single-file checkpoint'}, "
          f"{ns.precision}, {len(items)} LoRAs merged in)")
    return 0


def cmd_analyze(ns: argparse.Namespace) -> int:
    import json

    from .tools.analyze import analyze, plot

    report = analyze(ns.files, base=ns.base)
    if ns.json:
        print(json.dumps(report, indent=2))
    else:
        print(report["summary"])
    for path in plot(report, ns.plot) if ns.plot else []:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _refuse_existing(out: Path, overwrite: bool) -> None:
    """Checked before any work: nothing the user made is replaced unasked."""
    from .errors import ConfigError

    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite")


def _median(values) -> float:
    import statistics

    values = list(values)
    return statistics.median(values) if values else 0.0


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_webui(ns: argparse.Namespace) -> int:
    from .errors import ConfigError

    if ns.host not in LOOPBACK and not ns.listen:
        raise ConfigError(f"--host {ns.host} would expose the UI beyond this machine; add --listen to do that on purpose")
    if ns.host not in LOOPBACK:
        print(f"warning: serving on {ns.host}:{ns.port}; anyone who can reach it can generate images and read "
              "the outputs folder", file=sys.stderr)
    from webui.app import serve

    serve(ns.base, ns.lora_dir, ns.output_dir, host=ns.host, port=ns.port, base_config=ns.base_config,
          quantize=ns.quantize_base or "", quantize_backend=ns.quantize_backend, data_root=ns.data_root)
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    import json

    from .demo import run_demo

    cfg = DemoConfig(**{k: v for k, v in (("style", ns.style), ("steps", ns.steps), ("blend_steps", ns.steps),
                                          ("sampler", ns.sampler)) if v is not None})
    metrics = run_demo(Path(ns.out), cfg, blend=ns.blend)
    print(json.dumps({k: v for k, v in metrics.items() if k != "blend"}))
    if "blend" in metrics:
        print("blend 0.5 + 0.5:", json.dumps(metrics["blend"]))
    print(f"grid: {Path(ns.out) / 'grid.png'}  metrics: {Path(ns.out) / 'metrics.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlora", description="Stable Diffusion LoRA trainer and blending studio.")
    parser.add_argument("--version", action="version", version=f"sdlora {__version__}")
    _global_options(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, argparse.SUPPRESS)  # also after the command name; unset there, the top level's value stands
    command = functools.partial(sub.add_parser, parents=[common])
    for add in (_run_commands, _studio_commands, _workshop_commands, _demo_command):
        add(command)
    return parser


def _run_commands(command) -> None:
    """train, doctor and report: a training run, before and after."""
    p = command("train", help="Train a LoRA on a folder of captioned images.",
                description="Train a LoRA on a folder of captioned images.")
    add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = command("doctor", help="Check a training folder before a run: used and skipped images, captions, "
                "duplicates, buckets, crops, tags, memory.",
                description="Report on a training folder as a run with these options would see it, loading no "
                            "model: images used and skipped (and why), caption coverage, near-duplicates, images "
                            "smaller than the resolution, buckets, the worst crops (a contact sheet PNG), samples "
                            "and steps per epoch, tag frequencies and the trigger's coverage, and the memory the "
                            "run needs. Takes every train option.")
    p.add_argument("folder", type=Path, nargs="?", help="The training folder (or --data).")
    p.add_argument("--json", action="store_true", help="One JSON object instead of text.")
    p.add_argument("--sheet", type=Path, help="Where to write the contact sheet of the worst crops (default: "
                                              "doctor-FOLDER.png in --output-dir).")
    add_train_options(p)
    p.set_defaults(func=cmd_doctor)

    p = command("report", help="Which checkpoint of a run, at which weight: scored grids as one HTML page.",
                description="For every saved checkpoint of a training run at weights 0, 0.5, 0.75 and 1: "
                            "fixed-seed images of the sample prompts, scored (toy style and content on the toy "
                            "base; validation loss with --validation-split or --validation-data), a recommended "
                            "checkpoint and weight written into its metadata and A1111 sidecar, and report.html "
                            "and report.json in the run folder.")
    p.add_argument("run_dir", type=Path, help="The run's --output-dir (holding NAME.toml and NAME.safetensors).")
    p.add_argument("--name", help="Which run, when the folder holds several.")
    p.add_argument("--json", action="store_true", help="Print the report as JSON.")
    p.set_defaults(func=cmd_report)


def _studio_commands(command) -> None:
    """generate and webui: the blend studio."""
    studio = StudioConfig()
    p = command("generate", help="Generate images with a base and a blend of LoRAs.",
                description="Generate images with a base model and a weighted blend of LoRAs. Prompts may "
                            "also hold <lora:name:w> tags naming LoRAs given with --lora.")
    p.add_argument("--base", default=studio.base, help=f"Base model (as for train; default: {studio.base}).")
    p.add_argument("--base-config", help="For a single-file --base: diffusers folder or Hub id with its configs.")
    _quantize_option(p)
    p.add_argument("--lora", action="append", metavar="PATH[:W]",
                   help="LoRA file and weight, or PATH:TE_W:UNET_W (repeatable; weights in [-2, 2]).")
    p.add_argument("--prompt", required=True, help="Prompt text.")
    p.add_argument("--negative-prompt", default="", help="Negative prompt.")
    d = Params(prompt="")  # the engine's defaults, stated once
    p.add_argument("--seed", type=int, default=d.seed, help=f"Seed; -1 picks one and reports it (default: {d.seed}).")
    p.add_argument("--steps", type=int, default=d.steps, help=f"Denoising steps (default: {d.steps}).")
    p.add_argument("--cfg", type=float, default=d.cfg_scale,
                   help=f"Classifier-free guidance scale (default: {d.cfg_scale:g}).")
    p.add_argument("--width", type=int, default=d.width,
                   help="Image width, a multiple of 8 (default: the base's native size: 512 for SD 1.x, 1024 for SDXL).")
    p.add_argument("--height", type=int, default=d.height, help="Image height, a multiple of 8 (default: as width).")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"Images per batch (default: {d.batch_size}).")
    p.add_argument("--batch-count", type=int, default=d.batch_count,
                   help=f"Number of batches (default: {d.batch_count}).")
    p.add_argument("--scheduler", default=d.scheduler, choices=list(SCHEDULERS),
                   help=f"Sampler (default: {d.scheduler}).")
    p.add_argument("--fuse", action="store_true", help="Merge the blend into the base weights (fast mode).")
    p.add_argument("--out", type=Path, help="Output PNG (default: numbered files in --output-dir).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --out file instead of refusing.")
    p.add_argument("--output-dir", type=Path, default=studio.output_dir,
                   help=f"Folder for numbered outputs (default: {studio.output_dir}).")
    p.set_defaults(func=cmd_generate)

    p = command("webui", help="Start the blend studio in the browser (Gradio).",
                description="Start the blend studio: pick LoRAs from a folder, weight them, generate, grid.")
    p.add_argument("--base", default=studio.base, help=f"Base model (as for train; default: {studio.base}).")
    p.add_argument("--base-config", help="For a single-file --base: diffusers folder or Hub id with its configs.")
    _quantize_option(p)
    p.add_argument("--lora-dir", type=Path, required=True, help="Folder of .safetensors LoRAs (searched recursively).")
    p.add_argument("--output-dir", type=Path, default=studio.output_dir,
                   help=f"Where images are saved (default: {studio.output_dir}).")
    p.add_argument("--host", default=studio.host, help=f"Address to bind (default: {studio.host}).")
    p.add_argument("--port", type=int, default=studio.port, help=f"Port (default: {studio.port}).")
    p.add_argument("--listen", action="store_true", help="Allow a --host other than this machine (prints a warning).")
    p.add_argument("--data-root", type=Path, help="Turn on the Train tab: the folder holding your training-image "
                   "folders, the only place it reads training data from (runs go to --output-dir).")
    p.set_defaults(func=cmd_webui)


def _precision_option(p, default: str) -> None:
    p.add_argument("--precision", choices=SAVE_PRECISION, help=f"Precision of the saved factors (default: {default}; "
                   "alphas stay fp32).")


def _workshop_commands(command) -> None:
    """inspect, convert, merge, resize, extract, bake and analyze: the LoRA workshop."""
    p = command("inspect", help="Show what a LoRA file is: format, family, modules, rank, metadata, hashes.",
                description="Show what a LoRA file is: format, family, modules, rank, alpha, metadata, hashes.")
    p.add_argument("file", type=Path, help="A .safetensors LoRA.")
    p.add_argument("--json", action="store_true", help="Print one JSON object instead of text.")
    p.set_defaults(func=cmd_inspect)

    p = command("convert", help="Rewrite a LoRA in the kohya or diffusers layout.",
                description="Rewrite a LoRA in the kohya (A1111, ComfyUI, Forge) or diffusers layout; "
                            "tensors, alpha and scale are kept exactly.")
    p.add_argument("input", type=Path, help="The LoRA to read (.safetensors).")
    p.add_argument("output", type=Path, help="The file to write (.safetensors).")
    p.add_argument("--to", required=True, choices=("kohya", "diffusers"), help="Target layout.")
    p.add_argument("--base", help="Base the LoRA was trained on, for custom architectures (default: the full-size "
                                  "layout of the LoRA's family).")
    p.add_argument("--overwrite", action="store_true", help="Replace OUTPUT if it exists.")
    p.set_defaults(func=cmd_convert)

    p = command("merge", help="Merge several LoRAs at their weights into one LoRA.",
                description="Merge LoRAs at their weights into one: ranks concatenated (exact), or with --rank "
                            "each module's summed update reduced by SVD (the relative error is reported).")
    p.add_argument("loras", nargs="+", metavar="PATH[:W]",
                   help="LoRA files with weights, PATH:W or PATH:TE_W:UNET_W as for generate.")
    p.add_argument("--out", type=Path, required=True, help="The merged LoRA (.safetensors).")
    p.add_argument("--rank", type=int, help="Reduce each module to this rank by SVD (default: concatenate, exact).")
    p.add_argument("--base", help="The base the LoRAs were made for, for custom architectures (default: the "
                                  "full-size layout of their family).")
    p.add_argument("--format", choices=("kohya", "diffusers"), default="kohya", help="Output layout (default: kohya).")
    _precision_option(p, "fp32 for a concatenation, which it keeps exact; with --rank, the LoRAs' own, fp32 when "
                         "they differ")
    p.add_argument("--overwrite", action="store_true", help="Replace --out if it exists.")
    p.set_defaults(func=cmd_merge)

    p = command("resize", help="Lower a LoRA's rank by SVD.",
                description="Lower a LoRA's rank by SVD of each module's update: to --rank R, or per module to the "
                            "smallest rank keeping --energy F of the squared Frobenius norm. The scale alpha/rank is "
                            "kept.")
    p.add_argument("input", type=Path, help="The LoRA to resize (.safetensors).")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="The new rank of every module.")
    size.add_argument("--energy", type=float, help="Fraction of each update's squared norm to keep, e.g. 0.9.")
    p.add_argument("--out", type=Path, required=True, help="The resized LoRA (.safetensors).")
    p.add_argument("--base", help="The base the LoRA was made for, for custom architectures.")
    p.add_argument("--verbose", action="store_true", help="Print every module's rank and error.")
    _precision_option(p, "the input's")
    p.add_argument("--overwrite", action="store_true", help="Replace --out if it exists.")
    p.set_defaults(func=cmd_resize)

    p = command("extract", help="Extract a LoRA from the difference of two models.",
                description="Extract a LoRA approximating the difference between a tuned model and its base "
                            "(same family), by SVD of each module's difference.")
    p.add_argument("--base", required=True, help="The original model (as for train --base).")
    p.add_argument("--tuned", required=True, help="The fine-tuned model.")
    p.add_argument("--base-config", help="For single-file models: diffusers folder or Hub id with their configs.")
    p.add_argument("--rank", type=int, required=True, help="Rank of the linear modules.")
    p.add_argument("--conv-rank", type=int, help="Also extract the UNet's 3x3 convolutions (LoCon) at this rank (1x1 ones take --rank).")
    p.add_argument("--out", type=Path, required=True, help="The extracted LoRA (.safetensors).")
    p.add_argument("--overwrite", action="store_true", help="Replace --out if it exists.")
    p.set_defaults(func=cmd_extract)

    p = command("bake", help="Merge a blend of LoRAs into a base and save it as a model.",
                description="Merge a blend of LoRAs into a base's weights (as generate --fuse does) and save the "
                            "result as a single-file checkpoint A1111 and ComfyUI load, or a diffusers folder.")
    p.add_argument("--base", required=True, help="The base model (as for train --base).")
    p.add_argument("--base-config", help="For a single-file --base: diffusers folder or Hub id with its configs.")
    p.add_argument("--lora", action="append", required=True, metavar="PATH[:W]",
                   help="LoRA file and weight, or PATH:TE_W:UNET_W (repeatable).")
    p.add_argument("--out", type=Path, required=True, help="The model file (.safetensors) or folder.")
    p.add_argument("--format", choices=("single", "diffusers"), default="single",
                   help="single: one .safetensors in the original layout (default); diffusers: a diffusers folder.")
    p.add_argument("--precision", choices=SAVE_PRECISION, default="fp16",
                   help="Precision of the saved weights (default: fp16; the merge itself runs in fp32).")
    p.add_argument("--overwrite", action="store_true", help="Replace --out if it exists.")
    p.set_defaults(func=cmd_bake)

    p = command("analyze", help="The singular values and effective rank of a LoRA's updates (LoRA paper, Section 7).",
                description="Per module: singular values of the update and its effective rank (90%% and 99%% of the "
                            "energy). With two LoRAs of the same data: the subspace similarity phi of their top "
                            "directions.")
    p.add_argument("files", type=Path, nargs="+", metavar="LORA", help="One LoRA, or two to compare.")
    p.add_argument("--json", action="store_true", help="Print the whole report as JSON.")
    p.add_argument("--plot", type=Path, metavar="DIR", help="Write spectra and the phi map as PNG into DIR.")
    p.add_argument("--base", help="The base the LoRAs were made for, for custom architectures.")
    p.set_defaults(func=cmd_analyze)


def _demo_command(command) -> None:
    """demo: the toy world's style LoRA, trained and measured."""
    studio = StudioConfig()
    p = command("demo", help="Train a style LoRA on the toy base and measure what it does.",
                description="Train a style LoRA on the pretrained toy base from datasets_example/, then write "
                            "a grid (prompts x LoRA weight 0, 0.5, 1) and metrics.json.")
    demo = DemoConfig()
    p.add_argument("--out", default=str(studio.output_dir / "demo"),
                   help=f"Output folder (default: {studio.output_dir / 'demo'}).")
    p.add_argument("--style", choices=list(STYLES), help=f"Which example style (default: {demo.style}).")
    p.add_argument("--steps", type=int, help=f"Training steps (default: {demo.steps}, {demo.blend_steps} with --blend; tuned by measurement).")
    p.add_argument("--sampler", choices=list(SCHEDULERS), metavar="NAME",
                   help=f"Sampler of the measured images (default: {demo.sampler}).")
    p.add_argument("--blend", action="store_true", help="Train both styles for blending (each step at a weight from "
                   f"{demo.blend_weight_min:g} to 1: --train-weight-min) and also measure a 0.5 + 0.5 blend.")
    p.set_defaults(func=cmd_demo)


def _quantize_option(parser: argparse.ArgumentParser) -> None:
    from .config import QUANTIZE

    backend = next(f for _, f, _ in option_fields() if f.name == "quantize_backend")
    parser.add_argument("--quantize-base", choices=[q for q in QUANTIZE if q],
                        help="Hold the base's linear and convolution layers in 8 or 4 bits to save memory (needs "
                             "--quantize-backend's library); LoRAs then apply in exact mode only (default: full precision).")
    parser.add_argument("--quantize-backend", choices=backend.metadata["choices"], default=backend.default,
                        help=f"{backend.metadata['help']} (default: {backend.default})")


def _global_options(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="Only print warnings and errors.")
    parser.add_argument("--debug", action="store_true", default=default,
                        help="Show the full traceback of an unexpected error.")


def _quiet_dependencies() -> None:
    """Upstream libraries log advice meant for their own developers; users see sdlora's messages only. Set through
    the environment variables they read when they are first imported, so no command pays for importing them here
    (diffusers' and transformers' logging modules pull in most of both libraries: seconds of start-up)."""
    import os

    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also transformers' "loading weights" bars
    for noisy in ("diffusers", "transformers", "accelerate", "httpx", "torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


class _Format(logging.Formatter):
    """Information as it is; warnings and errors led by their level ("warning: ..."), as the web UI reads them."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def entry() -> int:
    """The `sdlora` command and `python -m sdlora`: `main` in a process of its own, where the quantization libraries
    stay unimported until a run asks for them (sdlora.optional)."""
    import gc

    from . import optional

    optional.hide()
    code = main()
    # Python's last garbage collection at exit walks every object the libraries made (half a second on the README's
    # machine, a tenth of a short run); the command's files are written and closed by now (each atomically), so
    # the objects are left to the operating system.
    gc.freeze()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    logging.basicConfig(level=logging.WARNING if ns.quiet else logging.INFO, handlers=[handler], force=True)
    _quiet_dependencies()
    try:
        return ns.func(ns)
    except SdloraError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; lower --batch-size or --resolution (train: --gradient-checkpointing helps)",
              file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:  # a full disk, a permission, a vanished file: the user's to fix, with the file named
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:
        if "out of memory" in str(e).lower():  # torch.OutOfMemoryError and its kin
            print("error: out of memory on the GPU; lower --batch-size or --resolution (train: "
                  "--gradient-checkpointing, --mixed-precision bf16)", file=sys.stderr)
            return EXIT_USER_ERROR
        if ns.debug:
            raise
        print(f"error: unexpected {type(e).__name__}: {e}\nThis is a bug in sdlora or one of its libraries; "
              "run again with --debug for the traceback, and report it.", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


