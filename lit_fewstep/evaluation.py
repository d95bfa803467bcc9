"""`evaluate`: sample a checkpoint at several NFE through its own `sample()` API and score it.

Toy data: sliced W2, MMD, exact NLL (where the toy has a density), k-NN precision/recall, against
fresh samples of the exact distribution; for the discrete ``grid`` toy also ``token_tv``, the exact total variation
between the samples' cells and the true probability table. Images: FID and precision/recall on the features of a
feature network (the shipped digits classifier for digits; InceptionV3 from a local weights file
otherwise), against the training split.

A class-conditional model is sampled with its classes in the reference set's proportions (`Evaluator.class_labels`),
not with uniform random draws: at 2,000 samples of 10 classes the random class counts alone moved the digits
teacher's FID between 2.8 and 5.6 over ten seeds, against 2.3-3.0 with the reference's proportions
(docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import LightningDataModule

from .methods.analog_bits import token_total_variation
from .methods.sampling import add_checkpoint_arguments, check_sigmas, draw, load_for_sampling, sampling_options
from .metrics import MMD, ExactNLL, PrecisionRecall, SlicedWasserstein2, load_digits_features, make_fid
from .utils.args import check_writable, positive_int
from .utils.checkpoint import TRUST_FLAG
from .utils.config import UnsafeClassPathError, instantiate
from .utils.machine import describe_machine
from .utils.runs import resolve_run_pointer

__all__ = ["Evaluator", "evaluate_main", "data_from_config", "format_table", "proportional_labels", "LABEL_DRAWS"]

# How `evaluate` and the leaderboard give a class-conditional model its classes: "reference" (the reference set's
# proportions, shuffled; the default) or "uniform" (independent uniform draws, the models' own default).
LABEL_DRAWS = ("reference", "uniform")

# `Evaluator.score` holds all samples in one process: its metrics must not all-gather across DDP ranks (a
# callback scoring on rank 0 alone would otherwise hang in the gather, or pair it with a gradient all-reduce).
_LOCAL = {"sync_on_compute": False}


def data_from_config(path: str, trust: bool = False):
    """A data module from a YAML file: a training config (its `data:` section) or a bare class_path block."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data: config {path!r} does not exist; pass e.g. --data configs/edm/digits.yaml.")
    config = yaml.safe_load(file.read_text())
    config = config.get("data", config) if isinstance(config, dict) else None
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(f"data: {path!r} has no data class_path; pass a training config with a `data:` section.")
    return instantiate(config, trust=trust, base=LightningDataModule)


def proportional_labels(reference: torch.Tensor, num: int, seed: int) -> torch.Tensor:
    """`num` class labels in the proportions of the `reference` labels, in an order shuffled by `seed`.

    Class c gets floor(num p_c) labels, and the leftover ones go to the largest remainders num p_c - floor(num p_c)
    (ties to the smaller class index), so the counts are the closest integers to num p_c that sum to num."""
    counts = torch.bincount(reference.long().flatten())
    total = int(counts.sum())
    whole, remainder = (counts * num) // total, (counts * num) % total  # integers: exact ties
    leftover = num - int(whole.sum())
    order = sorted(range(len(counts)), key=lambda c: (-int(remainder[c]), c))
    whole[order[:leftover]] += 1
    labels = torch.repeat_interleave(torch.arange(len(whole)), whole)
    return labels[torch.randperm(num, generator=torch.Generator().manual_seed(seed))]


