"""Variants of one method's config, trained and scored with the leaderboard's protocol: an ablation table.

Each variant is the config with some `fit` overrides (none for the config as shipped); every variant is trained
once (training seed 0 unless its overrides say `--seed_everything S`) and scored at the given NFEs by the data
set's one evaluator, medians over the sampling seeds, exactly as `benchmarks/leaderboard.py` scores its rows, so
the figures are comparable with the leaderboard's.

    OMP_NUM_THREADS=1 python benchmarks/variants.py --method cd --data tree --name cd_tree_target_mu --jobs 2 \
        --variant shipped "" --variant mu0.99 "--model.init_args.target_mu 0.99" [--nfe 1 2 4] [--extra nll]

Writes benchmarks/results/<name>.md and .json (command, machine, git commit, seeds, per-variant fit command and
wall time). A variant already scored under the same overrides and protocol is reused from
benchmarks/runs/variants/<name>/ (delete it to re-run); `--jobs 2` trains two variants side by side.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.leaderboard import (PRIMARY, SAMPLING, STAGED, _fmt, config_file, config_path,  # noqa: E402
                                    ensure_pairs, evaluator_for, run_in_workers, score_model)
from benchmarks.run import exact_command, git_state, load, machine, train, write_atomically  # noqa: E402

CACHE = ROOT / "benchmarks" / "runs" / "variants"

# one evaluator per data set and process (its reference features are the costly part), as the leaderboard does
evaluator = functools.lru_cache(maxsize=None)(evaluator_for)


def variant_key(method: str, data: str, overrides: str, protocol: dict) -> str:
    text = json.dumps([method, data, shlex.split(overrides), protocol], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_variant(args, tag: str, overrides: str) -> dict:
    """Train one variant and score it (or read the cached result)."""
    protocol = {"nfe": args.nfe, "seeds": args.seeds, "num": args.num}
    cached = CACHE / args.name / f"{tag}-{variant_key(args.method, args.data, overrides, protocol)}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    config = config_path(args.method, args.data)
    if config is None:
        raise SystemExit(f"--method / --data: no {config_file(args.method, args.data).relative_to(ROOT)}")
    # the leaderboard's teacher pairs (DMD's regression, CAF's couplings) before the variant's own overrides
    entry = {"config": str(config.relative_to(ROOT)),
             "fit_args": ensure_pairs(args.method, args.data) + shlex.split(overrides)}
    model, seconds, command = train(entry, f"variants/{args.name}/{tag}", 0)
    rows = score_model(load(model), evaluator(args.data, 0), args.nfe, args.seeds, args.num,
                       SAMPLING.get(args.method, {}))
    result = {"variant": tag, "overrides": overrides, "fit_command": command, "train_wall_s": seconds,
              "rows": {str(nfe): row for nfe, row in rows.items()}}
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(cached, json.dumps(result, indent=1))
    return result


def markdown(args, results: list[dict], started: str) -> list[str]:
    primary = PRIMARY[args.data]
    head = [f"{primary} @{n}" for n in args.nfe] + [f"{m} @{args.nfe[0]}" for m in args.extra]
    lines = [f"# {args.method} on {args.data}: config variants", "",
             f"`{exact_command()}`; machine: {machine()}; git {git_state()}; started {started} UTC.",
             f"Config `{config_file(args.method, args.data).relative_to(ROOT)}` with each variant's overrides "
             f"(and the leaderboard's teacher pairs where the method reads them), training seed 0 unless "
             f"the overrides say otherwise; scores: medians over sampling seeds {args.seeds}, {args.num} samples each, "
             "the data set's one evaluator (`benchmarks.leaderboard.score_model`, as the leaderboard scores)."
             + (f" {args.note}" if args.note else ""), "",
             "| variant | overrides | " + " | ".join(head) + " | train s |", "|---" * (len(head) + 3) + "|"]
    for r in results:
        values = [r["rows"].get(str(n), {}).get(primary) for n in args.nfe]
        values += [r["rows"].get(str(args.nfe[0]), {}).get(m) for m in args.extra]
        lines.append(f"| {r['variant']} | `{r['overrides'] or '(as shipped)'}` | " + " | ".join(map(_fmt, values))
                     + f" | {r['train_wall_s']:.0f} |")
    lines += ["", "Fit commands:", "```", *[r["fit_command"] for r in results], "```"]
    return lines


def main(argv=None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True)
    parser.add_argument("--data", choices=sorted(PRIMARY), required=True)
    parser.add_argument("--name", required=True, help="results file name (benchmarks/results/<name>.md)")
    parser.add_argument("--variant", nargs=2, action="append", metavar=("TAG", "OVERRIDES"), required=True,
                        help="a name and the fit overrides, quoted as one string ('' for the config as shipped)")
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds (medians)")
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--extra", nargs="*", default=[], help="more metrics shown at the first NFE (e.g. nll)")
    parser.add_argument("--jobs", type=int, default=1, help="variants trained side by side")
    parser.add_argument("--note", default="", help="a sentence for the table's header (e.g. where a row lives)")
    parser.add_argument("--out_dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--only_variant", default=None, help=argparse.SUPPRESS)  # a worker of --jobs
    args = parser.parse_args(argv)
    variants = dict(args.variant)
    if len(variants) != len(args.variant):
        parser.error("--variant: every TAG must be different")
    if args.method in STAGED:
        parser.error(f"--method {args.method}: a staged method leaves one student per stage, which the leaderboard "
                     "scores stage by stage; compare its variants with the leaderboard's --only instead")

    if args.only_variant is not None:
        run_variant(args, args.only_variant, variants[args.only_variant])
        return None
    started = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"
    if args.jobs > 1:
        argv_ = sys.argv[1:] if argv is None else list(argv)
        run_in_workers(list(variants), args.jobs, CACHE / args.name / "logs",
                       lambda tag: [sys.executable, __file__, *argv_, "--only_variant", tag])
    results = []
    for tag, overrides in variants.items():  # cached by the workers; a failed one is retried here and raises
        results.append(run_variant(args, tag, overrides))
        print(json.dumps({k: results[-1][k] for k in ("variant", "train_wall_s")}), flush=True)
    out = args.out_dir / f"{args.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, "\n".join(markdown(args, results, started)) + "\n")
    write_atomically(out.with_suffix(".json"), json.dumps({"command": exact_command(), "machine": machine(),
                                                           "git": git_state(), "seeds": args.seeds,
                                                           "num": args.num, "variants": results}, indent=1))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
