"""CAF against 2-rectified flow on the same teacher couplings, tree toy (the paper's toy claims, docs/caf.md).

    OMP_NUM_THREADS=1 python benchmarks/caf.py --iterations 3000 --seed 0

Couplings: the shipped flow-matching teacher `lit_fewstep/assets/fm_tree.pt`, its own ODE from x_0 = z (63-NFE Heun,
`make_pairs(path="linear")`), 20,000 training pairs and 2,000 held-out pairs (noise never seen in training).
Runs (one seed, same networks, batch 256, lr 1e-3, EMA 0.999, all from the same pairs):
  2rf         velocity stage alone with h = 1 (2-rectified flow), 2 x iterations;
  caf         h = 1.5, velocity stage `iterations`, then acceleration stage `iterations` with IVC;
  caf_no_ivc  the same without initial-velocity conditioning (acceleration net sees x_tau, tau only).
Metrics on the held-out pairs, EMA weights, N = 1, 2, 4 steps (CAF spends N + 1 evaluations, 2-RF N):
  coupling error  mean ||x̂_1(z) - x_1(z)||^2 (x_1: the teacher's sample from the same z and label);
  sw2             sliced W2 between the 2,000 generated points and the 2,000 teacher points (same labels);
  inversion       mean ||generate(invert(x_1)) - x_1||^2 and mean ||invert(x_1) - z||^2 at the same N.
Writes benchmarks/results/caf.md and caf.json.

    OMP_NUM_THREADS=1 python benchmarks/caf.py --couplings crossing --iterations 1500 --seed 0
    OMP_NUM_THREADS=1 python benchmarks/caf.py [--couplings crossing] --render   # the .md from the saved .json

replaces the teacher by a synthetic deterministic coupling whose straight lines cross (the paper's flow-crossing
illustration): x_0 ~ N(0, I), x_1 = (0.5 x_0[0], 0.3 x_0[1] - 2 sign(x_0[1])) sends the upper half-plane down and the
lower half up. Unconditional networks. Writes benchmarks/results/caf_crossing.md / .json.

    OMP_NUM_THREADS=1 python benchmarks/caf.py --couplings digits --jobs 2

class-conditional 8x8 digits on the couplings of the shipped flow-matching teacher `lit_fewstep/assets/fm_digits.pt`
(35-NFE Heun, the configs' recipe). Each run is `python -m lit_fewstep fit` on its config — 2rf:
configs/caf/digits_2rf.yaml, caf: configs/caf/digits.yaml, caf_no_ivc: the same with `ivc: false` — with the
configs' budgets unless --iterations is given; --jobs fits run at once. FID (the leaderboard's digits evaluator) of
the held-out samples takes sliced W2's place. Writes benchmarks/results/caf_digits.md / .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_fewstep.cli import FewStepTrainer  # noqa: E402
from lit_fewstep.data import Toy2DDataModule  # noqa: E402
from lit_fewstep.data.pairs import make_pairs, save_pairs  # noqa: E402
from lit_fewstep.methods import CAF  # noqa: E402
from lit_fewstep.methods.base import load_teacher  # noqa: E402
from lit_fewstep.metrics import SlicedWasserstein2  # noqa: E402
from lit_fewstep.nets import MLP  # noqa: E402
from lit_fewstep.utils.machine import describe_machine  # noqa: E402

TEACHER = "lit_fewstep/assets/fm_tree.pt"
DIGITS_TEACHER = "lit_fewstep/assets/fm_digits.pt"
# run -> (config, extra fit arguments) on digits
DIGITS_RUNS = {"2rf": ("configs/caf/digits_2rf.yaml", []),
               "caf": ("configs/caf/digits.yaml", []),
               "caf_no_ivc": ("configs/caf/digits.yaml", ["--model.init_args.ivc", "false",
                                                          "--model.init_args.acceleration_net.init_args.extra_channels",
                                                          "0"]),
               "caf_h1": ("configs/caf/digits.yaml", ["--model.init_args.h", "1.0"]),
               "caf_h2": ("configs/caf/digits.yaml", ["--model.init_args.h", "2.0"])}
OUT = ROOT / "benchmarks" / "results" / "caf.md"
STEPS = (1, 2, 4)
LABELS = {"2rf": "2-rectified flow", "caf": "CAF (h = 1.5, IVC)", "caf_no_ivc": "CAF without IVC (h = 1.5)",
          "caf_h1": "CAF (h = 1, IVC)", "caf_h2": "CAF (h = 2, IVC)"}


def build(name: str, pairs_path: str, iterations: int, num_classes: int) -> CAF:
    def mlp(extra: int = 0) -> MLP:
        return MLP(dim=2, hidden=256, depth=3, emb_dim=64, num_classes=num_classes, extra_channels=extra)

    common = dict(pairs_path=pairs_path, batch_size=256, lr=1e-3, ema_decay=0.999)
    if name == "2rf":
        return CAF(mlp(), None, h=1.0, **common)
    h = {"caf_h1": 1.0, "caf_h2": 2.0}.get(name, 1.5)
    ivc = name != "caf_no_ivc"
    return CAF(mlp(), mlp(2 if ivc else 0), h=h, ivc=ivc, velocity_iterations=iterations,
               acceleration_iterations=iterations, **common)


def crossing_pairs(num: int, seed: int) -> dict:
    """x_1 = (0.5 x_0[0], 0.3 x_0[1] - 2 sign(x_0[1])): straight lines from the two half-planes cross."""
    z = torch.randn(num, 2, generator=torch.Generator().manual_seed(seed))
    x = torch.stack([0.5 * z[:, 0], 0.3 * z[:, 1] - 2.0 * torch.sign(z[:, 1])], dim=1)
    return {"noise": z, "x": x, "sigma_max": float("inf"), "path": "synthetic", "nfe": 0, "guidance_scale": 1.0}


def train(name: str, pairs_path: str, iterations: int, seed: int, root: Path, num_classes: int) -> tuple[CAF, float]:
    L.seed_everything(seed, verbose=False)
    module = build(name, pairs_path, iterations, num_classes)
    trainer = FewStepTrainer(accelerator="cpu", devices=1, max_steps=2 * iterations, max_epochs=-1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, default_root_dir=str(root / name))
    start = time.perf_counter()
    # the data only sets the batch count (CAF draws its pairs itself); its labels are ignored by unconditional nets
    data = Toy2DDataModule(name="tree" if num_classes else "moons", batch_size=256, num_train=2560, num_val=256)
    trainer.fit(module, data)
    return module, time.perf_counter() - start


def train_digits(name: str, pairs_path: Path, iterations: int | None, seed: int) -> tuple[CAF, float, str]:
    """`python -m lit_fewstep fit` on the run's digits config (the configs' budgets unless `iterations` per stage)."""
    from benchmarks.run import load, train

    config, extra = DIGITS_RUNS[name]
    fit_args = ["--model.init_args.pairs_path", str(pairs_path), *extra]
    if iterations:
        fit_args += ["--trainer.max_steps", str(2 * iterations)]
        if name != "2rf":
            fit_args += ["--model.init_args.velocity_iterations", str(iterations),
                         "--model.init_args.acceleration_iterations", str(iterations)]
    model, seconds, command = train({"config": config, "fit_args": fit_args}, f"caf_bench_digits/{name}", seed)
    return load(model), seconds, command


def sw2(a: torch.Tensor, b: torch.Tensor) -> float:
    metric = SlicedWasserstein2(num_projections=500, seed=0)
    metric.update(fake=a.double(), real=b.double())
    return float(metric.compute())


def squared_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean over samples of ||a - b||^2 (summed over every coordinate / pixel)."""
    return float((a - b).flatten(1).pow(2).sum(1).mean())