class Evaluator:
    """Scores samples against a data module's reference set; one instance serves many NFE values.

    Args:
        datamodule: a lit_fewstep data module (toy or images).
        num_reference: reference samples for toys (images use the whole training split).
        seed: seed of the toy reference draw.
        feature_net: images only; default: the shipped digits classifier for 1-channel 8/16 px data.
    """

    def __init__(self, datamodule, num_reference: int = 10000, seed: int = 0, feature_net: torch.nn.Module | None = None):
        datamodule.setup("fit")
        self.datamodule = datamodule
        self.is_image = bool(getattr(datamodule, "is_image", False))
        if self.is_image:
            self.feature_net = feature_net or self._default_features(datamodule)
            real, self.real_labels = datamodule.reference_samples(10**9, split="train")
            self.real = self._features(real)
        else:
            self.feature_net = None
            self.real, self.real_labels = datamodule.reference_samples(num_reference, seed=seed + 7919)
            distribution = datamodule.distribution
            try:
                distribution.log_prob(self.real[:2])
                self.log_prob = distribution.log_prob
            except NotImplementedError:
                self.log_prob = None

    def class_labels(self, model, num: int, seed: int, draw: str = "reference") -> torch.Tensor | None:
        """The classes to sample `model` with for a score: None for an unconditional model (or ``draw="uniform"``:
        the model's own uniform draws), else `proportional_labels` of the reference's labels."""
        if draw not in LABEL_DRAWS:
            raise ValueError(f"class labels: unknown draw {draw!r}; choose one of {LABEL_DRAWS}.")
        num_classes = int(getattr(model, "num_classes", 0))
        if draw == "uniform" or num_classes == 0:
            return None
        if self.real_labels is None:
            raise ValueError("class labels: the data module's reference set carries no labels, so a class-conditional "
                             "model cannot be sampled in its proportions; pass --class_labels uniform.")
        if int(self.real_labels.max()) >= num_classes:
            raise ValueError(f"class labels: the reference set has class {int(self.real_labels.max())} but the model "
                             f"takes {num_classes} classes; score it on the data it was trained on (--data).")
        return proportional_labels(self.real_labels, num, seed)

    def sample(self, model, num: int, nfe: int, seed: int, use_ema: bool = True, batch_size: int = 1000,
               class_labels: str = "reference", **options):
        """`methods.sampling.draw` of `num` samples for a score, with the classes of `class_labels` (see above):
        (samples, labels, nfe spent, seconds)."""
        labels = self.class_labels(model, num, seed, class_labels)
        return draw(model, num, nfe, seed, labels, use_ema, batch_size, **options)

    @staticmethod
    def _default_features(datamodule):
        c, h, w = datamodule.data_shape
        if c == 1 and h == w and h in (8, 16):
            return load_digits_features()
        raise ValueError(
            f"metrics.inception_weights: no offline feature network for {c}x{h}x{w} images; "
            "pass --inception_weights /path/to/pt_inception-2015-12-05-6726825d.pth."
        )

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        feats = [self.feature_net(chunk) for chunk in images.float().split(512)]
        return torch.cat(feats).double()

    @torch.no_grad()
    def score(self, samples: torch.Tensor) -> dict[str, float]:
        samples = samples.float().cpu()
        out: dict[str, float] = {}
        if self.is_image:
            fake = self._features(samples.clamp(-1, 1))
            fid = make_fid(torch.nn.Identity())
            out["fid"] = _fid_from_features(fid, fake, self.real)
            pr = PrecisionRecall(**_LOCAL)
        else:
            fake = samples
            for name, metric in (("sw2", SlicedWasserstein2(**_LOCAL)), ("mmd", MMD(**_LOCAL))):
                metric.update(fake=fake, real=self.real)
                out[name] = float(metric.compute())
            if self.log_prob is not None:
                nll = ExactNLL(self.log_prob, **_LOCAL)
                nll.update(fake)
                out["nll"] = float(nll.compute())
            distribution = self.datamodule.distribution
            if hasattr(distribution, "probs") and hasattr(distribution, "cell_index"):  # atomic toy (grid): exact table
                out["token_tv"] = token_total_variation(distribution.cell_index(fake), distribution.probs)
            pr = PrecisionRecall(**_LOCAL)
        pr.update(fake=fake, real=self.real)
        precision, recall = pr.compute().tolist()
        out["precision"], out["recall"] = precision, recall
        return out


def _fid_from_features(fid_metric, fake: torch.Tensor, real: torch.Tensor) -> float:
    from .metrics import frechet_distance, gaussian_stats

    mu_f, sigma_f = gaussian_stats(fake)
    mu_r, sigma_r = gaussian_stats(real)
    return float(frechet_distance(mu_f, sigma_f, mu_r, sigma_r))


