"""Bring your own teacher (lit_fewstep.teachers): a diffusers UNet2DModel + scheduler from a local folder, checked
against diffusers' own DDIMScheduler; safetensors conversion and export; a DMD2 fit from a diffusers teacher."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: E402

from lit_fewstep.diffusion.paths import EDMPath, convert  # noqa: E402
from lit_fewstep.diffusion.solvers import DDIMStep, run_steps  # noqa: E402
from lit_fewstep.methods.base import load_teacher  # noqa: E402
from lit_fewstep.teachers import DiffusersTeacher, DiscreteVPPath, load_diffusers_teacher  # noqa: E402
from lit_fewstep.teachers.formats import convert as convert_teacher  # noqa: E402
from lit_fewstep.utils.checkpoint import load_checkpoint, load_module  # noqa: E402

T = 1000
STEPS = [0, 1, 37, 250, 500, 999]


def small_unet(channels: int = 1, size: int = 8, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make every weight matter
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet.eval()


@pytest.fixture(scope="module")
def unet():
    return small_unet()


def save_teacher(folder, unet: UNet2DModel, **scheduler_kwargs):
    unet.save_pretrained(str(folder / "unet"))
    DDPMScheduler(**scheduler_kwargs).save_pretrained(str(folder / "scheduler"))
    return folder


def close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> float:
    """Max abs difference relative to max(1, |ref|): at k = 999 an eps model's x0 is ~500 in size."""
    err = float((ours - ref).abs().max()) / max(1.0, float(ref.abs().max()))
    assert err <= tol, err
    return err


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_x0_equals_ddim_pred_original_sample(tmp_path, unet, prediction_type, beta_schedule):
    folder = save_teacher(tmp_path, unet, prediction_type=prediction_type, beta_schedule=beta_schedule)
    teacher = load_diffusers_teacher(folder)
    assert isinstance(teacher, DiffusersTeacher) and teacher.prediction_type == prediction_type
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    ddim = DDIMScheduler.from_config(DDPMScheduler.from_pretrained(str(folder / "scheduler")).config,
                                     clip_sample=False)
    ddim.set_timesteps(10)
    torch.testing.assert_close(teacher.vp_path.table[1:], ddim.alphas_cumprod.double(), rtol=0, atol=0)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for k in STEPS:
        with torch.no_grad():
            out = unet(x, k).sample
            ref = ddim.step(out, k, x, eta=0.0).pred_original_sample
            t = torch.full((3,), (k + 1) / T)
            ours = teacher.x0_from(x, t, teacher.vp_path)
            # the same state on the EDM path (x / a, sigma = b / a), through x0_from and through the EDM forward
            x_edm, sigma = convert(x, t, teacher.vp_path, EDMPath())
            via_edm = teacher.x0_from(x_edm, sigma, EDMPath())
            via_forward = teacher(x_edm, sigma)  # PreconditionedNet("edm") on the raw net: what students use
        close(ours, ref)
        close(via_edm, ref, tol=1e-4)  # the float32 state x / a at sigma up to 2e4 (cosine k = 999)
        close(via_forward, ref, tol=1e-4)  # ln(sigma)/4 in float32 -> timestep label accurate to ~1e-4
        if prediction_type == "epsilon":  # eps implied by our x0 is the network's output
            a, b = teacher.vp_path.a(t[0]).float(), teacher.vp_path.b(t[0]).float()
            close((x - a * ours) / b, out, tol=max(1e-4, 1e-5 / float(b)))  # eps from x0: rounding x 1/b (and x0 ~ 1/a)


def test_ten_step_ddim_through_our_solver_equals_diffusers_loop(tmp_path, unet):
    folder = save_teacher(tmp_path, unet)
    teacher = load_diffusers_teacher(folder)
    ddim = DDIMScheduler.from_config(DDPMScheduler.from_pretrained(str(folder / "scheduler")).config,
                                     clip_sample=False, set_alpha_to_one=True)
    ddim.set_timesteps(10)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    x = noise.clone()
    with torch.no_grad():
        for k in ddim.timesteps:  # diffusers' DDIMPipeline loop (eta = 0)
            x = ddim.step(unet(x, k).sample, k, x, eta=0.0).prev_sample
        # ours: timestep k is t = (k + 1) / T; the last step lands on t = 0 (alpha_bar = 1, set_alpha_to_one)
        times = [(int(k) + 1) / T for k in ddim.timesteps] + [0.0]
        assert times[:2] == [0.901, 0.801] and len(times) == 11
        state = run_steps(lambda x_t, t: teacher.x0_from(x_t, t, teacher.vp_path), noise, times,
                          DDIMStep(teacher.vp_path))
    close(state.x, x)


