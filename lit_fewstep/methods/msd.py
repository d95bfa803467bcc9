"""Multi-Student Distillation (Song, Lorraine, Nie, Kreis, Lucas; arXiv 2410.23274): K one-step students, each
owning a group of class labels, trained with DMD2's losses on their group and routed by label at sampling.

Built on `DMD2` by making the generator, the fake score and the GAN head *routed*: `Routed` holds K members and
sends each sample to the member that owns its class label, so

- training: every student sees only its classes (its own fake score and head judge only its samples; the frozen
  teacher is shared); students never share parameters, so K students = K independent DMD2 runs on the K class
  groups, batched together;
- sampling: one student forward per sample per step (NFE = steps; latency = one student's).

Smaller students (`student_net` narrower than the teacher) cannot start from the teacher's weights: they first
run a teacher-score-matching warm-up (`tsm_iterations`, MSD's TSM stage), regressing the teacher's denoiser on
noisy real data of their classes, then DMD2.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..diffusion.paths import _bcast
from ..diffusion.precond import PreconditionedNet
from ..nets.heads import DiscriminatorHead
from .base import Phase, Stage, load_teacher
from .dmd import DMD2

__all__ = ["MSD", "Routed", "contiguous_partition", "kmeans_partition", "teacher_class_means"]


def contiguous_partition(num_classes: int, num_students: int) -> list[list[int]]:
    """Classes 0..C-1 split into K contiguous groups of sizes differing by at most one."""
    bounds = torch.linspace(0, num_classes, num_students + 1).round().long().tolist()
    return [list(range(bounds[k], bounds[k + 1])) for k in range(num_students)]


def kmeans_partition(points: Tensor, num_groups: int, iterations: int = 100, seed: int = 0) -> list[list[int]]:
    """Classes grouped by Lloyd's k-means of one point per class (row c of `points` stands for class c), the way
    MSD clusters its conditions (prompt embeddings for text): similar classes share a student. k-means++ seeding
    from `seed`; a group left empty takes the class farthest from its center among groups of two or more classes,
    so every student gets at least one class. Groups are returned ordered by their smallest class."""
    if not 1 <= num_groups <= points.shape[0]:
        raise ValueError(f"num_students: k-means needs 1..{points.shape[0]} groups for {points.shape[0]} classes, "
                         f"got {num_groups}.")
    x = points.flatten(1).double()
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randint(x.shape[0], (1,), generator=g)]
    while centers.shape[0] < num_groups:  # k-means++: next center drawn with probability ~ squared distance
        d2 = torch.cdist(x, centers).min(1).values ** 2
        centers = torch.cat([centers, x[torch.multinomial(d2 + 1e-30, 1, generator=g)]])

    def assigned(centers: Tensor) -> Tensor:
        assign = torch.cdist(x, centers).argmin(1)
        for k in range(num_groups):
            if not (assign == k).any():  # empty group: take the farthest class of a group with >= 2 classes
                shared = torch.bincount(assign, minlength=num_groups)[assign] >= 2
                distance = torch.where(shared, (x - centers[assign]).norm(dim=1), -1.0)
                assign[distance.argmax()] = k
        return assign

    assign = assigned(centers)
    for _ in range(iterations):
        new = assigned(torch.stack([x[assign == k].mean(0) for k in range(num_groups)]))
        if torch.equal(new, assign):
            break
        assign = new
    return sorted(sorted(torch.nonzero(assign == k).flatten().tolist()) for k in range(num_groups))


@torch.no_grad()
def teacher_class_means(teacher: nn.Module, num_classes: int, shape: tuple[int, ...], draws: int = 64,
                        sigma: float = 80.0, seed: int = 0) -> Tensor:
    """E[x0 | c] for every class from the teacher alone: at a noise level far above the data's scale the ideal
    denoiser D(x + sigma eps, sigma, c) has forgotten x and returns the class mean; averaged over `draws` draws.
    Shape (num_classes, *shape)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(draws)
    x_t = sigma * torch.randn((labels.shape[0], *shape), generator=g)
    x0 = teacher.x0(x_t, torch.full((labels.shape[0],), sigma), class_labels=labels)
    return x0.reshape(num_classes, draws, *shape).mean(1)