def format_table(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in rows[0] if k not in ("command",)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_main(argv: list[str]) -> list[dict[str, Any]]:
    """Sample a checkpoint at several NFE and print one metrics row per NFE (also written as JSON)."""
    parser = argparse.ArgumentParser(prog="python -m lit_fewstep evaluate", description=evaluate_main.__doc__)
    add_checkpoint_arguments(parser)
    parser.add_argument("--nfe", type=positive_int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--num", type=positive_int, default=5000, help="generated samples per NFE")
    parser.add_argument("--data", default=None, help="config with a data: section (default: the one recorded at fit)")
    parser.add_argument("--num_reference", type=positive_int, default=10000, help="toy reference samples")
    parser.add_argument("--inception_weights", default=None, help="local InceptionV3 weights for non-digits images")
    parser.add_argument("--teacher_nfe", type=positive_int, nargs="+", default=None,
                        help="also score the teacher of a distilled checkpoint at these NFE, in the same table")
    parser.add_argument("--teacher", default=None, help="teacher checkpoint for --teacher_nfe (default: the one "
                        "recorded in --ckpt as teacher_ckpt)")
    parser.add_argument("--class_labels", choices=LABEL_DRAWS, default="reference",
                        help="classes of a class-conditional model's samples: in the reference set's proportions "
                             "(default) or uniform random draws")
    parser.add_argument("--out", default=None, help="JSON file (default: next to the checkpoint)")
    args = parser.parse_args(argv)
    check_sigmas(parser, args, args.nfe)
    out = check_writable(Path(args.out) if args.out else resolve_run_pointer(args.ckpt).with_suffix(".eval.json"),
                         "--out")
    module = load_for_sampling(args.ckpt, args.device, args.trust_checkpoint, allow_modules=args.allow_module)
    teacher_path = args.teacher or getattr(module, "teacher_ckpt", None)
    if args.teacher_nfe and not teacher_path:
        parser.error(f"--teacher_nfe: {args.ckpt} records no teacher_ckpt; pass --teacher PATH.")
    options = sampling_options(args)
    runs = [("student" if args.teacher_nfe else type(module).__name__, module, args.nfe, options)]
    if args.teacher_nfe:
        # The teacher samples with its own defaults (Heun, its guidance); only --solver is shared.
        teacher = load_for_sampling(teacher_path, args.device, args.trust_checkpoint, field="teacher",
                                    allow_modules=args.allow_module)
        runs.append(("teacher", teacher, args.teacher_nfe, {"solver": args.solver} if args.solver else {}))
    # Every requested NFE is checked before any work (reference features, sampling, scoring): a bad one must not
    # cost the minutes spent on the good ones first and then write nothing.
    for name, model, nfes, _ in runs:
        for nfe in nfes:
            try:
                model.check_nfe(nfe)
            except ValueError as err:
                parser.error(f"--{'teacher_' if name == 'teacher' else ''}nfe: {err}")
    if args.sigmas is not None:  # the model checks its levels (one sample), also before any work
        try:
            with torch.no_grad():
                module.sample(1, args.nfe[0], use_ema=args.ema, sigmas=args.sigmas)
        except ValueError as err:
            parser.error(f"--sigmas: {err}")
    if args.data is not None:
        datamodule = data_from_config(args.data, trust=args.trust_checkpoint)
    elif module.data_config is not None:
        try:
            datamodule = instantiate(module.data_config, trust=args.trust_checkpoint, base=LightningDataModule,
                                     allow_modules=args.allow_module)
        except UnsafeClassPathError as err:
            raise UnsafeClassPathError(f"ckpt: {args.ckpt!r} (its data config): {err}; only if you trust the "
                                       f"file's source, pass {TRUST_FLAG}.") from None
    else:
        parser.error("the checkpoint records no data module; pass --data configs/<method>/<data>.yaml")
    feature_net = None
    if args.inception_weights:
        from .metrics import InceptionFeatures

        feature_net = InceptionFeatures(args.inception_weights)
    evaluator = Evaluator(datamodule, args.num_reference, args.seed, feature_net)
    rows = []
    for name, model, nfes, opts in runs:
        for nfe in nfes:
            x, _, spent, seconds = evaluator.sample(model, args.num, nfe, args.seed, args.ema, args.batch_size,
                                                    args.class_labels, **opts)
            row = {"model": name, "nfe": nfe, "nfe_spent": spent, **evaluator.score(x),
                   "samples_per_s": args.num / seconds}
            rows.append(row)
            print(format_table([row]).splitlines()[-1] if rows[:-1] else format_table([row]), flush=True)
    result = {"ckpt": str(args.ckpt), "method": type(module).__name__, "num": args.num, "seed": args.seed,
              "class_labels": args.class_labels, "ema": args.ema, "teacher": teacher_path if args.teacher_nfe else None,
              "machine": describe_machine(),
              "rows": rows}
    out.write_text(json.dumps(result, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
    print(f"wrote {out}")
    return rows
