"""`python -m lit_fewstep`: LightningCLI (fit / validate / test) plus our `sample`, `evaluate` and `pairs`.

`fit --config configs/<method>/<data>.yaml` trains any method chosen by `model.class_path`.
`sample` and `evaluate` read a self-describing checkpoint and need no config; `pairs` writes a teacher's ODE
pairs (DMD's regression set; also `python -m lit_fewstep.data.pairs`).

This is the top floor of the package: it may import every layer and no module imports it (the rule is in
`lit_fewstep/__init__.py`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from .data.pairs import make_pairs, save_pairs
from .methods.base import FewStepModule, NonFiniteError, load_teacher
from .methods.sampling import add_checkpoint_arguments, check_sigmas, draw, load_for_sampling, sampling_options
from .utils.args import check_writable, parse_bool, positive_int
from .utils.checkpoint import TRUST_FLAG
from .utils.distributed import leave_process_group
from .utils.images import save_samples_png
from .utils.runs import point_latest

__all__ = ["main", "FewStepCLI", "FewStepTrainer", "sample_main", "evaluate_main", "pairs_main", "convert_main"]


def sample_main(argv: list[str]) -> Path:
    """Draw samples from a checkpoint and write them as .npz (or a .png picture)."""
    parser = argparse.ArgumentParser(prog="python -m lit_fewstep sample", description=sample_main.__doc__)
    add_checkpoint_arguments(parser)
    parser.add_argument("--nfe", type=positive_int, required=True, help="network evaluations per sample")
    parser.add_argument("--num", type=positive_int, default=64)
    parser.add_argument("--out", required=True, help="FILE.npz, or FILE.png for a grid / scatter plot")
    parser.add_argument("--class_labels", type=int, nargs="+", default=None,
                        help="one label for all samples, or one per sample")
    args = parser.parse_args(argv)
    check_sigmas(parser, args, [args.nfe])
    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        out = out.with_suffix(".npz")
    check_writable(out, "--out")  # before any sampling
    module = load_for_sampling(args.ckpt, args.device, args.trust_checkpoint, allow_modules=args.allow_module)
    labels = None
    if args.class_labels is not None:
        if len(args.class_labels) not in (1, args.num):
            parser.error(f"--class_labels takes one label or --num={args.num} labels, got {len(args.class_labels)}")
        labels = torch.tensor(args.class_labels * (args.num if len(args.class_labels) == 1 else 1), dtype=torch.long)
    options = sampling_options(args, args.num)
    x, y, nfe, seconds = draw(module, args.num, args.nfe, args.seed, labels, args.ema, args.batch_size, **options)
    if out.suffix == ".png":
        save_samples_png(x.numpy(), out, None if y is None else y.numpy(), title=f"{Path(args.ckpt).name}, NFE {nfe}")
    else:
        arrays = {"samples": x.numpy().astype(np.float32), "nfe": np.int64(nfe)}
        if y is not None:
            arrays["labels"] = y.numpy().astype(np.int64)
        np.savez(out, **arrays)
    print(f"wrote {args.num} samples ({nfe} NFE each, {args.num / seconds:.1f} samples/s) to {out}")
    return out


def evaluate_main(argv: list[str]) -> dict:
    """Sample a checkpoint at several NFE and print distribution metrics against real data."""
    from .evaluation import evaluate_main as run

    return run(argv)


def pairs_main(argv: list[str] | None = None, prog: str = "python -m lit_fewstep pairs") -> Path:
    """Teacher ODE noise -> sample pairs, made once and reused (DMD's regression set; reflow couplings)."""
    parser = argparse.ArgumentParser(prog=prog, description=pairs_main.__doc__)
    parser.add_argument("--teacher", required=True, help="lit_fewstep teacher checkpoint (.pt/.ckpt)")
    parser.add_argument("--num", type=int, required=True, help="number of pairs")
    parser.add_argument("--nfe", type=int, default=35, help="teacher evaluations per sample (EDM Heun)")
    parser.add_argument("--path", choices=("edm", "linear"), default="edm",
                        help="edm: EDM Heun from sigma_max * z (any teacher); linear: a flow-matching teacher's own "
                             "ODE from z at t = 1 (reflow couplings for CAF / rectified flow)")
    parser.add_argument("--out", required=True, help="output FILE.pt")
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="teacher CFG scale (1 = none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=positive_int, default=512)
    parser.add_argument("--trust_checkpoint", type=parse_bool, default=False,
                        help="allow pickle and classes outside lit_fewstep in --teacher (runs code from the file)")
    args = parser.parse_args(argv)
    teacher = load_teacher(args.teacher, trust=args.trust_checkpoint, field_name="--teacher", opt_in=TRUST_FLAG)
    start = time.perf_counter()
    pairs = make_pairs(teacher, args.num, args.nfe, guidance_scale=args.guidance_scale, seed=args.seed,
                       batch_size=args.batch_size, path=args.path)
    out = Path(args.out)
    save_pairs(pairs, out, args.teacher)
    print(f"wrote {args.num} pairs ({pairs['nfe']} NFE each, {time.perf_counter() - start:.1f} s) to {out}")
    return out


def convert_main(argv: list[str]) -> Path:
    """Convert a teacher into one safe file: --from diffusers|edm|edm2 SRC --out teacher.safetensors (a diffusers
    UNet2DModel folder with its scheduler, an NVlabs EDM / EDM2 .pkl with --trust_checkpoint true, or an official-layout
    state dict with --arch; the result is read by sample, evaluate and teacher_ckpt), or back with
    --from safetensors SRC --to diffusers|edm|edm2 --out PATH."""
    from .teachers.formats import convert

    parser = argparse.ArgumentParser(prog="python -m lit_fewstep convert", description=convert_main.__doc__)
    from .teachers.official import ARCHS

    parser.add_argument("--from", dest="source", choices=("diffusers", "edm", "edm2", "safetensors"), required=True,
                        help="format of SRC")
    parser.add_argument("src", metavar="SRC", help="diffusers folder, NVlabs .pkl, official-layout state dict "
                                                   "(.pt/.safetensors, with --arch), or our .safetensors")
    parser.add_argument("--out", required=True, help="FILE.safetensors, or a folder with --to diffusers")
    parser.add_argument("--to", choices=("safetensors", "diffusers", "edm", "edm2"), default=None,
                        help="output format (default: safetensors; from safetensors: diffusers)")
    parser.add_argument("--arch", choices=sorted(ARCHS), default=None, help="architecture of a state-dict SRC")
    parser.add_argument("--label_dim", type=int, default=0, help="classes of a state-dict SRC (0: unconditional)")
    parser.add_argument("--sigma_data", type=float, default=0.5, help="data std of the EDM preconditioning")
    parser.add_argument("--trust_checkpoint", type=parse_bool, default=False,
                        help="allow reading an NVlabs .pkl (a pickle: only for files you trust)")
    args = parser.parse_args(argv)
    out = convert(args.source, args.src, args.out, args.to, args.sigma_data, args.arch, args.label_dim,
                  args.trust_checkpoint)
    print(f"wrote {out}")
    return out


def benchmark_main(argv: list[str]) -> dict:
    """The leaderboard (`benchmarks/leaderboard.py`), which lives in the repository, not in the installed package."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "leaderboard.py"
    if not script.is_file():
        raise ValueError(f"benchmark: needs a checkout of the repository ({script} not found); run it from a clone.")
    root = str(script.parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.leaderboard import main as leaderboard_main

    return leaderboard_main(argv)


TOOLS = {"sample": sample_main, "evaluate": evaluate_main, "pairs": pairs_main, "convert": convert_main,
         "benchmark": benchmark_main}


class FewStepTrainer(Trainer):
    """Lightning's Trainer, loading resume checkpoints with weights_only=True unless told otherwise;
    `sample`/`evaluate`/`pairs` are listed here so `--help` shows them."""

    def fit(self, model, train_dataloaders=None, val_dataloaders=None, datamodule=None, ckpt_path: str | None = None,
            weights_only: bool = True):
        """Train; `--ckpt_path` resumes from the file's state (the config decides the model; safe loading:
        `--weights_only false` allows pickle in that file only, for files you trust)."""
        return super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, weights_only=weights_only)

    def validate(self, model=None, dataloaders=None, ckpt_path: str | None = None, verbose: bool = True,
                 datamodule=None, weights_only: bool = True):
        """Validation metrics of a model or checkpoint."""
        return super().validate(model, dataloaders, ckpt_path, verbose, datamodule, weights_only=weights_only)

    def test(self, model=None, dataloaders=None, ckpt_path: str | None = None, verbose: bool = True,
             datamodule=None, weights_only: bool = True):
        """Test metrics of a model or checkpoint."""
        return super().test(model, dataloaders, ckpt_path, verbose, datamodule, weights_only=weights_only)

    def sample(self):
        """Draw samples from a checkpoint: sample --ckpt PATH --nfe K --num N --seed S --out FILE."""
        raise RuntimeError("run `python -m lit_fewstep sample --help`")

    def evaluate(self):
        """Metrics of a checkpoint at several NFE: evaluate --ckpt PATH --nfe 1 2 4 --num N."""
        raise RuntimeError("run `python -m lit_fewstep evaluate --help`")

    def pairs(self):
        """A teacher's ODE pairs for DMD's regression loss: pairs --teacher PATH --num N --nfe 35 --out FILE.pt."""
        raise RuntimeError("run `python -m lit_fewstep pairs --help`")

    def convert(self):
        """A diffusers teacher as one .safetensors file: convert --from diffusers SRC --out teacher.safetensors."""
        raise RuntimeError("run `python -m lit_fewstep convert --help`")

    def benchmark(self):
        """The leaderboard, every method at equal NFE (from a checkout): benchmark --data tree digits."""
        raise RuntimeError("run `python -m lit_fewstep benchmark --help`")


class FewStepCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = LightningCLI.subcommands()
        commands.pop("predict", None)
        commands.update({tool: set() for tool in TOOLS})
        return commands

    def _prepare_subcommand_parser(self, klass, subcommand, **kwargs):
        if subcommand in TOOLS:  # parsed by main() with argparse; listed here for --help only
            return self.init_parser(**kwargs)
        return super()._prepare_subcommand_parser(klass, subcommand, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--export_format", choices=("pt", "safetensors"), default="pt",
                            help="format of the exported model (model.pt, or model.safetensors: no pickle)")
        parser.add_argument("--compile", type=bool, default=False,
                            help="torch.compile the networks (FewStepModule.compile_networks; networks differentiated "
                                 "with forward-mode JVPs stay eager: docs/precision.md)")
        parser.add_argument("--picture_samples", type=Optional[NonNegativeInt], default=None,
                            help="samples in the picture written beside the exported model (default: 64 images or "
                                 "2,000 toy points; 0: no picture, e.g. for a large model on CPU)")

    def before_fit(self) -> None:
        if self.config[self.subcommand].get("compile"):
            self.model.compile_networks()

    def _parse_ckpt_path(self) -> None:
        """Lightning would re-parse the model config from the checkpoint's `hyper_parameters`, letting a file
        rewrite the user's config and name any class (and it reads the file with weights_only=True before
        `--weights_only false` can apply). Here the config decides the model; the checkpoint supplies state only."""

    def after_fit(self) -> None:
        """Export the trained module as a small self-describing file next to the logs."""
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        if not self.trainer.is_global_zero or self.trainer.interrupted:
            return
        suffix = self.config[self.subcommand].get("export_format", "pt")  # --export_format safetensors: no pickle
        out = Path(log_dir or self.trainer.default_root_dir) / f"model.{suffix}"
        self.model.export(str(out))
        num = self.config[self.subcommand].get("picture_samples")
        picture = self._sample_picture(out.parent / "samples.png", num) if num != 0 else None
        # every run has its own version_N folder (never overwritten); <name>/latest points to the newest finished one
        versioned = isinstance(self.trainer.logger, (TensorBoardLogger, CSVLogger))  # <save_dir>/<name>/<version>
        pointer = point_latest(out.parent) if versioned and log_dir else None
        also = f" ({pointer / out.name} points to it)" if pointer else ""
        print(f"exported {type(self.model).__name__} to {out}{also}", flush=True)
        if picture is not None:
            print(f"wrote a picture of its samples to {picture}", flush=True)

    def _sample_picture(self, path: Path, num: int | None = None) -> Path | None:
        """The job ends with a picture of the exported model's samples beside it: `num` (default 64) images (every
        class in turn) or (default 2,000) toy points, seed 0, at the model's own step count (`default_nfe`: 1 for a
        consistency model or CTM, the final student's steps for guided distillation, a DMD generator's steps, 35 for
        an ODE teacher)."""
        module = self.model.eval()
        nfe = module.default_nfe
        num = num or (64 if len(module.data_shape) == 3 else 2000)
        labels = torch.arange(num) % module.num_classes if module.num_classes else None
        try:
            x, y, spent, _ = draw(module, num, nfe, 0, labels, True, 1000)
            return save_samples_png(x.numpy(), path, None if y is None else y.numpy(),
                                    title=f"{type(module).__name__}, NFE {spent}")
        except (ValueError, RuntimeError, OSError) as err:  # the model is exported already: say so, do not fail
            print(f"no picture of samples ({_one_line(err)})", file=sys.stderr, flush=True)
            return None


def _own_classes_in_help() -> None:
    """`--model.help DMD2` listed every torch.nn class (1,400 lines) as a "known subclass" of the networks' `nn.Module`
    type: name lit_fewstep's networks (the public classes of `nets` and `teachers`) and count the others
    (jsonargparse's help text, patched once)."""
    from jsonargparse._typehints import ActionTypeHint

    original = ActionTypeHint.extra_help
    if getattr(original, "lit_fewstep", False):
        return

    def extra_help(self):
        text = original(self)
        head, found, names = text.partition("known subclasses: ")
        names = names.split(", ")
        networks = "torch.nn.Module" in names
        own = [name for name in names if name.startswith("lit_fewstep.") and not (networks and (
            name.count(".") != 2 or not name.startswith(("lit_fewstep.nets.", "lit_fewstep.teachers."))))]
        if not found or len(own) == len(names):
            return text
        return head + found + ", ".join(own + [f"and {len(names) - len(own)} classes of other packages"])

    extra_help.lit_fewstep = True
    ActionTypeHint.extra_help = extra_help


class _SaveConfig(SaveConfigCallback):
    """Lightning's config saving, with its refusal to overwrite a run as one line (a pinned logger version)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        try:
            super().setup(trainer, pl_module, stage)
        except RuntimeError as err:
            if "to NOT exist" not in str(err):
                raise
            raise FileExistsError(
                f"trainer.logger: {trainer.log_dir} already holds a run (its config.yaml); leave "
                "trainer.logger.init_args.version unset for a new version_N folder, or pick a new version.") from None


def main(args: list[str] | None = None):
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in TOOLS:
        return TOOLS[argv[0]](argv[1:])
    _own_classes_in_help()
    return FewStepCLI(
        FewStepModule,
        LightningDataModule,
        trainer_class=FewStepTrainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=_SaveConfig,  # a run folder is never reused: configs no longer pin a version
        args=argv,
    )


DEBUG_ENV = "LIT_FEWSTEP_DEBUG"


def _one_line(err: BaseException) -> str:
    """The clearest single line of an error chain: the deepest cause whose message is one line (jsonargparse and
    Lightning wrap our one-line messages in longer ones), else the first line of the outermost message."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    for candidate in reversed(chain):
        text = str(candidate).strip()
        if text and "\n" not in text:
            return text
    text = str(chain[0]).strip()
    return text.splitlines()[0] if text else type(chain[0]).__name__


def console(args: list[str] | None = None) -> int:
    """Entry point of `lit_fewstep` and `python -m lit_fewstep`: exit status 0 on success; a user error (bad value,
    missing file, refused checkpoint, non-finite training) prints one line and exits with status 2. `--debug` (or
    LIT_FEWSTEP_DEBUG=1) shows the traceback instead."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        main(argv)
        leave_process_group()  # under DDP: a clean exit status once the run has succeeded
    except (ValueError, TypeError, OSError, NonFiniteError) as err:
        if debug:
            raise
        print(f"error: {_one_line(err)} (--debug shows the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(console())