def test_discrete_vp_path(unet):
    table = DDPMScheduler().alphas_cumprod.double()
    path = DiscreteVPPath(table)
    k = torch.tensor([0, 1, 499, 998, 999])
    t = (k + 1).double() / T
    torch.testing.assert_close(path.a(t) ** 2, table[k], rtol=0, atol=1e-15)
    torch.testing.assert_close(path.timestep(t), k.double())
    assert float(path.a(torch.tensor(0.0, dtype=torch.float64))) == 1.0 and float(path.b(torch.tensor(0.0))) == 0.0
    s = torch.linspace(0.0005, 1.0, 97, dtype=torch.float64)
    torch.testing.assert_close(path.t_from_log_snr(path.log_snr(s)), s, rtol=0, atol=1e-9)
    sigma = torch.tensor([0.05, 1.0, 80.0], dtype=torch.float64)  # EDM sigma -> discrete time -> the same sigma
    torch.testing.assert_close(path.sigma(path.t_from_sigma(sigma)), sigma, rtol=1e-9, atol=0)
    x = torch.randn(3, 2, dtype=torch.float64)
    x_vp, t_vp = convert(x, sigma, EDMPath(), path)
    back, sigma_back = convert(x_vp, t_vp, path, EDMPath())
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(sigma_back, sigma)


