"""End to end through the real Hydra configs and `amortized3d.train.train` (tiny sizes)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from amortized3d.guidance.base import GuidanceInput, GuidanceOutput
from amortized3d.guidance.sds import SDSGuidance
from amortized3d.train import train
from conftest import ROOT, compose


def _generator_state(ckpt_path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("model.generator.")}


def test_per_prompt_ingp_trains_validates_and_skips_unseen_prompts(tmp_path, cache_dir):
    metrics = train(compose(tmp_path, cache_dir, "generator=ingp", "evaluation.splits=[train,val]",
                            "evaluation.num_views=4"))
    assert metrics["training"]["generator"] == "IngpGenerator"
    assert metrics["oracle"]["train"]["overall"]["num_prompts"] == 24
    assert metrics["oracle"]["val"]["held_out"]["num_prompts"] == 0  # cannot render unseen prompts
    assert metrics["oracle"]["val"]["seen"]["num_prompts"] == 6


def test_train_writes_checkpoint_metrics_and_video(tmp_path, cache_dir):
    cfg = compose(tmp_path, cache_dir, "evaluation.splits=[train,val]", "evaluation.videos=val",
                  "evaluation.num_views=6")
    metrics = train(cfg)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "renders" / "val").glob("step_*.png")
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["training"]["steps"] == 3 and on_disk["training"]["nonfinite_steps"] == 0
    for split in ("train", "val"):
        oracle = on_disk["oracle"][split]["overall"]
        assert 0.0 <= oracle["r_at_1"] <= 1.0 and oracle["psnr"] > 0
    assert on_disk["oracle"]["val"]["held_out"]["num_prompts"] == 6
    videos = sorted((tmp_path / "videos").glob("*.mp4"))
    assert len(videos) == 12 and all(v.stat().st_size > 0 for v in videos)
    assert metrics["oracle"] == on_disk["oracle"]


# The per-prompt iNGP with sparse updates (LazyAdam's per-row step counts, 2 particles per prompt): its
# optimizer state must round-trip too. A small grid keeps its 24 x 2 tables' checkpoints small.
SPARSE = ["generator=ingp", "generator.sparse_updates=true", "generator.num_particles=2",
          "generator.encoding.n_levels=4", "generator.encoding.log2_hashmap_size=10", "system.optimizer.betas=[0.9,0.99]"]


@pytest.mark.parametrize("extra", [[], SPARSE], ids=["hyper_ingp", "ingp_sparse_updates"])
def test_resume_matches_uninterrupted_run(tmp_path, cache_dir, extra):
    """Interrupted at step 4 and resumed with ckpt_path == one uninterrupted 8-step run."""
    common = ["trainer.max_steps=8", "callbacks.checkpoint.every_n_train_steps=4", "trainer.val_check_interval=4",
              *extra]
    train(compose(tmp_path / "full", cache_dir, *common))
    train(compose(tmp_path / "part", cache_dir, *common[1:], "trainer.max_steps=4"))
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 4
    start = _generator_state(ckpt)
    train(compose(tmp_path / "part", cache_dir, *common, f"ckpt_path={ckpt}"))
    full = _generator_state(tmp_path / "full" / "checkpoints" / "last.ckpt")
    resumed = _generator_state(tmp_path / "part" / "checkpoints" / "last.ckpt")
    assert full.keys() == resumed.keys() and len(full) > 0
    for key in full:
        if isinstance(full[key], torch.Tensor):
            assert torch.equal(full[key], resumed[key]), key
        else:  # e.g. the hash grid's implementation tag
            assert full[key] == resumed[key], key
    # and training really moved the parameters after the resume
    assert any(not torch.equal(start[k], full[k]) for k in full if isinstance(full[k], torch.Tensor))
    states = [torch.load(d / "checkpoints" / "last.ckpt", weights_only=False)["optimizer_states"][0]["state"]
              for d in (tmp_path / "full", tmp_path / "part")]
    assert states[0].keys() == states[1].keys()
    for i in states[0]:
        for name, value in states[0][i].items():
            assert torch.equal(value, states[1][i][name]), (i, name)
    if extra:  # the lazy state: a step count per instance, some instances never trained
        steps = states[0][0]["step"]
        assert steps.shape == (48,) and int(steps.sum()) == 8 * 2 and int((steps == 0).sum()) > 0


class _NaNEverySecondStep(SDSGuidance):
    """Fault injection: a real SDS whose loss is NaN on odd steps."""

    def forward(self, inp: GuidanceInput) -> GuidanceOutput:
        out = super().forward(inp)
        if inp.step % 2 == 1:
            out.losses["sds"] = out.losses["sds"] * float("nan")
        return out


def test_nonfinite_gradients_are_skipped_and_counted(tmp_path, cache_dir):
    from amortized3d.build import build_system

    cfg = compose(tmp_path, cache_dir, "trainer.max_steps=4")
    system, prior, corpus = build_system(cfg)
    nan_guidance = _NaNEverySecondStep(prior, guidance_scale=7.5)
    system.guidance = nan_guidance
    import lightning as L

    from amortized3d.data import PromptDataModule

    before = {k: v.clone() for k, v in system.generator.state_dict().items() if isinstance(v, torch.Tensor)}
    dm = PromptDataModule(system.train_prompts, corpus.unique("val"), batch_size=2)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
                        use_distributed_sampler=False)
    trainer.fit(system, datamodule=dm)
    # steps 0, 2, 4 update; steps 1, 3 are NaN and skipped: 3 updates take 5 steps
    assert system.nonfinite_steps == 2 and system.batch_index == 5 and trainer.global_step == 3
    after = {k: v for k, v in system.generator.state_dict().items() if isinstance(v, torch.Tensor)}
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], v) for k, v in after.items())


def test_unknown_config_choice_lists_valid_options():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "guidance=nope"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0
    assert "sds" in result.stderr and "nope" in result.stderr


def test_unparseable_prompt_for_analytic_world_names_valid_words(tmp_path, cache_dir):
    from amortized3d.build import build_system

    corpus = tmp_path / "c.json"
    corpus.write_text(json.dumps({"train": ["a squirrel on a motorbike"], "val": ["a red cube"]}))
    system, prior, _ = build_system(compose(tmp_path, cache_dir, f"data.corpus_path={corpus}"))
    with pytest.raises(ValueError, match="valid shapes"):
        prior.text_condition(["a squirrel on a motorbike"])


def test_package_imports_without_cuda_or_tinycudann():
    code = ("import sys; sys.modules['tinycudann'] = None\n"
            "import importlib, pkgutil, amortized3d\n"
            "for m in pkgutil.walk_packages(amortized3d.__path__, 'amortized3d.'):\n"
            "    importlib.import_module(m.name)\n"
            "import torch; assert not torch.cuda.is_available()\n"
            "from amortized3d.generators.encodings import HashGridEncoding\n"
            "assert HashGridEncoding(n_levels=2, log2_hashmap_size=10).implementation == 'torch'\n"
            "assert HashGridEncoding(n_levels=2, log2_hashmap_size=8, implementation='auto').implementation == 'torch'\n"
            "assert sys.modules['tinycudann'] is None\n")  # auto detection tried no other import
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr


def test_wandb_logger_works_offline(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    train(compose(tmp_path, cache_dir, "logger=wandb", "logger.wandb.offline=true", "trainer.max_steps=2",
                  f"callbacks.validation_metrics.video_dir={tmp_path / 'val_videos'}"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, f"no offline wandb run under {tmp_path / 'wandb'}"
    # the validation turntable (ValidationMetrics) reached wandb's media
    assert list(runs[0].glob("files/media/videos/val/turntable_*.mp4"))
    assert (tmp_path / "csv" / "metrics.csv").is_file()
