"""Entry point of `python -m lit_fewstep` and the `lit_fewstep` console script.

The command list (`--help`, `-h`, or no command) is printed from here without importing torch or Lightning (which
takes seconds); every command goes to `lit_fewstep.cli.console`. `tests/test_first_hour_runs.py` checks that
`COMMANDS` lists exactly the CLI's subcommands.
"""

import sys

# One line per subcommand of lit_fewstep.cli.FewStepCLI (Lightning's fit/validate/test, then cli.TOOLS).
COMMANDS = {
    "fit": "train a method: fit --config configs/<method>/<data>.yaml (into runs/<name>/version_N; latest/ = newest)",
    "validate": "validation metrics of a model or checkpoint: validate --config CONFIG [--ckpt_path FILE]",
    "test": "test metrics of a model or checkpoint: test --config CONFIG [--ckpt_path FILE]",
    "sample": "draw samples from a checkpoint: sample --ckpt PATH --nfe K --num N --seed S --out FILE.npz|FILE.png",
    "evaluate": "metrics of a checkpoint at several NFE: evaluate --ckpt PATH --nfe 1 2 4 --num N",
    "pairs": "a teacher's ODE pairs for DMD's regression loss: pairs --teacher PATH --num N --nfe 35 --out FILE.pt",
    "convert": "a diffusers teacher as one .safetensors file: convert --from diffusers SRC --out teacher.safetensors",
    "benchmark": "the leaderboard, every method at equal NFE (from a checkout): benchmark --data tree digits",
}

HELP = "\n".join([
    f"usage: python -m lit_fewstep [-h] [--debug] {{{','.join(COMMANDS)}}} ...",
    "",
    "Few-step diffusion methods on PyTorch Lightning: train with fit, then sample and evaluate the exported model.",
    "",
    "commands (add --help after one for its options; fit --model.help CLASS for a method's own arguments):",
    *(f"  {name:<10}{text}" for name, text in COMMANDS.items()),
    "",
    "options:",
    "  -h, --help  show this message and exit",
    "  --debug     show the traceback of an error (also LIT_FEWSTEP_DEBUG=1)",
])


def console(args: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if args is None else args)
    rest = [a for a in argv if a != "--debug"]
    if rest in (["-h"], ["--help"]):
        print(HELP)
        return 0
    if not rest:
        print(HELP.splitlines()[0], file=sys.stderr)
        print("error: choose a command (python -m lit_fewstep --help lists them)", file=sys.stderr)
        return 2
    from lit_fewstep.cli import console as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(console())
