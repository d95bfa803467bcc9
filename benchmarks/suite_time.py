"""The leaderboard suite's wall time with two jobs: measured where a data set's table was last run end to end, and
estimated from there when rows were re-run since with other budgets or code.

    python benchmarks/suite_time.py        # writes benchmarks/results/suite_time.md and .json

For each data set, the base is the recorded table's last end-to-end run (`benchmarks/leaderboard.py --data D
--jobs 2`, no `--only`): its wall time W, and every row's fit time as that run recorded it, read from the first
commit of `benchmarks/results/leaderboard.json` that holds the run (git history; the working tree's file if the run
is not committed yet). Rows re-run since (`--only`) changed their fit time from t_base to t_now; with two jobs at
once the suite's time moves by about half of that, so

    estimate(D) = W + sum over rows of (t_now - t_base) / 2.

Both times are one-thread fits, most of them measured beside another job, as the suite runs them. Only fit times
move the estimate (scoring and teacher rows are as in the base run). A data set whose table has had no update since
its end-to-end run is measured, not estimated.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.run import exact_command, git_state, write_atomically  # noqa: E402

TABLE = "benchmarks/results/leaderboard.json"
TARGET_S = 3 * 3600


def fit_times(table: dict) -> dict[str, float]:
    return {m["name"]: float(m.get("train_wall_s") or 0.0) for m in table["methods"]}


def base_of(data: str, now: dict) -> tuple[dict[str, float], str]:
    """Row fit times of `data` as its last end-to-end run recorded them, and where they were read."""
    run = now["runs"][data]
    if run.get("collected"):
        raise SystemExit(f"{data}: the recorded run is a `--collect` report, whose wall time is not the suite's; run "
                         f"`benchmarks/leaderboard.py --data {data} --jobs 2` end to end first.")
    if not run.get("updates"):
        return fit_times(now["tables"][data]), "this file (no update since the run)"
    commits = subprocess.run(["git", "log", "--reverse", "--format=%H", "--", TABLE], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
    for commit in commits:
        shown = subprocess.run(["git", "show", f"{commit}:{TABLE}"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode != 0:
            continue
        then = json.loads(shown.stdout)
        then_run = then.get("runs", {}).get(data, {})
        if then_run.get("started") == run["started"] and not then_run.get("updates"):
            return fit_times(then["tables"][data]), f"git {commit[:7]}"
    raise SystemExit(f"{data}: the end-to-end run of {run['started']} is in no committed {TABLE}; commit it first.")


def main() -> None:
    now = json.loads((ROOT / TABLE).read_text())
    lines = [
        "# The leaderboard suite's wall time with two jobs", "",
        f"`{exact_command()}`; git {git_state()}; "
        f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. "
        "Method: `benchmarks/suite_time.py`'s docstring (measured end-to-end runs, moved by half of each re-run "
        "row's change in fit time).", "",
    ]
    report, total = {}, 0.0
    for data, run in now["runs"].items():
        base, source = base_of(data, now)
        current = fit_times(now["tables"][data])
        changed = {name: (base.get(name, 0.0), t) for name, t in current.items() if abs(t - base.get(name, 0.0)) > 0.5}
        delta = sum(t - b for b, t in changed.values())
        estimate = run["wall_s"] + delta / 2
        total += estimate
        report[data] = {"base_run": {k: run[k] for k in ("command", "machine", "git", "started", "wall_s")},
                        "base_fit_times_from": source, "changed_rows": changed, "estimate_s": estimate}
        lines += [f"## {data}", "",
                  f"End-to-end run: `{run['command']}`, started {run['started']}, {run['wall_s']:,.0f} s "
                  f"({run['machine']}; git {run['git']}); its fit times from {source}.", ""]
        if changed:
            lines += ["| row | fit s then | fit s now | change |", "|---|---|---|---|"]
            lines += [f"| {name} | {b:,.0f} | {t:,.0f} | {t - b:+,.0f} |" for name, (b, t) in changed.items()]
            lines += ["", f"Estimate: {run['wall_s']:,.0f} + {delta:,.0f} / 2 = **{estimate:,.0f} s**.", ""]
        else:
            lines += [f"No row re-run since: **{estimate:,.0f} s**, measured.", ""]
    verdict = "under" if total <= TARGET_S else "over"
    lines += ["## Both data sets", "",
              f"**{total:,.0f} s ({int(total // 3600)} h {int(total % 3600 // 60):02d} min)**, {verdict} the 3-hour "
              "target (an estimate wherever a table has updates since its end-to-end run).", ""]
    report["total_s"] = total
    write_atomically(ROOT / "benchmarks/results/suite_time.md", "\n".join(lines))
    write_atomically(ROOT / "benchmarks/results/suite_time.json", json.dumps(report, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
