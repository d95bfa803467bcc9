"""Timing of any FewStepModule: sampling images/s per NFE, and training-step time against its network passes.

    OMP_NUM_THREADS=1 python benchmarks/timing.py --ckpt lit_fewstep/assets/edm_digits.pt --nfe 1 2 4 8 35
    OMP_NUM_THREADS=1 python benchmarks/timing.py --config configs/scd/tree.yaml --nfe 1 2   # any method

**Sampling**: `module.sample(batch, nfe)` timed `repeats` times after one warm-up call; images/s = batch / median.

**Training step vs. its network passes (the floor).** A short Lightning fit runs `warmup` + `steps` training
batches. During the measured batches, a forward hook on each network of the module (its direct child modules with
parameters: generator, teacher, fake score, discriminator, ...) records every call: the inputs, grad mode,
train/eval mode, which parameters required grad, and whether the output required grad. After the fit, each
recorded call is replayed alone, `repeats` times (median):
- the output required grad (a trained network, or a frozen one that gradients flow through): forward + backward,
  with grads w.r.t. the parameters and inputs that required grad in the step;
- otherwise (frozen, no_grad): forward only;
- called inside a forward-mode transform (`torch.func.jvp`, sCM / flow maps): replayed as a `torch.func.jvp` of
  the same inputs with random tangents, under no_grad.
floor(step) = sum of its calls' medians; ratio(step) = step time / floor(step). Report: median step time, median
floor, median ratio. A ratio near 1 means the step is all network work. The excess is loss math, optimizer steps,
EMA updates, gradient clipping, and Lightning's per-step bookkeeping. Data loading is excluded: the clock starts in
`on_train_batch_start`, after the batch arrived.

**In place.** The same measured steps also clock, inside the step, the time spent in the networks' outermost
forwards and in every autograd backward (`Tensor.backward`, `torch.autograd.backward`, `torch.autograd.grad`):
ratio_in_place = sum of step times / sum of those times. It needs no replay, so a change of the CPU's load between
the step and the replay cancels, and a second backward through one forward (two vector-Jacobian products of a
frozen network for two loss weights) is counted, where the replay counts one backward per forward. It is generous
to the step in one way: the backward of the loss math (not network work) is inside the autograd calls.

Use from another benchmark:
    from benchmarks.timing import sampling_throughput, training_step_ratio
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.utils._pytree import tree_flatten, tree_map

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lit_fewstep.methods.base import float32_jvp  # noqa: E402

__all__ = ["sampling_throughput", "training_step_ratio", "format_timing"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, repeats: int, device: torch.device, prepare=None) -> float:
    times = []
    for _ in range(repeats):
        if prepare is not None:
            prepare()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sampling_throughput(module, nfe_list, batch: int = 1000, repeats: int = 5, seed: int = 0, use_ema: bool = True,
                        **options) -> list[dict]:
    """Rows {nfe, nfe_spent, batch, seconds (median), images_per_s} for each NFE."""
    device = module.device
    rows = []
    for nfe in nfe_list:
        def run():
            return module.sample(batch, nfe, generator=torch.Generator().manual_seed(seed), use_ema=use_ema, **options)

        spent = run().nfe  # warm-up (allocations, lazy init) and the honest NFE count
        seconds = _median_seconds(run, repeats, device)
        rows.append({"nfe": nfe, "nfe_spent": spent, "batch": batch, "seconds": seconds, "images_per_s": batch / seconds})
    return rows


# --------------------------------------------------------------------------------------------------- training
def _plain(t):
    """(primal tensor detached, whether it was inside a forward-mode transform)."""
    transformed = False
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t, transformed = torch._C._functorch.get_unwrapped(t), True
    primal, tangent = forward_ad.unpack_dual(t)
    return primal.detach(), transformed or tangent is not None


@dataclass
class _Call:
    network: str
    module: nn.Module
    args: tuple
    kwargs: dict
    input_grad: list[bool]  # per tensor input (flattened order): required grad in the step
    param_grad: list[bool]
    training: bool
    grad_enabled: bool
    output_grad: bool
    jvp: bool


@dataclass
class _Step:
    seconds: float = 0.0
    calls: list[_Call] = field(default_factory=list)
    inside_s: float = 0.0  # in the networks' outermost forwards and in autograd backwards, during the step


class _Recorder(L.Callback):
    """Clocks training batches and records the network calls of the measured ones.

    Hooks sit on each network and on its direct children; only the outermost call is recorded, so
    `teacher(x)` and a method calling `teacher.net(x)` directly are both seen once. Networks are looked up at
    every measured batch (methods that load their teacher lazily, at the first step, are covered).
    """

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.total = warmup, warmup + steps
        self.steps: list[_Step] = []
        self._handles, self._current, self._start, self._seen, self._depth = [], None, 0.0, 0, 0
        self._entered, self._autograd_depth = 0.0, 0
        self.device = torch.device("cpu")  # where the steps ran (the fit's teardown moves the module to the CPU)

    def _pre_hook(self, net, args, kwargs):
        if self._depth == 0 and self._autograd_depth == 0:
            self._entered = time.perf_counter()
        self._depth += 1

    def _hook(self, name):
        def hook(net, args, kwargs, output):
            self._depth -= 1
            if self._current is None or self._depth > 0:
                return
            if self._autograd_depth == 0:
                self._current.inside_s += time.perf_counter() - self._entered
            flags, jvp = [], False

            def grab(x):
                nonlocal jvp
                if not isinstance(x, torch.Tensor):
                    return x
                plain, transformed = _plain(x)
                jvp |= transformed
                flags.append(bool(x.requires_grad))
                return plain

            args, kwargs = tree_map(grab, (args, kwargs))
            outputs = [o for o in tree_flatten(output)[0] if isinstance(o, torch.Tensor)]
            self._current.calls.append(_Call(
                name, net, args, kwargs, flags, [p.requires_grad for p in net.parameters()], net.training,
                torch.is_grad_enabled(), any(o.requires_grad for o in outputs), jvp))
        return hook

    def on_train_start(self, trainer, pl_module):
        self.device = pl_module.device

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._seen >= self.warmup:
            self._current, self._depth = _Step(), 0
            for name, network in networks_of(pl_module).items():
                for sub, module in [(name, network)] + [(f"{name}.{c}", m) for c, m in network.named_children()]:
                    self._handles.append(module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
                    self._handles.append(module.register_forward_hook(self._hook(sub), with_kwargs=True))
        _sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _sync(pl_module.device)
        seconds = time.perf_counter() - self._start
        self._seen += 1
        if self._seen >= self.total:
            trainer.should_stop = True
        if self._current is not None:
            self._current.seconds = seconds
            self.steps.append(self._current)
            self._current = None
            for handle in self._handles:
                handle.remove()
            self._handles = []


@contextlib.contextmanager
def _clock_autograd(recorder: _Recorder):
    """Adds the time of every outermost autograd backward / grad call of a measured step to its inside_s."""
    originals = {"backward": torch.autograd.backward, "grad": torch.autograd.grad}

    def clocked(fn):
        def call(*args, **kwargs):
            if recorder._current is None or recorder._autograd_depth > 0 or recorder._depth > 0:
                return fn(*args, **kwargs)
            recorder._autograd_depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                recorder._autograd_depth -= 1
                recorder._current.inside_s += time.perf_counter() - start
        return call

    torch.autograd.backward, torch.autograd.grad = clocked(originals["backward"]), clocked(originals["grad"])
    try:
        yield
    finally:
        torch.autograd.backward, torch.autograd.grad = originals["backward"], originals["grad"]


def _replay_seconds(net: nn.Module, call: _Call, repeats: int, device: torch.device) -> float:
    """Median time of this call alone: forward (+ backward where the step backpropagated through it)."""
    saved = [p.requires_grad for p in net.parameters()]
    was_training = net.training
    flags = iter(call.input_grad)

    def make_input(x):
        if not isinstance(x, torch.Tensor):
            return x
        x = x.clone()
        return x.requires_grad_(True) if next(flags) and x.is_floating_point() else x

    args, kwargs = tree_map(make_input, (call.args, call.kwargs))
    params = list(net.parameters())
    for p, flag in zip(params, call.param_grad):
        p.requires_grad_(flag)
    net.train(call.training)
    try:
        if call.jvp:
            floats = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]

            def fn():
                def f(*xs):
                    full = list(args)
                    for i, x in zip(floats, xs):
                        full[i] = x
                    return net(*full, **kwargs)

                primals = tuple(args[i].detach() for i in floats)
                with torch.no_grad():
                    float32_jvp(f, primals, tuple(torch.ones_like(x) for x in primals))  # as the methods run it
        elif call.output_grad and call.grad_enabled:
            def fn():
                with torch.enable_grad():
                    out = [o for o in tree_flatten(net(*args, **kwargs))[0]
                           if isinstance(o, torch.Tensor) and o.requires_grad]
                    torch.autograd.backward(out, [torch.ones_like(o) for o in out])
        else:
            def fn():
                with torch.no_grad():
                    net(*args, **kwargs)

        def clear():
            for p in params:
                p.grad = None
            for a in tree_flatten((args, kwargs))[0]:
                if isinstance(a, torch.Tensor):
                    a.grad = None

        fn()  # warm-up
        return _median_seconds(fn, repeats, device, prepare=clear)
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
            p.grad = None
        net.train(was_training)


def networks_of(module) -> dict[str, nn.Module]:
    """The module's networks: direct children that hold parameters (the EMA copy included; it is rarely called)."""
    return {name: child for name, child in module.named_children() if any(True for _ in child.parameters())}


