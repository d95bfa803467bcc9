"""The methods every conformance check runs (tests/test_conformance.py), each with a tiny CPU configuration.

A new method joins `METHODS` with one line: a name and a function (teacher checkpoint path) -> module. Methods
without a teacher ignore the path. Every module is trained on `data()` (8-Gaussians, 8 classes, 10 batches per
epoch), and class-conditional on its 8 classes; distillation methods get a small exported EDM teacher
(`teacher_path()`, or `teacher_path(dropout=...)` for the frozen-network checks).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import lightning as L
import torch

from conftest import StopAtIteration
from lit_fewstep.cli import FewStepTrainer
from lit_fewstep.data import Toy2DDataModule
from lit_fewstep.data.pairs import make_pairs, save_pairs
from lit_fewstep.methods import CD, CT, DMD, DMD2, ICT, MSD, SCD, SCT, EDMDiffusion, FewStepModule, FlowMatching
from lit_fewstep.methods.base import load_teacher
from lit_fewstep.nets import MLP

SIGMA_D = 1.422  # 8-Gaussians' data scale
BATCHES_PER_EPOCH = 10


def mlp(hidden: int = 32, dropout: float = 0.0) -> MLP:
    return MLP(dim=2, hidden=hidden, depth=2, emb_dim=16, num_classes=8, dropout=dropout)


# Seven items more than whole batches, as in real data sets (digits: 1,618 items at batch 64): drop_last leaves them
# out of every epoch, and a resume from the end of an epoch must not mistake them for a rest of that epoch.
LEFTOVER_ITEMS = 7


def data() -> Toy2DDataModule:
    return Toy2DDataModule(name="eight_gaussians", batch_size=32, num_train=32 * BATCHES_PER_EPOCH + LEFTOVER_ITEMS,
                           num_val=64)


_files: dict[tuple, str] = {}
_folder: Path | None = None


def _path(name: str) -> Path:
    global _folder
    if _folder is None:
        _folder = Path(tempfile.mkdtemp(prefix="lit_fewstep_conformance_"))
        atexit.register(shutil.rmtree, _folder, True)
    return _folder / name


def teacher_path(dropout: float = 0.0) -> str:
    """A tiny class-conditional EDM teacher with non-trivial weights, exported once per session.

    Its output layer is random (an untrained MLP outputs exactly 0, which would hide what dropout does)."""
    key = ("teacher", dropout)
    if key not in _files:
        with torch.random.fork_rng():  # leave the global RNG as the calling run seeded it
            torch.manual_seed(0)
            teacher = EDMDiffusion(mlp(dropout=dropout), sigma_data=SIGMA_D, ema_decay=0.0)
            with torch.no_grad():
                teacher.model.net.out.weight.normal_(0, 0.3)
                teacher.model.net.out.bias.normal_(0, 0.1)
        path = _path(f"teacher_dropout{dropout}.pt")
        teacher.export(str(path))
        _files[key] = str(path)
    return _files[key]


def pairs_path(teacher: str) -> str:
    """DMD's regression pairs (teacher ODE noise -> sample) for `teacher`, made once per session."""
    key = ("pairs", teacher)
    if key not in _files:
        path = _path(f"pairs_{len(_files)}.pt")
        save_pairs(make_pairs(load_teacher(teacher), 64, nfe=4, seed=0), path, teacher)
        _files[key] = str(path)
    return _files[key]


