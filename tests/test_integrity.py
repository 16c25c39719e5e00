"""Issue 18, integrity rows: each test injects the fault for real (flipped bytes, empty files, a
pickle payload, NaN weights, a full filesystem, look-alike prompts, an offline hub id, padded
prompts) and checks the loud, path-naming failure (or the safe recovery) that the project promises.

Rows: 2 (checksums), 8 (NaN checkpoint in evaluate), 10 (unique slugs), 12 (bad .ckpt names its
path), 13 (ENOSPC), 14 (hub id vs path), 15 (pickle payload), 16 (empty/padded prompts).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from amortized3d.train import train
from conftest import CONFIGS, ROOT, SHARED_CORPORA, compose


def compose_task(task: str, output_dir: Path, cache_dir: Path, *overrides: str):
    """The real `configs/<task>.yaml` composition (evaluate/export), as its script would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    base = [f"paths.output_dir={output_dir}", f"paths.cache_dir={cache_dir}", f"paths.root_dir={ROOT}",
            "render.num_views=4", "device=cpu"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hydra_compose(task, overrides=base + list(overrides))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(compose(out, cache_dir))
    return out / "checkpoints" / "last.ckpt"


def _flip(path: Path, at: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for k in range(at, at + n):
        data[k] ^= 0xA5
    path.write_bytes(bytes(data))


def _tensor_data_offset(path: Path, member_suffix: str = "/data/0") -> int:
    """Where the bytes of a torch file's first tensor storage start (a zip member, stored uncompressed)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member_suffix))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    import random

    noise = random.Random(0).randbytes(4096)
    files = {"empty": b"", "noise": b"\x00" + noise,  # neither a zip archive nor a pickle
             "pickle-like noise": b"\x80\x02" + noise, "truncated zip": b"PK\x03\x04" + noise}
    for name, data in files.items():
        (tmp_path / f"{name.replace(' ', '_')}.ckpt").write_bytes(data)
    return {name: tmp_path / f"{name.replace(' ', '_')}.ckpt" for name in files}


# ---------------------------------------------------------------- row 2: checksums
def test_row2_checkpoint_with_flipped_bytes_is_refused_with_its_path(tmp_path):
    from amortized3d.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.randn(256, 256)}, "global_step": 4}, path)
    assert io.load_checkpoint(path)["global_step"] == 4  # intact: loads
    _flip(path, _tensor_data_offset(path) + 1000)  # 64 bytes of the weights: torch.load alone does not notice
    with pytest.raises(ValueError, match="damaged") as err:
        io.load_checkpoint(path)
    assert str(path) in str(err.value) and "sha256" in str(err.value)


def test_row2_trained_checkpoint_damage_is_refused_by_evaluate_and_export(tmp_path, cache_dir, checkpoint):
    from amortized3d.evaluation.checkpoint import load_model

    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(checkpoint.read_bytes())
    _flip(damaged, _tensor_data_offset(damaged, "/data/3"))
    with pytest.raises(ValueError, match="damaged") as err:
        load_model(damaged, [f"paths.cache_dir={cache_dir}"])
    assert str(damaged) in str(err.value)
    from amortized3d.evaluation.exporting import export

    with pytest.raises(ValueError, match="damaged"):
        export(compose_task("export", tmp_path / "x", cache_dir, f"ckpt_path={damaged}", "prompt=a red cube"))


def test_row2_resume_refuses_a_damaged_last_ckpt(tmp_path, cache_dir, checkpoint):
    damaged = tmp_path / "last.ckpt"
    damaged.write_bytes(checkpoint.read_bytes())
    _flip(damaged, _tensor_data_offset(damaged, "/data/1"))
    with pytest.raises(ValueError, match="damaged") as err:
        train(compose(tmp_path / "resumed", cache_dir, "trainer.max_steps=5", f"ckpt_path={damaged}"))
    assert str(damaged) in str(err.value)


def _reference_set(cache: Path):
    from amortized3d.scenes.references import build_reference_set

    camera = {"distance": [3.0, 3.0], "fovy_deg": [40.0, 40.0], "elevation_deg": [0.0, 30.0],
              "azimuth_deg": [-180.0, 180.0]}
    return build_reference_set("primitives", 2, 8, camera, str(cache), seed=7)


def test_row2_damaged_reference_cache_is_rebuilt_with_a_warning(tmp_path, caplog):
    fresh = _reference_set(tmp_path).images
    (path,) = (tmp_path / "references").glob("*.pt")
    _flip(path, _tensor_data_offset(path) + 4 * 100)  # 16 pixels' worth of floats
    with caplog.at_level(logging.WARNING, logger="amortized3d.scenes.references"):
        rebuilt = _reference_set(tmp_path).images
    assert torch.equal(rebuilt, fresh)  # the damage never reaches the prior
    assert any(str(path) in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="amortized3d.scenes.references"):
        assert torch.equal(_reference_set(tmp_path).images, fresh)  # the rewritten cache verifies
    assert not caplog.records


def test_row2_reference_cache_with_a_nan_pixel_is_rebuilt(tmp_path, caplog):
    fresh = _reference_set(tmp_path).images
    (path,) = (tmp_path / "references").glob("*.pt")
    poisoned = fresh.clone()
    poisoned[3, 1, 4, 4] = float("nan")
    from amortized3d.checkpoint_io import save_torch

    save_torch(poisoned, path)  # a valid checksum over a NaN pixel (as if rendered by a broken renderer)
    with caplog.at_level(logging.WARNING, logger="amortized3d.scenes.references"):
        assert torch.equal(_reference_set(tmp_path).images, fresh)
    assert any("non-finite" in r.getMessage() for r in caplog.records)


def test_row2_checksum_travels_inside_the_file_and_keeps_it_a_standard_torch_file(tmp_path):
    import zipfile

    from amortized3d.checkpoint_io import recorded_checksum, save_torch, verify_checksum

    path = save_torch({"w": torch.arange(10)}, tmp_path / "a" / "x.ckpt")
    assert os.listdir(path.parent) == ["x.ckpt"]  # no sidecar, no temp file
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(10))  # plain torch.load still works
    assert zipfile.ZipFile(path).testzip() is None
    copy = tmp_path / "copy.ckpt"
    copy.write_bytes(path.read_bytes())
    assert verify_checksum(copy) and len(recorded_checksum(copy)) == 64
    for damaged in (path.read_bytes()[:-10], path.read_bytes() + b"\0" * 7, path.read_bytes()[:-40] + b"x" * 40):
        copy.write_bytes(damaged)  # truncated, appended to, checksum record overwritten
        with pytest.raises(ValueError, match="damaged|corrupt"):
            verify_checksum(copy)
    # a plain torch.save file (no record) is recognised as such, even when its name looks like ours
    legacy = tmp_path / "amortized3d-sha256-run.ckpt"
    torch.save({"w": torch.arange(3)}, legacy)
    assert recorded_checksum(legacy) is None and verify_checksum(legacy) is False


# ---------------------------------------------------------------- row 12: bad files name their path
def test_row12_empty_and_random_checkpoints_name_path_in_every_loader(tmp_path, cache_dir):
    from amortized3d.checkpoint_io import AtomicCheckpointIO
    from amortized3d.evaluation.checkpoint import load_model
    from amortized3d.evaluation.evaluate import evaluate
    from amortized3d.evaluation.exporting import export

    for kind, path in _bad_files(tmp_path).items():
        what = {"empty": "is empty (0 bytes)", "noise": "is not a torch file"}.get(kind, "not a readable torch file")
        loaders = {
            "lightning resume io": lambda: AtomicCheckpointIO().load_checkpoint(path),
            "load_model": lambda: load_model(path),
            "evaluate": lambda: evaluate(compose_task("evaluate", tmp_path / "e", cache_dir, f"ckpt_path={path}",
                                                      "evaluator=oracle")),
            "export": lambda: export(compose_task("export", tmp_path / "x", cache_dir, f"ckpt_path={path}",
                                                  "prompt=a red cube")),
        }
        for name, load in loaders.items():
            with pytest.raises(ValueError) as err:
                load()
            assert str(path) in str(err.value) and what in str(err.value), (kind, name, str(err.value))


def test_row12_resume_from_an_empty_checkpoint_names_it(tmp_path, cache_dir):
    path = _bad_files(tmp_path)["empty"]
    with pytest.raises(ValueError, match="empty") as err:
        train(compose(tmp_path / "run", cache_dir, "trainer.max_steps=4", f"ckpt_path={path}"))
    assert str(path) in str(err.value)


# ---------------------------------------------------------------- row 15: pickle payloads never run
class _Payload:
    """Unpickling this writes a marker file: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


def test_row15_pickle_payload_does_not_run_in_evaluate_export_or_resume(tmp_path, cache_dir, checkpoint):
    from amortized3d.checkpoint_io import AtomicCheckpointIO
    from amortized3d.evaluation.checkpoint import load_model
    from amortized3d.evaluation.exporting import export

    marker = tmp_path / "marker"
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["payload"] = _Payload(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    loaders = {
        "load_model": lambda: load_model(evil, [f"paths.cache_dir={cache_dir}"]),
        "export": lambda: export(compose_task("export", tmp_path / "x", cache_dir, f"ckpt_path={evil}",
                                              "prompt=a red cube")),
        "lightning resume io": lambda: AtomicCheckpointIO().load_checkpoint(evil),
        "train resume": lambda: train(compose(tmp_path / "run", cache_dir, "trainer.max_steps=5",
                                              f"ckpt_path={evil}")),
    }
    for name, load in loaders.items():
        with pytest.raises(ValueError) as err:
            load()
        assert not marker.exists(), f"{name}: the payload ran"
        msg = str(err.value)
        assert str(evil) in msg and "refused" in msg and "GLOBAL exec" in msg, (name, msg)


# ---------------------------------------------------------------- row 8: NaN checkpoint in evaluate
def _nan_checkpoint(checkpoint: Path, path: Path) -> Path:
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for key, value in ckpt["state_dict"].items():
        if key.startswith("model.generator.") and isinstance(value, torch.Tensor) and value.is_floating_point():
            value.fill_(float("nan"))
    torch.save(ckpt, path)
    return path


def test_row8_nan_checkpoint_fails_evaluation_naming_the_prompt(tmp_path, cache_dir, checkpoint):
    from amortized3d.evaluation.evaluate import evaluate

    nan = _nan_checkpoint(checkpoint, tmp_path / "nan.ckpt")
    cfg = compose_task("evaluate", tmp_path / "out", cache_dir, f"ckpt_path={nan}", "evaluator=oracle",
                       "split=val", "grid_views=0")
    with pytest.raises(ValueError, match="non-finite") as err:
        evaluate(cfg)
    assert "prompt 'a " in str(err.value)  # names the prompt (primitives prompts start with "a ")
    assert not (tmp_path / "out" / "metrics.json").exists()  # never scored


def test_row8_evaluate_script_exits_nonzero_on_a_nan_checkpoint(tmp_path, cache_dir, checkpoint):
    nan = _nan_checkpoint(checkpoint, tmp_path / "nan.ckpt")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), f"ckpt_path={nan}",
                           "evaluator=oracle", "split=val", "grid_views=0", "device=cpu", "render.num_views=4",
                           f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={cache_dir}"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "non-finite" in proc.stderr and "prompt" in proc.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_row8_metrics_json_is_strict(tmp_path, cache_dir, checkpoint):
    from amortized3d.evaluation.evaluate import evaluate

    evaluate(compose_task("evaluate", tmp_path, cache_dir, f"ckpt_path={checkpoint}", "evaluator=oracle",
                          "split=val", "grid_views=0"))

    def reject(constant):
        raise AssertionError(f"metrics.json holds {constant}, not strict JSON")

    metrics = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=reject)
    assert 0.0 <= metrics["oracle"]["overall"]["r_at_1"] <= 1.0


# ---------------------------------------------------------------- row 10: unique output names
def test_row10_prompts_that_slugify_alike_get_distinct_names():
    from amortized3d.evaluation.orbit import slugify as orbit_slugify
    from amortized3d.slugs import slugify

    names = {slugify(p) for p in ("a red cube 🎲", "A red cube!", "a red cube", "a_red_cube")}
    assert len(names) == 4 and all(n.startswith("a_red_cube_") for n in names)
    assert orbit_slugify is slugify  # one slugifier: videos (final, callbacks), grids and exports
    assert slugify("a red cube") == slugify("a red cube")  # stable across calls and processes
    assert all(c.isalnum() or c == "_" for c in slugify("../../etc/passwd \x00 é"))
    assert slugify("🎲").startswith("prompt_") and len(slugify("x" * 500)) <= 80


def test_row10_exported_videos_of_lookalike_prompts_do_not_overwrite(tmp_path, cache_dir, checkpoint):
    from amortized3d.evaluation.exporting import export

    written = []
    for prompt in ("a red cube 🎲", "A red cube!"):
        written += export(compose_task("export", tmp_path, cache_dir, f"ckpt_path={checkpoint}",
                                       f"prompt='{prompt}'", "format=gif", "render.resolution=8"))
    assert len(set(written)) == 2 and all(p.is_file() for p in written)
    assert len(list(tmp_path.glob("*.gif"))) == 2


# ---------------------------------------------------------------- row 13: full disks
def test_row13_torch_save_to_dev_full_is_reported_as_enospc(tmp_path):
    from amortized3d.atomic import disk_full_error
    from amortized3d.checkpoint_io import write_torch

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this OS")
    with pytest.raises(Exception) as raw:
        with open("/dev/full", "wb") as f:
            write_torch({"w": torch.zeros(1 << 20)}, f)
            f.flush()
    target = tmp_path / "checkpoints" / "last.ckpt"
    err = disk_full_error(raw.value, target)
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert str(target) in str(err) and "no space left" in str(err) and "bytes free" in str(err)
    # torch's own wording for a failed zip write is not misreported as ENOSPC where space is left
    assert disk_full_error(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 0"),
                           target) is None


@pytest.fixture
def full_fs(tmp_path):
    """A real 64 KiB tmpfs (needs root / CAP_SYS_ADMIN; skipped otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); "
                    "test_row13_torch_save_to_dev_full_is_reported_as_enospc covers the translation")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_row13_checkpoint_on_a_full_filesystem_raises_enospc_naming_the_path(full_fs):
    from amortized3d.checkpoint_io import AtomicCheckpointIO

    path = full_fs / "checkpoints" / "last.ckpt"
    with pytest.raises(OSError) as err:
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1 << 16)}, path)
    assert err.value.errno == errno.ENOSPC and str(path) in str(err.value)
    assert os.listdir(path.parent) == []  # the temp file is removed


def test_row13_reference_cache_on_a_full_filesystem_keeps_the_renders(full_fs, caplog):
    (full_fs / "filler").write_bytes(b"\0" * (60 << 10))
    with caplog.at_level(logging.WARNING, logger="amortized3d.scenes.references"):
        refs = _reference_set(full_fs)
    assert torch.isfinite(refs.images).all() and len(refs.images) > 0
    assert any("No space left" in r.getMessage() or "no space left" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- row 14: hub id vs path
def test_row14_hub_id_and_paths_are_told_apart():
    from amortized3d.sd_loading import missing_weights_message

    hub = missing_weights_message("nobody/not-a-model", "unet")
    assert "hub id 'nobody/not-a-model'" in hub and "huggingface-cli download nobody/not-a-model" in hub
    assert "local directory" not in hub
    for path in ("/nonexistent", "./models/sd", "../sd", "~/sd15", "models/sd/v1"):
        msg = missing_weights_message(path, "unet")
        assert "local directory" in msg and "does not exist" in msg, path
        assert "huggingface-cli download" not in msg and "hub id" not in msg.split(".")[0], path


def test_row14_offline_hub_id_through_the_real_loader(tmp_path, monkeypatch):
    from diffusers import DDPMScheduler

    from amortized3d.sd_loading import MissingWeightsError, load_component

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as err:
        load_component(DDPMScheduler, "nobody/not-a-model", "scheduler", local_files_only=True)
    assert "hub id 'nobody/not-a-model'" in str(err.value) and "local directory" not in str(err.value)
    missing = tmp_path / "nope"
    with pytest.raises(MissingWeightsError) as err:
        load_component(DDPMScheduler, str(missing), "scheduler", local_files_only=True)
    assert f"local directory {missing}" in str(err.value) and "huggingface-cli" not in str(err.value)


# ---------------------------------------------------------------- row 16: empty / padded prompts
@pytest.mark.parametrize("prompt, what", [(" a red cube", "leading/trailing whitespace"),
                                          ("a red cube\t", "leading/trailing whitespace"),
                                          ("   ", "empty prompt")])
def test_row16_json_corpus_rejects_padded_prompts_with_file_and_line(tmp_path, prompt, what):
    from amortized3d.corpora import CorpusError, load_corpus

    path = tmp_path / "mine.json"
    path.write_text('{\n  "train": [\n    "a red cube",\n    ' + json.dumps(prompt) + '\n  ]\n}\n')
    with pytest.raises(CorpusError) as err:
        load_corpus(path)
    assert f"{path}:4:" in str(err.value) and "'train' item 1" in str(err.value) and what in str(err.value)


@pytest.mark.parametrize("prompt", ["''", "' a red cube'", "'a red cube '"])
def test_row16_export_rejects_empty_and_padded_prompts_before_loading(tmp_path, cache_dir, prompt):
    from amortized3d.evaluation.exporting import export

    missing = tmp_path / f"{uuid.uuid4().hex}.ckpt"  # never read: the prompt is checked first
    with pytest.raises(ValueError) as err:
        export(compose_task("export", tmp_path, cache_dir, f"ckpt_path={missing}", f"prompt={prompt}"))
    assert "export prompt=" in str(err.value)
    assert "empty prompt" in str(err.value) or "leading/trailing whitespace" in str(err.value)


def test_row16_evaluate_rejects_a_padded_corpus(tmp_path, cache_dir, checkpoint):
    from amortized3d.evaluation.evaluate import evaluate

    corpus = tmp_path / "other.json"
    corpus.write_text(json.dumps({"train": ["a red cube"], "test": ["a blue torus "]}))
    with pytest.raises(ValueError, match="leading/trailing whitespace") as err:
        evaluate(compose_task("evaluate", tmp_path / "out", cache_dir, f"ckpt_path={checkpoint}",
                              "evaluator=oracle", "data=primitives", f"data.corpus_path={corpus}", "grid_views=0"))
    assert str(corpus) in str(err.value)


def test_row16_published_corpus_keeps_its_padded_prompts_verbatim():
    path = SHARED_CORPORA / "dreamfusion_415_prompt_library.json"
    if not path.is_file():
        pytest.skip(f"DF415 not available at {path}")
    from amortized3d.corpora import load_corpus

    corpus = load_corpus("df415", path=path)  # pinned by the manifest's sha256: loaded as published
    assert "  Coffee cup with many holes" in corpus.split("train")


# ---------------------------------------------------------------- row 2 keeps atomicity
_WRITER = """
import sys, torch
from amortized3d.checkpoint_io import AtomicCheckpointIO
io, n = AtomicCheckpointIO(), 0
while True:
    n += 1
    io.save_checkpoint({"state_dict": {"w": torch.full((1 << 21,), float(n))}, "global_step": n}, sys.argv[1])
    print(n, flush=True)
"""


@pytest.mark.slow  # 4 fresh interpreters (torch + lightning imports): ~45 s on a loaded 2-core machine
def test_row2_sigkill_during_checksummed_writes_leaves_a_verified_last_ckpt(tmp_path):
    """SIGKILL at staggered moments of a loop of 8 MiB checksummed saves: last.ckpt always verifies."""
    import random
    import signal
    import time

    from amortized3d.checkpoint_io import load_torch, verify_checksum

    path = tmp_path / "last.ckpt"
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                                env=env)
        proc.stdout.readline()  # one save completed
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert verify_checksum(path)
        ckpt = load_torch(path)
        assert bool((ckpt["state_dict"]["w"] == ckpt["global_step"]).all())