def training_step_ratio(module, datamodule, steps: int = 20, warmup: int = 5, repeats: int = 5,
                        accelerator: str = "auto", precision: str = "32-true") -> dict:
    """Median training-step time, median floor (its network passes alone) and median ratio; see module doc.

    Trains `module` for warmup + steps batches (its weights change: pass a copy you can spare). Under a mixed
    `precision` the passes are replayed under the same autocast as the step.
    """
    recorder = _Recorder(warmup, steps)
    # the recorder stops the fit after warmup + steps batches (max_steps would count optimizer steps, which differ
    # from batches for multi-phase methods); epochs roll over as needed
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=-1, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[recorder], precision=precision)
    with _clock_autograd(recorder):  # Tensor.backward calls torch.autograd.backward: both are clocked
        trainer.fit(module, datamodule)
    if len(recorder.steps) < steps:
        raise RuntimeError(f"timing: only {len(recorder.steps)} measured steps; the loader has too few batches "
                           f"for warmup={warmup} + steps={steps}.")
    # Lightning's teardown moved the module to the CPU: replay the passes where the steps ran (a GPU fit's recorded
    # inputs are on the GPU)
    device = recorder.device
    module.to(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision.startswith("bf16") else torch.float16)
                if precision.endswith("-mixed") else contextlib.nullcontext())
    cache: dict[int, float] = {}
    floors, ratios, calls_per_step = [], [], []
    for step in recorder.steps:
        floor = 0.0
        for call in step.calls:
            key = id(call)
            if key not in cache:
                with autocast:
                    cache[key] = _replay_seconds(call.module, call, repeats, device)
            floor += cache[key]
        floors.append(floor)
        ratios.append(step.seconds / floor if floor > 0 else float("nan"))
        calls_per_step.append(len(step.calls))
    kinds = sorted({f"{c.network}:{'jvp' if c.jvp else 'fwd+bwd' if c.output_grad and c.grad_enabled else 'fwd'}"
                    for s in recorder.steps for c in s.calls})
    return {"step_s": statistics.median(s.seconds for s in recorder.steps), "floor_s": statistics.median(floors),
            "ratio": statistics.median(ratios),
            "ratio_in_place": sum(s.seconds for s in recorder.steps) / sum(s.inside_s for s in recorder.steps),
            "steps": steps, "warmup": warmup, "repeats": repeats,
            "calls_per_step": statistics.median(calls_per_step), "passes": kinds}