class Routed(nn.Module):
    """K networks with one interface; sample i goes to ``members[route[class_labels[i]]]``.

    Every call takes ``class_labels`` (the routing key); tensors whose first axis is the batch are split, the
    members' outputs (tensors or tuples of tensors) are put back in batch order. With ``forward_labels`` the
    members also receive their labels (generators, fake scores), otherwise not (unconditional GAN heads).
    """

    def __init__(self, members: Sequence[nn.Module], route: Tensor, forward_labels: bool = True):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("route", torch.as_tensor(route, dtype=torch.long))
        self.forward_labels = forward_labels

    # the attributes DMD reads from a PreconditionedNet, taken from the first member
    @property
    def num_classes(self) -> int:
        return int(getattr(self.members[0], "num_classes", 0))

    def __getattr__(self, name: str):
        if name in ("net", "path", "sigma_data", "preconditioning", "prediction"):
            return getattr(self.members[0], name)
        return super().__getattr__(name)

    def owner(self, class_labels: Tensor) -> Tensor:
        """Student index of each label."""
        return self.route[class_labels]

    def _dispatch(self, call: Callable, args: tuple, class_labels: Tensor | None, kwargs: dict):
        if class_labels is None:
            raise ValueError("class_labels: MSD routes samples to students by class label; pass labels.")
        batch = class_labels.shape[0]
        owner = self.owner(class_labels)
        outs, was_tuple = None, False
        for k, member in enumerate(self.members):
            index = (owner == k).nonzero(as_tuple=True)[0]
            if index.numel() == 0:
                continue
            sub = [a.index_select(0, index) if torch.is_tensor(a) and a.ndim > 0 and a.shape[0] == batch else a
                   for a in args]
            kw = dict(kwargs, class_labels=class_labels[index]) if self.forward_labels else dict(kwargs)
            res = call(member, *sub, **kw)
            was_tuple = isinstance(res, tuple)
            parts = res if was_tuple else (res,)
            if outs is None:
                outs = [p.new_zeros((batch, *p.shape[1:])) for p in parts]
            outs = [o.index_copy(0, index, p) for o, p in zip(outs, parts)]
        return tuple(outs) if was_tuple else outs[0]

    def forward(self, *args, class_labels: Tensor | None = None, **kwargs):
        return self._dispatch(lambda m, *a, **k: m(*a, **k), args, class_labels, kwargs)

    def x0_from(self, *args, class_labels: Tensor | None = None, **kwargs):
        return self._dispatch(lambda m, *a, **k: m.x0_from(*a, **k), args, class_labels, kwargs)

    def x0(self, *args, class_labels: Tensor | None = None, **kwargs):
        return self._dispatch(lambda m, *a, **k: m.x0(*a, **k), args, class_labels, kwargs)