# One line per method. Schedules are chosen so the resume cuts (5, 10, 15) fall at interesting places: DMD2 steps
# its generator every 3rd iteration (cuts 5 and 10 mid-cycle); MSD's half-width students warm up with teacher score
# matching for 7 iterations (cut 5 inside the warm-up), then step every 2nd iteration (cut 10 mid-cycle); CT/iCT's
# curricula and sCM's tangent warm-up still change at the cuts.
METHODS: dict[str, Callable[[str], FewStepModule]] = {
    "edm": lambda teacher: EDMDiffusion(mlp(), sigma_data=SIGMA_D, ema_decay=0.9),
    "flow_matching": lambda teacher: FlowMatching(mlp(), sigma_data=SIGMA_D, ema_decay=0.9),
    "cd": lambda teacher: CD(mlp(), teacher, num_scales=8, target_mu=0.9, sigma_data=SIGMA_D, lr=1e-3, ema_decay=0.9),
    "ct": lambda teacher: CT(mlp(), s0=2, s1=16, total_steps=12, sigma_data=SIGMA_D, lr=1e-3, ema_decay=0.9),
    "ict": lambda teacher: ICT(mlp(), s0=2, s1=16, total_steps=12, sigma_data=SIGMA_D, lr=1e-3, ema_decay=0.9),
    "scd": lambda teacher: SCD(mlp(), teacher, warmup_steps=8, sigma_data=SIGMA_D, lr=1e-3, ema_decay=0.9),
    "sct": lambda teacher: SCT(mlp(), warmup_steps=8, sigma_data=SIGMA_D, lr=1e-3, ema_decay=0.9),
    "dmd": lambda teacher: DMD(teacher, pairs_path=pairs_path(teacher), lr=1e-3, ema_decay=0.9),
    "dmd2": lambda teacher: DMD2(teacher, generator_sigmas=(80.0, 1.0), generator_every=3, lr=1e-3, ema_decay=0.9),
    "msd": lambda teacher: MSD(teacher, num_students=2, student_net=mlp(hidden=16), tsm_iterations=7,
                               generator_sigmas=(80.0, 1.0), generator_every=2, lr=1e-3, ema_decay=0.9),
    # one critic for all students (outside the paper): DMD2's critic phase beside per-student generator optimizers
    "msd_shared_critic": lambda teacher: MSD(teacher, num_students=2, shared_critic=True, generator_sigmas=(80.0, 1.0),
                                             generator_every=3, lr=1e-3, ema_decay=0.9),
    "ctm": lambda teacher: __import__("lit_fewstep.methods").methods.CTM(MLP(dim=2, hidden=32, depth=2, emb_dim=16, num_classes=8, second_time=True), teacher, num_scales=8, sigma_data=SIGMA_D, target_mu=0.9, gan_start=4, discriminator_hidden=16, lr=1e-3, ema_decay=0.9),  # noqa: E501
    "guided_distillation": lambda teacher: __import__("lit_fewstep.methods").methods.GuidedDistillation(teacher, guidance_iterations=4, teacher_steps=8, halving_iterations=4, lr=1e-3, ema_decay=0.9),  # noqa: E501
    # LowDiff's cascade needs images: on 2-D points it is one level (the EDM teacher); tests/test_lowdiff.py fits the
    # multi-resolution cascade on digits.
    "lowdiff": lambda teacher: __import__("lit_fewstep.methods").methods.LowDiff(mlp(), sigma_data=SIGMA_D, ema_decay=0.9),
    "flow_map": lambda teacher: __import__("lit_fewstep.methods").methods.AYF(MLP(dim=2, hidden=32, depth=2, emb_dim=16, num_classes=8, second_time=True, guidance_embed=True), teacher, guide_ckpt=teacher, guidance_range=(1.0, 2.0), t_max=0.98, warmup_steps=8, init_from_teacher=False, lr=1e-3, ema_decay=0.9),  # noqa: E501
    "caf": lambda teacher: __import__("lit_fewstep.methods").methods.CAF(mlp(), MLP(dim=2, hidden=32, depth=2, emb_dim=16, num_classes=8, extra_channels=2), pairs_path=pairs_path(teacher), velocity_iterations=4, acceleration_iterations=4, adversarial_iterations=None, discriminator_hidden=16, lr=1e-3, ema_decay=0.9),  # noqa: E501
    "caf_2rf": lambda teacher: __import__("lit_fewstep.methods").methods.CAF(mlp(), None, pairs_path=pairs_path(teacher), h=1.0, lr=1e-3, ema_decay=0.9),  # noqa: E501
    "analog_bits": lambda teacher: __import__("lit_fewstep.methods").methods.AnalogBits(MLP(dim=8, hidden=32, depth=2, emb_dim=16, num_classes=8, extra_channels=8), num_levels=16, low=-3.0, high=3.0, steps=10, lr=1e-3, ema_decay=0.9),  # noqa: E501
}


def build(name: str, teacher: str | None = None) -> FewStepModule:
    return METHODS[name](teacher or teacher_path())


def supported_nfes(module: FewStepModule) -> tuple[int, ...]:
    """Every NFE up to the method's limit, or 1..4 for methods without one."""
    return tuple(range(1, (module.max_nfe or 4) + 1))


# ----------------------------------------------------------------------------------------------- training
def trainer(root, iterations: int, callbacks=(), **kw) -> FewStepTrainer:
    """A quiet CPU trainer that stops after `iterations` iterations (validation once per epoch, one batch)."""
    kw = {"logger": False, "enable_checkpointing": False, "accelerator": "cpu", **kw}
    return FewStepTrainer(devices=1, max_steps=-1, max_epochs=-1, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=str(root), num_sanity_val_steps=0,
                          check_val_every_n_epoch=1, limit_val_batches=1,
                          callbacks=[*callbacks, StopAtIteration(iterations)], **kw)


def fit(make: Callable[[], FewStepModule], root, iterations: int, callbacks=(), seed: int = 0, ckpt_path=None,
        **kw) -> tuple[FewStepModule, FewStepTrainer]:
    """Seed everything, build the module (its initial weights follow the seed), train it to `iterations`."""
    L.seed_everything(seed, verbose=False)
    module = make()
    run = trainer(root, iterations, callbacks, **kw)
    run.fit(module, data(), ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return module, run