@torch.no_grad()
def score(module: CAF, z: torch.Tensor, x1: torch.Tensor, y: torch.Tensor, evaluator=None) -> list[dict]:
    """Per N: coupling and inversion errors; sliced W2 to x_1 on the toys, FID with `evaluator` on images."""
    module.eval()
    net = module.sampling_network(True)
    rows = []
    nfes = [(n, n) for n in STEPS] if module.is_rectified_flow else [(0, 1)] + [(n, n + 1) for n in STEPS]
    for steps, nfe in nfes:
        x_hat, spent = module.generate(net, z, nfe, y)

        z_inv, _ = module.invert(x1, nfe, y)
        recon, _ = module.generate(net, z_inv, nfe, y)
        quality = {"fid": evaluator.score(x_hat)["fid"]} if evaluator else {"sw2": sw2(x_hat, x1)}
        rows.append({"steps": steps, "nfe": spent, "coupling_error": squared_error(x_hat, x1), **quality,
                     "inversion_recon_error": squared_error(recon, x1),
                     "inversion_noise_error": squared_error(z_inv, z)})
    return rows


def render(result: dict) -> str:
    runs, couplings = result["runs"], result.get("couplings", "teacher")
    quality = "fid" if couplings == "digits" else "sw2"
    iters = result["iterations"]
    budget = (f"CAF {iters} velocity + {iters} acceleration iterations, 2-RF {2 * iters} velocity iterations"
              if iters else "each config's budget")
    if couplings == "crossing":
        title = "# CAF against 2-rectified flow on a crossing coupling (synthetic, 2-D)"
        source = ("of the synthetic coupling x_1 = (0.5 x_0[0], 0.3 x_0[1] - 2 sign(x_0[1])), x_0 ~ N(0, I), whose "
                  "straight lines cross; unconditional networks")
    else:
        teacher, data = (DIGITS_TEACHER, "class-conditional 8x8 digits") if couplings == "digits" else (TEACHER, "tree toy")
        title = f"# CAF against 2-rectified flow on the same couplings ({data})"
        source = (f"of `{teacher}`, its own ODE from x_0 = z, {result['pair_nfe']}-NFE Heun, made in "
                  f"{result['pairs_seconds']:.0f} s")
    if couplings == "digits":
        setup = ("Every run is `python -m lit_fewstep fit` on its config (commands below): the configs' UNets (32 "
                 "channels), batch 128, AdamW, EMA 0.998, official pseudo-Huber, output clamped to [-1, 1]; "
                 f"{budget} (by default the same number of network updates: until 2026-12-05 CAF 1,500 + 1,500 "
                 "against 2-RF 3,000 at lr 5e-4, since then CAF 2,250 + 750 and 2-RF 3,000 at lr 1e-3).")
        measure = ("fid = FID (the leaderboard's digits evaluator, digit-classifier features) of the samples from the "
                   f"held-out noises; the teacher's own samples x_1 of those noises score {result['teacher_floor']:.3f}")
    else:
        setup = ("Every run: MLP 3 x 256 per network, batch 256, AdamW lr 1e-3, EMA 0.999, official pseudo-Huber; "
                 f"{budget} (the same number of network updates).")
        measure = ("sw2 = sliced W2 to the held-out x_1 (two independent sample sets of x_1 of this size differ by "
                   f"{result['teacher_sw2_floor']:.4f})")
    lines = [
        title,
        "",
        f"Command: `{result['command']}` (seed {result['seed']}; {result['num_pairs']} training pairs and "
        f"{result['num_eval']} held-out pairs {source}).",
        "",
        f"Machine: {result['machine']}",
        "",
        setup + " Scored with the EMA weights on the held-out pairs. 'steps' N: CAF spends N + 1 evaluations (v_0 "
        "once), 2-RF N; CAF's N = 0 row is its velocity net alone (x_0 + v(x_0, 0) / h, 1 evaluation).",
        "",
        f"coupling error = mean ||x̂_1(z) - x_1(z)||^2; {measure}; inversion = mean ||generate(invert(x_1)) - x_1||^2 "
        "and mean ||invert(x_1) - z||^2 at the same N. The held-out x_1 have mean ||x_1||^2 = "
        f"{result['x1_power']:.3f} (a scale for the errors).",
        "",
        f"| model | steps N | NFE | coupling error | {quality} | inversion: x_1 error | inversion: z error | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        for row in run["rows"]:
            lines.append(f"| {LABELS[name]} | {row['steps']} | {row['nfe']} | {row['coupling_error']:.3g} | "
                         f"{row[quality]:.3g} | {row['inversion_recon_error']:.3g} | {row['inversion_noise_error']:.3g} | "
                         f"{run['seconds']:.0f} |")
    fits = [run["command"] for run in runs.values() if "command" in run]
    if fits:
        lines += ["", "Fits:", "", "```", *fits, "```"]
    lines += ["", "## Ratios measured in this run", ""]

    def at(name, steps, key):
        return next(r[key] for r in runs[name]["rows"] if r["steps"] == steps)

    if "2rf" in runs and "caf" in runs:
        for steps in STEPS:
            lines.append(f"- N = {steps}: coupling error 2-RF / CAF = {at('2rf', steps, 'coupling_error') / at('caf', steps, 'coupling_error'):.2g}x; "
                         f"{quality} 2-RF {at('2rf', steps, quality):.3g} vs CAF {at('caf', steps, quality):.3g}; "
                         "inversion x_1 error "
                         f"2-RF / CAF = {at('2rf', steps, 'inversion_recon_error') / at('caf', steps, 'inversion_recon_error'):.2g}x")
    if "caf_no_ivc" in runs and "caf" in runs and "2rf" in runs:
        for steps in STEPS:
            rf, caf, no = (at(n, steps, "coupling_error") for n in ("2rf", "caf", "caf_no_ivc"))
            if caf < rf:
                lines.append(f"- N = {steps} without IVC: coupling error {no:.3g} (CAF {caf:.3g}, 2-RF {rf:.3g}): it keeps "
                             f"{100 * (rf - no) / (rf - caf):.0f}% of CAF's reduction over 2-RF.")
            else:
                lines.append(f"- N = {steps} without IVC: coupling error {no:.3g} (CAF {caf:.3g}, 2-RF {rf:.3g}): CAF does "
                             "not improve on 2-RF here, so there is no gain over 2-RF for IVC to keep; without / with "
                             f"IVC = {no / caf:.2g}x.")
    lines += ["", "Verdicts are in docs/caf.md (Results)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=None,
                        help="iterations per CAF stage (2-RF: twice); default 3000 on the toys, the configs' on digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_pairs", type=int, default=20000)
    parser.add_argument("--num_eval", type=int, default=2000)
    parser.add_argument("--pair_nfe", type=int, default=None, help="teacher ODE evaluations (63 tree, 35 digits)")
    parser.add_argument("--runs", nargs="+", default=["2rf", "caf", "caf_no_ivc"], choices=sorted(LABELS))
    parser.add_argument("--couplings", choices=("teacher", "crossing", "digits"), default="teacher")
    parser.add_argument("--jobs", type=int, default=1, help="digits: fits run at once")
    parser.add_argument("--root", default=None, help="run folder (default runs/caf_bench[_crossing|_digits])")
    parser.add_argument("--tag", default=None, help="write caf[_<couplings>]_<tag>.md / .json")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the saved .json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    crossing, digits = args.couplings == "crossing", args.couplings == "digits"
    out = OUT.with_name(f"caf_{args.couplings}.md") if args.couplings != "teacher" else OUT
    out = out.with_name(f"{out.stem}_{args.tag}.md") if args.tag else out
    if args.render:
        out.write_text(render(json.loads(out.with_suffix(".json").read_text())))
        return
    suffix = "" if args.couplings == "teacher" else f"_{args.couplings}"
    root = ROOT / (args.root or f"runs/caf_bench{suffix}{'_' + args.tag if args.tag else ''}")
    root.mkdir(parents=True, exist_ok=True)
    iterations = args.iterations or (None if digits else 3000)
    start = time.perf_counter()
    if crossing:
        pairs = crossing_pairs(args.num_pairs + args.num_eval, args.seed)
    else:
        teacher = DIGITS_TEACHER if digits else TEACHER
        pairs = make_pairs(load_teacher(teacher), args.num_pairs + args.num_eval, seed=args.seed, path="linear",
                           nfe=args.pair_nfe or (35 if digits else 63))
    pairs_seconds = time.perf_counter() - start
    n = args.num_pairs
    train_pairs = {k: (v[:n] if k in ("noise", "x", "labels") else v) for k, v in pairs.items()}
    pairs_path = root / "pairs.pt"
    save_pairs(train_pairs, pairs_path, "synthetic crossing coupling" if crossing else teacher)
    z, x1 = pairs["noise"][n:], pairs["x"][n:]
    y = None if crossing else pairs["labels"][n:]
    result = {"command": "OMP_NUM_THREADS=1 python benchmarks/caf.py " + " ".join(sys.argv[1:]),
              "couplings": args.couplings, "seed": args.seed, "iterations": iterations, "num_pairs": n,
              "num_eval": args.num_eval, "pair_nfe": pairs["nfe"], "pairs_seconds": pairs_seconds,
              "x1_power": float(x1.flatten(1).pow(2).sum(1).mean()),
              "machine": describe_machine("2 CPU cores shared with 3-4 other engineers' jobs"), "runs": {}}
    evaluator = None
    if digits:
        from benchmarks.leaderboard import evaluator_for

        evaluator = evaluator_for("digits", args.seed)
        result["teacher_floor"] = evaluator.score(x1)["fid"]
    else:
        result["teacher_sw2_floor"] = sw2(pairs["x"][:args.num_eval], x1)

    def fit(name: str):
        if digits:
            return train_digits(name, pairs_path.relative_to(ROOT) if pairs_path.is_relative_to(ROOT) else pairs_path,
                                iterations, args.seed)
        return (*train(name, str(pairs_path), iterations, args.seed, root, 0 if crossing else 2), None)

    # digits fits are subprocesses, so --jobs of them can run at once; the toys train here, one after another
    pool = ThreadPoolExecutor(max_workers=args.jobs) if digits else None
    fitted = {name: pool.submit(fit, name) for name in args.runs} if pool else {}
    for name in args.runs:
        module, seconds, command = fitted[name].result() if pool else fit(name)
        result["runs"][name] = {"seconds": seconds, "rows": score(module, z, x1, y, evaluator),
                                **({"command": command} if command else {})}
        print(name, f"{seconds:.0f} s", result["runs"][name]["rows"], flush=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        out.write_text(render(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
