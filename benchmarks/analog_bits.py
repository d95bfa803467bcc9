"""Analog Bits in miniature (Chen, Zhang & Hinton 2022): self-conditioning, asymmetric time intervals, binary vs Gray.

`--part toy`: the discrete ``grid`` toy (`configs/analog_bits/toy.yaml`, 3 bits per coordinate). Three models are
trained with the config as shipped, changing one thing each: binary + self-conditioning, binary without, Gray +
self-conditioning. Metric: the exact total variation (TV) between the decoded tokens and the true probability table
(20,000 samples; the TV of 20,000 exact samples is the floor sampling noise alone gives). The exact denoiser on the
same toy is scored too (no learning error: what the sampler alone does with N steps and td).

`--part digits`: 8x8 digits as 17-level tokens (5 bits per pixel, `configs/analog_bits/digits.yaml` at a reduced
iteration budget), with and without self-conditioning, binary and Gray code. Metrics: FID on the shipped digits classifier's features
(2,000 samples against the training split) and the exact bit accuracy of each sample against its nearest training
image (Hamming distance over the 320 bits).

Each sampling setting is scored for sampling seeds 0..S-1; the tables give the median. Models are trained by the
command line (`python -m lit_fewstep fit ...`, commands in the result file) unless a trained model.pt already sits
under --runs.

    OMP_NUM_THREADS=1 python benchmarks/analog_bits.py --part toy
    OMP_NUM_THREADS=1 python benchmarks/analog_bits.py --part digits --iterations 1500
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_fewstep.data.bits import BitCodec, categorical_bits_x0  # noqa: E402
from lit_fewstep.data.toy import CategoricalGrid  # noqa: E402
from lit_fewstep.diffusion.paths import VPCosinePath  # noqa: E402
from lit_fewstep.methods.analog_bits import analog_bits_sample, nearest_bit_accuracy, token_total_variation  # noqa: E402
from lit_fewstep.utils.checkpoint import load_module  # noqa: E402
from lit_fewstep.utils.machine import describe_machine  # noqa: E402

STEPS = (10, 25, 100)
TDS = (0.0, 1.0)
NO_SELF_COND = ["--model.init_args.self_condition", "0", "--model.init_args.net.init_args.extra_channels", "0"]
VARIANTS = {
    "toy": {"binary, self-cond": [], "binary, no self-cond": NO_SELF_COND,
            "gray, self-cond": ["--model.init_args.code", "gray"]},
    "digits": {"binary, self-cond": [], "binary, no self-cond": NO_SELF_COND,
               "gray, self-cond": ["--model.init_args.code", "gray"]},
}


def fit_command(part: str, extra: list[str], save_dir: Path, iterations: int | None,
                train_seed: int | None = None) -> list[str]:
    cmd = ["python", "-m", "lit_fewstep", "fit", "--config", f"configs/analog_bits/{part}.yaml",
           "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false", *extra,
           "--trainer.logger.init_args.save_dir", str(save_dir)]
    if train_seed is not None:
        cmd[6:6] = ["--seed_everything", str(train_seed)]
    return cmd if iterations is None else cmd[:6] + ["--trainer.max_steps", str(iterations)] + cmd[6:]


def trained(part: str, name: str, extra: list[str], runs: Path, iterations: int | None,
            train_seed: int | None = None) -> tuple[Path, str, float]:
    save_dir = runs / (f"{part}_{name.replace(', ', '_').replace(' ', '_').replace('-', '')}"
                       + (f"_seed{train_seed}" if train_seed is not None else ""))
    cmd = fit_command(part, extra, save_dir, iterations, train_seed)
    found = sorted(save_dir.rglob("model.pt"))
    seconds = 0.0
    if not found:
        start = time.time()
        subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, check=True)
        seconds = time.time() - start
        found = sorted(save_dir.rglob("model.pt"))
    return found[-1], " ".join(cmd), seconds


def selected(args, part: str) -> list[tuple[str, list[str]]]:
    names = args.variants or list(VARIANTS[part])
    unknown = [n for n in names if n not in VARIANTS[part]]
    if unknown:
        raise SystemExit(f"--variants: no {unknown} for {part}; choose from {list(VARIANTS[part])}")
    return [(n, VARIANTS[part][n]) for n in names]


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def toy(args) -> tuple[list[dict], list[str]]:
    grid, path = CategoricalGrid(), VPCosinePath()
    rows, commands = [], []
    floor = median([token_total_variation(grid.cell_index(grid.sample(args.num, torch.Generator().manual_seed(s))[0]),
                                          grid.probs) for s in range(args.seeds)])
    rows.append({"model": "exact samples (floor)", "N": "-", "td": "-", "tv": floor})
    codec = BitCodec(grid.cells, float(grid.centres[0]), float(grid.centres[-1]))
    ij = torch.cartesian_prod(torch.arange(grid.cells), torch.arange(grid.cells))
    codewords = codec.encode(ij, torch.float64)

    def exact(x, t):
        return categorical_bits_x0(x, path.a(t), path.b(t), codewords, grid.probs.flatten())

    for n in STEPS:
        for td in TDS:
            tvs = []
            for s in range(args.seeds):
                noise = torch.randn(args.num, 6, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                x0 = analog_bits_sample(exact, noise, n, path, td=td, self_condition=False).extra["x0"]
                tvs.append(token_total_variation(codec.decode(x0), grid.probs))
            rows.append({"model": "exact denoiser (binary)", "N": n, "td": td, "tv": median(tvs)})
    for name, extra in selected(args, "toy"):
        model_path, cmd, seconds = trained("toy", name, extra, args.runs, args.iterations, args.train_seed)
        commands.append(f"{cmd}  # {seconds:.0f} s" if seconds else cmd)
        module = load_module(model_path).eval()
        for n in STEPS:
            for td in TDS:
                tvs = [token_total_variation(module.sample(args.num, n, generator=torch.Generator().manual_seed(s),
                                                           td=td).extras["tokens"], grid.probs)
                       for s in range(args.seeds)]
                rows.append({"model": name, "N": n, "td": td, "tv": median(tvs)})
    return rows, commands


def digits(args) -> tuple[list[dict], list[str]]:
    from lit_fewstep.data import DigitsDataModule
    from lit_fewstep.evaluation import Evaluator

    datamodule = DigitsDataModule(image_size=8, batch_size=128)
    evaluator = Evaluator(datamodule)
    reference, _ = datamodule.reference_samples(10**9, split="train")
    rows, commands = [], []
    for name, extra in selected(args, "digits"):
        model_path, cmd, seconds = trained("digits", name, extra, args.runs, args.iterations, args.train_seed)
        commands.append(f"{cmd}  # {seconds:.0f} s" if seconds else cmd)
        module = load_module(model_path).eval()
        # --zeros_fed: a self-conditioned network also sampled with zeros as its estimate at every step (the input
        # half of its training batches saw), which separates the network from the feedback loop
        feeds = [None, False] if args.zeros_fed and module.self_condition > 0 else [None]
        for n in args.steps:
            for td in args.tds:
                for feed in feeds:
                    scores, accs, exact = [], [], []
                    for s in range(args.seeds):
                        out = module.sample(args.num, n, generator=torch.Generator().manual_seed(s), td=td,
                                            self_condition=feed)
                        scores.append(evaluator.score(out.x))
                        bits = nearest_bit_accuracy(module.codec, out.x, reference)
                        accs.append(bits["bit_accuracy"])
                        exact.append(bits["exact_match"])
                    fids = [score["fid"] for score in scores]
                    rows.append({"model": name + (", zeros fed" if feed is False else ""), "N": n, "td": td,
                                 "fid": median(fids), "fid_all_seeds": fids,
                                 "precision": median([score["precision"] for score in scores]),
                                 "recall": median([score["recall"] for score in scores]),
                                 "nearest_bit_accuracy": median(accs), "exact_copies": median(exact)})
    return rows, commands


def table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("toy", "digits"), required=True)
    parser.add_argument("--iterations", type=int, default=None, help="training iterations (default: the config's)")
    parser.add_argument("--num", type=int, default=None, help="samples per score (toy 20000, digits 2000)")
    parser.add_argument("--seeds", type=int, default=None, help="sampling seeds per setting (toy 3, digits 2)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "benchmarks" / "analog_bits")
    parser.add_argument("--variants", nargs="+", default=None, help="a subset of the part's variants (by name)")
    parser.add_argument("--tds", type=float, nargs="+", default=list(TDS), help="digits: the td values scored")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="digits: the step counts N scored")
    parser.add_argument("--zeros_fed", action="store_true",
                        help="digits: also sample self-conditioned models with zeros as their estimate")
    parser.add_argument("--train_seed", type=int, default=None,
                        help="training seed (`--seed_everything`; default: the config's); the run folder gets _seed<N>")
    parser.add_argument("--tag", default=None, help="write analog_bits_<part>_<tag>.md/.json (keeps the main table)")
    args = parser.parse_args()
    args.num = args.num or (20000 if args.part == "toy" else 2000)
    args.seeds = args.seeds or (3 if args.part == "toy" else 2)
    torch.set_num_threads(1)
    start = time.time()
    rows, commands = toy(args) if args.part == "toy" else digits(args)
    minutes = (time.time() - start) / 60
    out = ROOT / "benchmarks" / "results" / (f"analog_bits_{args.part}" + (f"_{args.tag}" if args.tag else ""))
    keys = ["model", "N", "td", "tv"] if args.part == "toy" else ["model", "N", "td", "fid", "precision", "recall",
                                                                  "nearest_bit_accuracy", "exact_copies"]
    command = "OMP_NUM_THREADS=1 python benchmarks/analog_bits.py " + shlex.join(sys.argv[1:])
    text = [f"# Analog Bits, {args.part} (generated by benchmarks/analog_bits.py)", "",
            f"Command: `{command}`  ", f"Machine: {describe_machine()}; {minutes:.1f} min (training included).  ",
            f"Samples per score: {args.num}; sampling seeds 0..{args.seeds - 1} (median).  ", "Training:", "",
            *[f"    {c}" for c in commands], "", table(rows, keys), ""]
    out.with_suffix(".md").write_text("\n".join(text))
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "commands": commands, "machine": describe_machine(),
                                                    "command": command, "num": args.num, "seeds": args.seeds},
                                                   indent=1))
    print("\n".join(text))


if __name__ == "__main__":
    main()