def test_errors_are_one_clear_line(tmp_path, unet):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher(f"diffusers:{tmp_path / 'nowhere'}")
    save_teacher(tmp_path / "v", unet)
    cfg = json.loads((tmp_path / "v" / "scheduler" / "scheduler_config.json").read_text())
    (tmp_path / "v" / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "prediction_type": "flow"}))
    with pytest.raises(ValueError, match="prediction_type 'flow' is not supported"):
        load_teacher(str(tmp_path / "v"))
    (tmp_path / "v" / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**cfg, "_class_name": "ScoreSdeVeScheduler"}))
    with pytest.raises(ValueError, match="'ScoreSdeVeScheduler' is not supported"):
        load_teacher(f"diffusers:{tmp_path / 'v'}")
    (tmp_path / "v" / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no scheduler config"):
        load_teacher(f"diffusers:{tmp_path / 'v'}")
    with pytest.raises(ValueError, match="must end with .safetensors"):
        convert_teacher("diffusers", tmp_path / "v", tmp_path / "x.pt")


def _state(folder):
    return UNet2DModel.from_pretrained(str(folder / "unet"), local_files_only=True).state_dict()


def test_conversion_round_trips(tmp_path, unet):
    src = save_teacher(tmp_path / "src", unet, prediction_type="v_prediction")
    first = convert_teacher("diffusers", src, tmp_path / "teacher.safetensors")
    with open(first, "rb") as f:
        assert not f.read(64).startswith(b"PK")  # a safetensors file, not a torch zip/pickle
    raw = load_checkpoint(first)
    assert raw["lit_fewstep"]["config"]["class_path"] == "lit_fewstep.methods.diffusion.EDMDiffusion"
    teacher = load_teacher(str(first))  # as a teacher_ckpt: the same function as the folder
    assert isinstance(teacher, DiffusersTeacher)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        assert torch.equal(teacher.x0_from(x, t, teacher.vp_path),
                           load_teacher(f"diffusers:{src}").x0_from(x, t, teacher.vp_path))
    back = convert_teacher("safetensors", first, tmp_path / "back")
    assert json.loads((back / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    original, again = _state(src), _state(back)
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    second = load_checkpoint(convert_teacher("diffusers", back, tmp_path / "again.safetensors"))["state_dict"]
    assert raw["state_dict"].keys() == second.keys()
    assert all(torch.equal(raw["state_dict"][k], second[k]) for k in second)


def _run(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-m", "lit_fewstep", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_dmd2_fit_from_a_diffusers_teacher_exports_a_safetensors_student(tmp_path, capsys):
    from lit_fewstep.cli import main

    def run_here(*args):  # the commands after the fit in this process: a subprocess costs seconds of imports each
        main(list(args))
        return capsys.readouterr().out

    teacher = save_teacher(tmp_path / "teacher", small_unet())
    # 20 iterations = 24 optimizer steps (20 critic + 4 generator steps at generator_every 5)
    out = _run("fit", "--config", str(ROOT / "configs" / "dmd2" / "digits.yaml"),
               "--model.init_args.teacher_ckpt", f"diffusers:{teacher}", "--trainer.max_steps", "24",
               "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.callbacks", "null",
               "--trainer.enable_progress_bar", "false", "--export_format", "safetensors", cwd=tmp_path)
    student = tmp_path / "runs" / "dmd2_digits" / "version_0" / "model.safetensors"
    assert "exported DMD2" in out and student.is_file()
    module = load_module(student)  # no pickle anywhere: safetensors + JSON config
    assert type(module.G.net).__name__ == "DiffusersUNet" and int(module.iteration) == 20
    assert "wrote 6 samples" in run_here("sample", "--ckpt", str(student), "--nfe", "1", "--num", "6",
                                         "--out", str(tmp_path / "s.npz"))
    # the converted teacher file samples too (an EDMDiffusion teacher: Heun)
    run_here("convert", "--from", "diffusers", str(teacher), "--out", str(tmp_path / "t.safetensors"))
    assert "wrote 4 samples (5 NFE" in run_here("sample", "--ckpt", str(tmp_path / "t.safetensors"), "--nfe", "5",
                                                "--num", "4", "--out", str(tmp_path / "t.npz"))


# ------------------------------------------------------------------------------------------------ EDM / EDM2
from lit_fewstep.teachers.edm import adm_imagenet64, count_parameters, ddpmpp_cifar10, ncsnpp_cifar10  # noqa: E402
from lit_fewstep.teachers.edm2 import edm2_img512  # noqa: E402
from lit_fewstep.teachers.official import (ARCHS, build_arch, from_official_state, load_official,  # noqa: E402
                                           to_official_state)


@pytest.mark.parametrize("build, published", [
    (lambda: ddpmpp_cifar10(), 55.73),        # EDM (Karras et al. 2022) Table 7: DDPM++ CIFAR-10, 55.73M
    (lambda: adm_imagenet64(), 295.90),       # EDM Table 7: ADM ImageNet-64 (class-conditional), 295.90M
])
def test_edm_parameter_counts_equal_the_published_figures(build, published):
    assert round(count_parameters(build()) / 1e6, 2) == published


@pytest.mark.parametrize("size, published", [("xs", 125), ("s", 280), ("m", 498)])  # EDM2 (Karras et al. 2024) Table 2
def test_edm2_parameter_counts_equal_the_published_figures(size, published):
    assert round(count_parameters(edm2_img512(size)) / 1e6) == published


def test_ncsnpp_count_is_recorded():
    """NCSN++ at EDM's CIFAR-10 settings: our count (not checked against a published figure: see docs/teachers.md)."""
    assert count_parameters(ncsnpp_cifar10()) == 56_397_827


# Key names of the official files, written out independently of our module tree (EDMPrecond.model / Precond.unet).
OFFICIAL_KEYS = {
    "ddpmpp-cifar10": ["model.map_augment.weight", "model.map_layer0.weight", "model.map_layer1.bias",
                       "model.enc.32x32_conv.weight", "model.enc.16x16_down.conv0.resample_filter",
                       "model.enc.16x16_down.skip.weight", "model.enc.16x16_block0.qkv.weight",
                       "model.enc.16x16_block0.norm2.weight", "model.dec.8x8_in0.proj.bias",
                       "model.dec.16x16_up.affine.weight", "model.dec.32x32_block4.conv1.weight",
                       "model.dec.32x32_aux_norm.weight", "model.dec.32x32_aux_conv.weight"],
    "ncsnpp-cifar10": ["model.map_noise.freqs", "model.enc.16x16_aux_residual.weight",
                       "model.enc.16x16_aux_residual.resample_filter", "model.enc.8x8_aux_residual.bias"],
    "adm-imagenet64": ["model.map_label.weight", "model.enc.64x64_conv.weight", "model.enc.32x32_block0.qkv.weight",
                       "model.enc.32x32_down.conv0.resample_filter", "model.dec.8x8_in0.norm2.bias",
                       "model.out_norm.weight", "model.out_conv.weight"],
    "edm2-img512-xs": ["unet.out_gain", "unet.emb_fourier.freqs", "unet.emb_fourier.phases", "unet.emb_noise.weight",
                       "unet.emb_label.weight", "unet.enc.64x64_conv.weight", "unet.enc.32x32_down.emb_gain",
                       "unet.enc.16x16_block0.attn_qkv.weight", "unet.enc.32x32_block0.conv_skip.weight",
                       "unet.dec.8x8_in0.attn_proj.weight", "unet.dec.64x64_block3.conv_res1.weight",
                       "unet.out_conv.weight"],
}


@pytest.mark.parametrize("arch", sorted(OFFICIAL_KEYS))
def test_a_state_dict_laid_out_as_the_official_one_loads(arch):
    label_dim = 1000 if arch.startswith(("adm", "edm2")) else 0
    family, net = build_arch(arch, label_dim)
    official = to_official_state(net, family)
    assert set(OFFICIAL_KEYS[arch]) <= set(official)
    if family == "edm2":  # the training-only uncertainty head of Precond is dropped
        official = {**official, "logvar_fourier.freqs": torch.zeros(128), "logvar_linear.weight": torch.zeros(1, 128)}
    torch.manual_seed(5)
    official = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in official.items()}
    _, fresh = build_arch(arch, label_dim)
    from_official_state(fresh, official, family)
    prefix = "model." if family == "edm" else "unet."
    assert all(torch.equal(v, official[prefix + k]) for k, v in fresh.state_dict().items())
    broken = dict(official)
    broken.pop(OFFICIAL_KEYS[arch][0])
    with pytest.raises(ValueError, match="not laid out as the official"):
        from_official_state(build_arch(arch, label_dim)[1], broken, family)


def test_official_layout_converts_to_safetensors_and_back(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    family, net = build_arch("ddpmpp-cifar10", 10)
    official = {k: v.contiguous() for k, v in to_official_state(net, family).items()}
    save_file(official, str(tmp_path / "official.safetensors"))
    ours = convert_teacher("edm", tmp_path / "official.safetensors", tmp_path / "teacher.safetensors",
                           arch="ddpmpp-cifar10", label_dim=10)
    teacher = load_teacher(str(ours))
    assert teacher.preconditioning == "edm" and teacher.num_classes == 10
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(teacher.x0(x, torch.tensor([0.5, 10.0]), class_labels=torch.tensor([1, 2]))).all()
    back = load_file(str(convert_teacher("safetensors", ours, tmp_path / "back.safetensors", to="edm")))
    assert back.keys() == official.keys() and all(torch.equal(back[k], official[k]) for k in official)
    with pytest.raises(ValueError, match="--arch"):
        load_official(tmp_path / "official.safetensors")


def test_official_pkl_needs_trust_and_runs_none_of_its_code(tmp_path, monkeypatch):
    """A pickle shaped like NVlabs' (persistence records holding their source code and state): refused without
    trust; with it, the weights and constructor arguments are read and the embedded source is never executed."""
    import pickle
    import types

    family, net = build_arch("ddpmpp-cifar10", 0)
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # what NVlabs' loader would call (it would exec module_src)
        raise AssertionError("never called at load")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", persistence)

    def record(module, class_name, kwargs=None):
        state = {"_parameters": dict(module._parameters), "_buffers": dict(module._buffers),
                 "_non_persistent_buffers_set": set(), "_modules": {k: record(m, type(m).__name__)
                                                                    for k, m in module._modules.items() if m is not None}}
        if kwargs is not None:
            state["_init_kwargs"] = kwargs
        return _Persistent({"type": "class", "version": 6, "module_src": "raise SystemExit('code ran')",
                            "module_name": "_imported_module_x", "class_name": class_name, "state": state})

    class _Persistent:
        def __init__(self, meta):
            self.meta = meta

        def __reduce__(self):
            return _reconstruct_persistent_obj, (self.meta,)

    precond = torch.nn.Module()  # EDMPrecond: the network under .model
    precond.model = net
    kwargs = dict(img_resolution=32, img_channels=3, label_dim=0, sigma_data=0.5, model_type="SongUNet",
                  **{k: v for k, v in ARCHS["ddpmpp-cifar10"][2].items() if k not in ("img_resolution", "in_channels",
                                                                                      "out_channels")})
    path = tmp_path / "edm.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": record(precond, "EDMPrecond", kwargs), "dataset_kwargs": {}}, f)
    monkeypatch.delitem(sys.modules, "torch_utils.persistence")
    with pytest.raises(ValueError, match="--trust_checkpoint true"):
        convert_teacher("edm", path, tmp_path / "t.safetensors")
    out = convert_teacher("edm", path, tmp_path / "t.safetensors", trust=True)
    loaded = load_checkpoint(out)["state_dict"]
    assert all(torch.equal(loaded[f"model.net.{k}"], v) for k, v in net.state_dict().items())


# ------------------------------------------------------------------------------------------------ GPU-scale configs
def _fake_cifar10(root):
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = torch.Generator().manual_seed(0)
    for name in ("data_batch_1", "test_batch"):
        data = torch.randint(0, 256, (8, 3072), generator=rng, dtype=torch.uint8).numpy()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": list(range(8))}, f)
    return root


def _dry_run_teacher(config: str, tmp_path):
    """A teacher file of the config's real architecture with random weights."""
    if config.endswith("cifar10_ddpm.yaml"):  # the teacher's architecture is written out in DMD2's config
        import yaml

        args = yaml.safe_load((ROOT / "configs/dmd2/cifar10_ddpm.yaml").read_text())["model"]["init_args"]["net"]["init_args"]
        torch.manual_seed(0)
        UNet2DModel(**args["unet_config"]).save_pretrained(str(tmp_path / "ddpm" / "unet"))
        DDPMScheduler(**{k: v for k, v in args["scheduler_config"].items() if not k.startswith("_")}).save_pretrained(
            str(tmp_path / "ddpm" / "scheduler"))
        return f"diffusers:{tmp_path / 'ddpm'}"
    from safetensors.torch import save_file

    label_dim = 10 if "dmd2" in config else 0
    family, net = build_arch("ddpmpp-cifar10", label_dim)
    save_file({k: v.contiguous() for k, v in to_official_state(net, family).items()}, str(tmp_path / "official.safetensors"))
    return str(convert_teacher("edm", tmp_path / "official.safetensors", tmp_path / "teacher.safetensors",
                               arch="ddpmpp-cifar10", label_dim=label_dim))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/dmd2/cifar10_edm.yaml", "configs/dmd2/cifar10_ddpm.yaml",
                                    "configs/scd/cifar10_edm.yaml", "configs/scd/cifar10_ddpm.yaml"])