class MSD(DMD2):
    """Multi-Student Distillation with DMD2 losses. Args beyond `DMD2`'s (``net`` is named ``student_net``):

    Args:
        num_students: K; the classes are split into K contiguous groups unless `partition` is given.
        partition: K lists of class labels, every class exactly once (e.g. [[0, 1, 2], [3, 4, 5], ...]); or
            "kmeans": k-means of the teacher's class means (`teacher_class_means`), similar classes to one student.
            A trained student records the groups it used, so it reloads without the teacher.
        student_net: architecture of every student; default (None) the teacher's, initialised from its weights.
            Any other architecture starts from scratch: give it `tsm_iterations`.
        tsm_iterations: teacher-score-matching warm-up iterations (only the students train); DMD2's generator and
            critic phases start after it, as a second stage whose sampling EMAs restart from the warmed-up students.
        tsm_lr: learning rate of the warm-up (default: `lr`); it trains a diffusion model from scratch, which can
            take a larger step than distillation.
        critic_lr, pairs_path, reg_weight, reg_batch_size, reg_distance, lpips_weights, reg_pairs, reg_pairs_nfe:
            as in `DMD2` (DMD's regression loss is off by default). The pairs are the teacher's, for every class;
            each pair's loss reaches only the student that owns its class, so each student regresses on its own.
        shared_critic: one class-conditional fake score (and one GAN head) for all students instead of one per
            student (the paper's). Because every class has exactly one student, the students' class-conditional
            output distributions together are one class-conditional distribution, and a fake score conditioned on
            the class that learns it gives each student the score its own fake score would; it steps on the whole
            batch instead of a 1/K share, at the same compute. Outside the paper (off by default).
    """

    def __init__(self, teacher_ckpt: str, num_students: int = 4, partition: list[list[int]] | str | None = None,
                 student_net: nn.Module | None = None, tsm_iterations: int = 0, preconditioning: str | None = None,
                 sigma_data: float | None = None, generator_sigmas: Sequence[float] = (80.0,),
                 backward_simulation: bool = True, generator_every: int = 5, gan_generator_weight: float = 3e-3,
                 gan_critic_weight: float = 1e-2, gan_step_range: Sequence[float] = (0.0, 1.0),
                 real_guidance_scale: float = 1.0, dm_step_range: Sequence[float] = (0.02, 0.98),
                 dm_reduction: str = "mean", lr: float = 2e-6, betas: Sequence[float] = (0.9, 0.999),
                 weight_decay: float = 0.01, ema_decay: float = 0.999, grad_clip: float = 10.0, nonfinite: str = "stop",
                 max_consecutive_skips: int = 100, tsm_lr: float | None = None, critic_lr: float | None = None,
                 pairs_path: str | None = None, reg_weight: float = 0.25, reg_batch_size: int = 0,
                 reg_distance: str = "l2", lpips_weights: str | None = None, reg_pairs: int = 0,
                 reg_pairs_nfe: int = 15, shared_critic: bool = False):
        if not isinstance(num_students, int) or num_students < 1:
            raise ValueError(f"num_students: must be an integer >= 1, got {num_students!r}.")
        if isinstance(partition, str) and partition != "kmeans":
            raise ValueError(f"partition: give K lists of class labels or 'kmeans', got {partition!r}.")
        if tsm_iterations < 0:
            raise ValueError(f"tsm_iterations: must be >= 0, got {tsm_iterations}.")
        if tsm_lr is not None and not tsm_lr > 0:
            raise ValueError(f"tsm_lr: must be > 0 (or None for lr), got {tsm_lr}.")
        # Plain attributes read by _build_generator / _build_critic while DMD2.__init__ builds the networks.
        self.num_students, self.partition_arg = num_students, partition
        self.shared_critic = bool(shared_critic)
        super().__init__(teacher_ckpt, student_net, preconditioning, sigma_data, generator_sigmas, backward_simulation,
                         generator_every, gan_generator_weight, gan_critic_weight, gan_step_range, real_guidance_scale,
                         dm_step_range, dm_reduction, lr, betas, weight_decay, ema_decay, grad_clip, nonfinite,
                         max_consecutive_skips, critic_lr=critic_lr, pairs_path=pairs_path, reg_weight=reg_weight,
                         reg_batch_size=reg_batch_size, reg_distance=reg_distance, lpips_weights=lpips_weights,
                         reg_pairs=reg_pairs, reg_pairs_nfe=reg_pairs_nfe)
        self.tsm_iterations = int(tsm_iterations)
        # The students train independently (MSD Sec. 3): one optimizer and one gradient clip per student, for the
        # generator and for its critic (fake score + head), although each phase batches all students in one loss.
        students = range(self.num_students)
        generator, critic = self.phases
        generator.networks, generator.separate = tuple(f"G.members.{k}" for k in students), True
        if not self.shared_critic:  # shared: DMD2's one critic phase over fake_score and head, unchanged
            critic.networks = tuple((f"fake_score.members.{k}",) + ((f"head.members.{k}",) if self.uses_gan else ())
                                    for k in students)
            critic.separate = True
        if self.tsm_iterations > 0:
            tsm = Phase("tsm", "tsm_loss", generator.networks, separate=True,
                        lr=generator.lr if tsm_lr is None else float(tsm_lr), betas=generator.betas,
                        weight_decay=generator.weight_decay, updates_ema=True)
            # MSD trains the TSM warm-up and the distillation as two stages: the distilled generator's averages start
            # from the warmed-up weights, so that no EMA carries the warm-up's denoiser (a poor one-step generator)
            # into the distilled one (with a slow EMA that share would dominate its samples).
            self.set_stages([Stage("tsm", 0, self.tsm_iterations, [tsm]),
                             Stage("dmd2", self.tsm_iterations, None, [generator, critic], on_enter="restart_emas")])

    # ------------------------------------------------------------------------------------- networks
    def _routing(self, num_classes: int) -> Tensor:
        if num_classes == 0:
            raise ValueError("teacher_ckpt: MSD partitions class labels among students; it needs a class-conditional "
                             "teacher (and student_net with num_classes > 0).")
        if self.num_students > num_classes:
            raise ValueError(f"num_students: {self.num_students} students for {num_classes} classes; "
                             f"use at most {num_classes}.")
        partition = self.partition_arg or contiguous_partition(num_classes, self.num_students)
        if partition == "kmeans":
            teacher = load_teacher(self.teacher_ckpt, field_name="teacher_ckpt")
            means = teacher_class_means(teacher, num_classes, self._teacher_data_shape(teacher))
            partition = kmeans_partition(means, self.num_students)
        flat = sorted(c for group in partition for c in group)
        if len(partition) != self.num_students or flat != list(range(num_classes)) or any(not g for g in partition):
            raise ValueError(f"partition: need {self.num_students} non-empty groups holding every class 0..{num_classes - 1} "
                             f"exactly once, got {partition}.")
        route = torch.empty(num_classes, dtype=torch.long)
        for k, group in enumerate(partition):
            route[torch.tensor(group)] = k
        return route

    @staticmethod
    def _teacher_data_shape(teacher: nn.Module) -> tuple[int, ...]:
        res = getattr(teacher.net, "img_resolution", None)
        return (teacher.net.in_channels,) if res is None else (teacher.net.in_channels, res, res)

    @property
    def partition(self) -> list[list[int]]:
        """The class groups in use, student by student."""
        return [torch.nonzero(self.G.route == k).flatten().tolist() for k in range(self.num_students)]

    @property
    def init_config(self) -> dict:
        """DMD2's record of the architecture, and a k-means partition as the groups it found."""
        config = super().init_config
        if isinstance(config["init_args"].get("partition"), str):
            config["init_args"]["partition"] = self.partition
        return config

    def _build_generator(self, net: nn.Module, preconditioning: str, sigma_data: float) -> None:
        route = self._routing(int(getattr(net, "num_classes", 0)))
        students = [PreconditionedNet(copy.deepcopy(net), preconditioning, sigma_data) for _ in range(self.num_students)]
        self.G = Routed(students, route).requires_grad_(True).train()

    def _build_critic(self, teacher: PreconditionedNet) -> None:
        """One fake score (a copy of the teacher) and one GAN head per student, or DMD2's single pair when shared."""
        if self.shared_critic:
            return super()._build_critic(teacher)
        route = self.G.route
        self.fake_score = Routed([copy.deepcopy(teacher) for _ in range(self.num_students)], route)
        self.fake_score.requires_grad_(True).train()
        self.head = (Routed([DiscriminatorHead(self._feature_channels(teacher)) for _ in range(self.num_students)],
                            route, forward_labels=False) if self.uses_gan else None)

    def _init_generator_from(self, teacher: PreconditionedNet) -> None:
        for student in self.G.members:
            if self._same_architecture(student, teacher):
                student.load_state_dict(teacher.state_dict())
        self.restart_emas()

    def _resolved_args(self) -> dict:
        return {"student_net": self.G.net, "preconditioning": self.G.preconditioning, "sigma_data": self.G.sigma_data}

    def discriminate(self, features: Tensor, y: Tensor | None) -> Tensor:
        if self.shared_critic:
            return super().discriminate(features, y)
        return self.head(features, class_labels=y)  # routed: each student's samples to its own head

    # ------------------------------------------------------------------------------------- TSM warm-up
    def tsm_loss(self, batch) -> Tensor:
        """MSD's teacher score matching: lambda(sigma) ||G_k(x_sigma, sigma) - mu_real(x_sigma, sigma)||^2 on real
        data of student k's classes, x_sigma = x + sigma eps, sigma uniform on the Karras grid, EDM weight
        lambda = 1/sigma^2 + 1/sigma_d^2, mean over elements."""
        x, y = self._unpack(batch)
        sigma = self.grid_sigmas(x.shape[0])
        x_t = self.edm.noise(x, self.randn(x.shape, x), sigma)
        with torch.no_grad():
            target = self.real_score(x_t, sigma, y)
        pred = self.G.x0_from(x_t, sigma, self.edm, class_labels=y)
        weight = _bcast(1.0 / sigma**2 + 1.0 / self.G.sigma_data**2, x)
        return (weight * (pred - target) ** 2).mean()