def format_timing(rows: list[dict]) -> str:
    """Markdown table of rows {method, data, sampling: [...], training: {...}}."""
    nfes = sorted({r["nfe"] for row in rows for r in row["sampling"]})
    head = ["method", "data"] + [f"img/s @{k}" for k in nfes] + ["train step (ms)", "passes alone (ms)", "ratio",
                                                                   "ratio in place", "passes per step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        by_nfe = {r["nfe"]: r["images_per_s"] for r in row["sampling"]}
        t = row["training"]
        cells = [row["method"], row["data"]] + [f"{by_nfe[k]:.4g}" if k in by_nfe else "" for k in nfes]
        cells += [f"{1e3 * t['step_s']:.3g}", f"{1e3 * t['floor_s']:.3g}", f"{t['ratio']:.2f}",
                  f"{t['ratio_in_place']:.2f}" if "ratio_in_place" in t else "",
                  f"{t['calls_per_step']:g} ({', '.join(t['passes'])})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    from lit_fewstep.utils.checkpoint import load_module
    from lit_fewstep.utils.config import instantiate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="checkpoint or export of any lit_fewstep method")
    source.add_argument("--config", help="a training config (configs/<method>/<data>.yaml): untrained weights")
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch", type=int, default=1000, help="samples per timed sample() call")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    if args.ckpt:
        module = load_module(args.ckpt)
        datamodule = instantiate(module.data_config)
    else:
        import yaml

        config = yaml.safe_load(Path(args.config).read_text())
        module, datamodule = instantiate(config["model"]), instantiate(config["data"])
    row = {"method": type(module).__name__, "data": Path(args.ckpt or args.config).stem,
           "sampling": sampling_throughput(module, args.nfe, args.batch, args.repeats, args.seed),
           "training": training_step_ratio(module, datamodule, args.steps, args.warmup, args.repeats)}
    print(format_timing([row]))
    return row


if __name__ == "__main__":
    main()