def test_gpu_scale_config_dry_run(config, tmp_path):
    """2 iterations of the config on CPU (1 for DMD2, whose critic and generator then both step), with a
    random-weight teacher of the real architecture and a fake CIFAR-10; then the export and its picture (4 samples:
    64 took half the test's time), as a real run ends."""
    teacher = _dry_run_teacher(config, tmp_path)
    steps = ["--trainer.max_steps", "2", "--model.init_args.generator_every", "1"] if "dmd2" in config else \
        ["--trainer.max_steps", "2"]
    out = _run("fit", "--config", str(ROOT / config), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
               "--trainer.strategy", "auto", "--trainer.precision", "32-true", *steps,
               "--trainer.callbacks", "null", "--trainer.enable_progress_bar", "false",
               "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
               "--model.init_args.teacher_ckpt", teacher, "--data.root", str(_fake_cifar10(tmp_path / "data")),
               "--data.batch_size", "2", "--data.num_workers", "0", "--trainer.limit_val_batches", "0",
               "--picture_samples", "4", cwd=tmp_path)
    assert "exported" in out and "wrote a picture" in out


def test_official_pkl_reader_calls_nothing_but_tensor_rebuilding(tmp_path):
    """Even with trust, the .pkl reader resolves no callable outside tensors and plain containers (os.system here)."""
    import pickle

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": Evil()}))
    with pytest.raises(ValueError, match="holds no NVlabs network"):
        convert_teacher("edm", path, tmp_path / "x.safetensors", trust=True)
    assert not (tmp_path / "pwned").exists()


