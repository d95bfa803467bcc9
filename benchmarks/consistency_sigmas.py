"""Multistep consistency sampling: which intermediate noise levels?

Song et al. (2023) choose the intermediate levels of multistep sampling per model, by a greedy search on FID; the
package's default is the first nfe points of the Karras grid with nfe + 1 points (`consistency_sigmas`). This script
scores a trained consistency model (CD, CT, iCT, sCD, sCT) with candidate sets of levels, with the leaderboard's
protocol (the data set's one evaluator, `--num` samples, medians over sampling seeds): every candidate on the
search seeds, then the default and the best candidate of each NFE on the report seeds, so that a choice is not
reported by the figures that made it.

    OMP_NUM_THREADS=1 python benchmarks/consistency_sigmas.py --ckpt runs/scd_digits/latest/model.pt --data digits \
        --candidates "8 2.52 0.6" "17.5 2.52 0.8" [--search_seeds 100 101] [--seeds 0 1 2] [--name scd_digits]

Writes benchmarks/results/consistency_sigmas_<name>.md and .json. The levels found are sampling options
(`python -m lit_fewstep sample|evaluate ... --sigmas L1 L2 L3`, `module.sample(n, nfe, sigmas=[...])`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.leaderboard import PRIMARY, evaluator_for, score_model  # noqa: E402
from benchmarks.run import exact_command, git_state, machine, write_atomically  # noqa: E402
from lit_fewstep.diffusion.solvers import consistency_sigmas  # noqa: E402
from lit_fewstep.utils.checkpoint import load_module  # noqa: E402


def levels(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected noise levels like '8 2.52 0.6', got {text!r}") from None


def score(module, evaluator, sigmas: list[float], seeds: list[int], num: int, primary: str) -> dict:
    nfe = len(sigmas) + 1
    row = score_model(module, evaluator, [nfe], seeds, num, {"sigmas": sigmas})[nfe]
    return {"sigmas": sigmas, "nfe": nfe, primary: row[primary], "per_seed": row[f"{primary}_per_seed"]}


def table(rows: list[dict], primary: str) -> list[str]:
    """Markdown rows: NFE, the levels (marked when they are the default), the median score and the per-seed ones."""
    lines = [f"| NFE | levels | {primary} | per seed |", "|---|---|---|---|"]
    for r in rows:
        levels_ = " ".join(f"{s:.4g}" for s in r["sigmas"]) + (" (default)" if r["default"] else "")
        lines.append(f"| {r['nfe']} | {levels_} | {r[primary]:.4g} | {', '.join(f'{v:.4g}' for v in r['per_seed'])} |")
    return lines


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a consistency model (.pt export or .ckpt)")
    parser.add_argument("--data", choices=sorted(PRIMARY), required=True, help="whose evaluator scores the samples")
    parser.add_argument("--candidates", type=levels, nargs="+", required=True,
                        help="sets of nfe - 1 decreasing intermediate EDM noise levels, one quoted string each")
    parser.add_argument("--search_seeds", type=int, nargs="+", default=[100, 101])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="report seeds (the leaderboard's)")
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--name", default=None, help="results file suffix (default: the checkpoint's run folder)")
    args = parser.parse_args(argv)

    module = load_module(args.ckpt).eval()
    evaluator = evaluator_for(args.data, 0)  # the leaderboard's evaluator (training seed 0)
    primary = PRIMARY[args.data]
    default = {nfe: consistency_sigmas(nfe, module.sigma_min, module.sigma_max)[1:].tolist()
               for nfe in sorted({len(c) + 1 for c in args.candidates})}
    search = [score(module, evaluator, s, args.search_seeds, args.num, primary)
              for s in [*default.values(), *args.candidates]]
    for row in search:
        row["default"] = row["sigmas"] == default[row["nfe"]]
        print(row, flush=True)
    report = []
    for nfe in default:
        rows = [r for r in search if r["nfe"] == nfe]
        best = min(rows, key=lambda r: r[primary])
        for row in [r for r in rows if r["default"]] + ([] if best["default"] else [best]):
            report.append({**score(module, evaluator, row["sigmas"], args.seeds, args.num, primary),
                           "default": row["default"]})
            print(report[-1], flush=True)

    name = args.name or Path(args.ckpt).resolve().parent.parent.name
    out = ROOT / "benchmarks" / "results" / f"consistency_sigmas_{name}.md"
    lines = [f"# Intermediate noise levels of multistep consistency sampling: {name}", "",
             f"`{exact_command()}`; machine: {machine()}; git {git_state()}; "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Checkpoint `{args.ckpt}`. "
             f"{primary} of {args.num} samples, medians over the seeds (`benchmarks.leaderboard.score_model`, the "
             f"data set's evaluator).", "",
             f"## Search (seeds {args.search_seeds})", "", *table(search, primary),
             "", f"## Default and the search's best, on the report seeds {args.seeds}", "", *table(report, primary)]
    write_atomically(out, "\n".join(lines) + "\n")
    write_atomically(out.with_suffix(".json"), json.dumps({"command": exact_command(), "search": search,
                                                           "report": report}, indent=1))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
