"""Train a VQ-VAE: parse flags (and --config FILE) into a Config and call vqvae.train(cfg).

    python train.py --quantizer ba_vq --codebook_size 512
    python train.py --dataset cifar10-sample --epochs 2 --no_wandb
    python train.py --config config.yaml --name ba_k512 --quantizer ba_vq
    python train.py --name ba_k512 --resume
    python train.py --sweep sweeps/seed_ablation.yaml --epochs 2 --dataset cifar10-sample --no_wandb
    python train.py --import my_quantizer --quantizer mine --mine_alpha 0.3   # a quantizer of one's own

Every Config field is a flag, and so is every option of a registered quantizer (`python train.py --help` lists
them with their defaults, each quantizer's in a group of its own). `--import MODULE` imports a module (a name or a
.py file, relative to the working directory) before the flags are read, so the quantizers it registers and their
options are known; the run's config records it (`imports`), so sweeps and --resume import it too.
Bad input prints one line and exits with code 2.
"""
from __future__ import annotations

import argparse
import difflib
import sys
import typing

import checkpoint
import vqvae
from vqvae import Config, UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        if message.startswith("argument --quantizer: invalid choice"):
            message += "; a quantizer defined elsewhere registers when its module is imported: --import MODULE"
        raise UserError(message)


def _flag_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return str, list(typing.get_args(hint))
    base = args[0] if args else hint
    return base, None


def _help(f) -> str:
    """The field's one-line doc, with its default unless the doc already says it or there is none to show."""
    text = f.metadata["help"]
    if "default" in text or f.default in (None, ""):
        return text
    return f"{text} (default: {f.default})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file of config keys (flags override it)")
    parser.add_argument("--sweep", nargs="+", metavar="FILE",
                        help="YAML sweep file(s): base config + named experiments (see sweeps/); several files "
                             "share one queue of --jobs slots and each writes its own table")
    parser.add_argument("--jobs", type=int, help="with --sweep: experiments run at a time, each in a process of its "
                                                 "own (default 1)")
    parser.add_argument("--table_only", action="store_true", help="with --sweep: train nothing; write results.csv "
                                                                  "and results.md from the runs there are")
    parser.add_argument("--import", dest="modules", action="append", metavar="MODULE",
                        help="import a module (a name or a .py file, relative to the working directory) whose "
                             "quantizers and options the run needs; added to the config's imports "
                             f"(default: {Config.imports})")
    hints, groups = typing.get_type_hints(Config), {}
    for name, f in vqvae.config_fields().items():
        if name == "imports":  # set by --import, above
            continue
        quantizer = f.metadata.get("quantizer")  # a registered quantizer's own option: in that quantizer's group
        if quantizer is not None and quantizer not in groups:
            groups[quantizer] = parser.add_argument_group(f"options of --quantizer {quantizer}")
        group = groups.get(quantizer, parser)
        kind, choices = _flag_type(hints[name])
        if "choices" in f.metadata:  # read when the parser is built: quantizers registered by then are offered
            choices = f.metadata["choices"]()
        if kind is bool:
            # both spellings work; --help shows the one that changes something
            on, off = (argparse.SUPPRESS, f"turn off: {f.metadata['help']}") if f.default else \
                (f.metadata["help"], argparse.SUPPRESS)
            group.add_argument(f"--{name}", action="store_true", help=on)
            group.add_argument(f"--no_{name}", dest=name, action="store_false", help=off)
        else:
            group.add_argument(f"--{name}", type=kind, choices=choices, help=_help(f),
                               metavar=name.upper() if choices is None else None)
    return parser


def run_imports(argv: list[str]) -> str:
    """The run's `imports`: those of --config FILE and of each --sweep FILE's base (else the default), then each
    --import MODULE. Read before the flags are parsed, so the flags know what these modules register."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--sweep", nargs="+", default=[])
    pre.add_argument("--import", dest="modules", action="append", default=[])
    args, _ = pre.parse_known_args(argv)
    files = ([vqvae.read_yaml(args.config)] if args.config else []) + \
        [vqvae.read_yaml(path).get("base") or {} for path in args.sweep]
    listed = [f["imports"] for f in files if isinstance(f, dict) and "imports" in f] or [Config.imports]
    names = [s.strip() for text in listed if isinstance(text, str) for s in text.split(",")] + args.modules
    return ",".join(dict.fromkeys(n for n in names if n))


def parse(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    modules = run_imports(argv)
    vqvae.import_modules(modules)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].split("=")[0]
        options = [o for o in parser._option_string_actions if o.startswith("--")]
        near = difflib.get_close_matches(flag, options, n=1)
        raise UserError(f"unknown flag {flag}" + (f" (did you mean {near[0]}?)" if near else ""))
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "sweep", "jobs", "table_only", "modules")}
    if getattr(args, "modules", None):
        flags["imports"] = modules
    return args, flags


def main(argv: list[str] | None = None) -> int:
    try:
        args, flags = parse(sys.argv[1:] if argv is None else argv)
        if getattr(args, "sweep", None):
            from sweep import run_sweep
            run_sweep(args.sweep, getattr(args, "config", None), flags, getattr(args, "jobs", 1),
                      getattr(args, "table_only", False))
        elif getattr(args, "jobs", None) is not None or getattr(args, "table_only", False):
            raise UserError("--jobs and --table_only go with --sweep")
        else:
            vqvae.train(vqvae.resolve_config(getattr(args, "config", None), flags))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except vqvae.NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except checkpoint.Interrupted as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