def test_class_conditional_teacher_and_a_student_built_from_it(tmp_path):
    """num_class_embeds: labels reach the UNet; a generator made the way DMD2 makes it (PreconditionedNet on a copy of
    teacher.net, teacher.preconditioning, teacher.sigma_data) is the teacher's function at the start."""
    import copy

    from lit_fewstep.diffusion.precond import PreconditionedNet

    torch.manual_seed(3)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, num_class_embeds=10).eval()
    teacher = load_diffusers_teacher(save_teacher(tmp_path, unet))
    assert teacher.num_classes == 10
    x, y, k = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 3, 9]), 400
    t = torch.full((4,), (k + 1) / T)
    ddim = DDIMScheduler.from_config(DDPMScheduler().config, clip_sample=False)
    ddim.set_timesteps(10)
    with torch.no_grad():
        ref = ddim.step(unet(x, k, class_labels=y).sample, k, x, eta=0.0).pred_original_sample
        close(teacher.x0_from(x, t, teacher.vp_path, class_labels=y), ref)
        other = teacher.x0_from(x, t, teacher.vp_path, class_labels=torch.tensor([1, 1, 1, 1]))
        assert (other - ref).abs().max() > 1e-3  # the label matters
        student = PreconditionedNet(copy.deepcopy(teacher.net), teacher.preconditioning, teacher.sigma_data)
        x_edm, sigma = convert(x, t, teacher.vp_path, EDMPath())
        close(student.x0_from(x_edm, sigma, EDMPath(), class_labels=y), ref, tol=1e-4)
        _, features = student(x_edm, sigma, class_labels=y, return_features=True)
        assert features.shape[1] == student.net.feature_channels == 32
