"""Checkpoints: a write that fails halfway leaves the previous checkpoint loadable and no
loadable partial one; tampered, truncated or partially uploaded files fail with one line
naming the file; loading never runs pickle code."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.model import VAE
from pipeline.model.config import ModelConfig
from pipeline.train import checkpoint
from pipeline.train.checkpoint import CHECKSUMS, CheckpointError

pytestmark = pytest.mark.timeout(60)
FILES = ["model.safetensors", "ema.safetensors", "optim.pt", "state.json"]


def make(seed: int):
    torch.manual_seed(seed)
    vae = VAE.from_config(ModelConfig(image_size=8, in_channels=1, channels=[2, 4], latent_dim=2))
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    vae(torch.rand(2, 1, 8, 8))[0].sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return vae, opt, sched


def save(d: Path, seed: int) -> VAE:
    vae, opt, sched = make(seed)
    checkpoint.save(
        d, model=vae, state={"step": seed, "config": {}}, optimizer=opt, scheduler=sched, ema=vae
    )
    return vae


def assert_loads(d: Path, vae: VAE, step: int):
    saved = checkpoint.load(d)
    assert saved["state"]["step"] == step
    for k, v in vae.state_dict().items():
        assert torch.equal(saved["model"][k], v) and torch.equal(saved["ema"][k], v)
    assert saved["optim"]["optimizer"]["state"][0]["step"] == 1


class Crash(OSError):
    pass


@pytest.mark.parametrize("fail_at", range(len(FILES) + 1))
def test_failed_write_leaves_previous_intact_and_no_partial(tmp_path, monkeypatch, fail_at):
    prev = save(tmp_path / "checkpoint_1", seed=1)
    real_write_bytes, real_write_text = Path.write_bytes, Path.write_text
    writes = []

    def failing(real):
        def write(self, data, *a, **k):
            writes.append(self.name)
            if len(writes) > fail_at:  # the disk fills / the store drops the connection
                if isinstance(data, bytes):
                    real_write_bytes(self, data[: len(data) // 2])  # half the file lands
                raise Crash(f"injected failure writing {self.name}")
            return real(self, data, *a, **k)

        return write

    monkeypatch.setattr(Path, "write_bytes", failing(real_write_bytes))
    monkeypatch.setattr(Path, "write_text", failing(real_write_text))
    with pytest.raises(Crash):
        save(tmp_path / "checkpoint_2", seed=2)
    monkeypatch.undo()
    assert len(writes) == fail_at + 1
    # the partial folder is not a checkpoint: checksums.json is published last, atomically
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(tmp_path / "checkpoint_2")
    assert str(err.value) == (
        f"{tmp_path / 'checkpoint_2' / CHECKSUMS}: missing or unreadable: not a complete checkpoint"
    )
    assert_loads(tmp_path / "checkpoint_1", prev, step=1)


def test_failed_rewrite_of_a_folder_is_not_a_mixed_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    save(d, seed=1)
    real = Path.write_bytes
    calls = []

    def write(self, data):
        calls.append(self.name)
        if self.name == "optim.pt":
            raise Crash("injected")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write)
    with pytest.raises(Crash):
        save(d, seed=2)  # new model + ema written, old optim.pt and state.json still there
    monkeypatch.undo()
    assert calls == ["model.safetensors", "ema.safetensors", "optim.pt"]
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        checkpoint.load(d)


@pytest.mark.parametrize(
    "present",
    [
        ["checksums.json", "state.json"],
        ["checksums.json", "model.safetensors", "state.json"],
        ["checksums.json", *FILES[:3]],
    ],
)
def test_partially_uploaded_checkpoint_is_refused(tmp_path, present):
    """An upload to the checkpoint store that stopped midway, in any file order."""
    save(tmp_path / "full", seed=1)
    (tmp_path / "part").mkdir()
    for name in present:
        shutil.copy(tmp_path / "full" / name, tmp_path / "part" / name)
    missing = next(f for f in FILES if f not in present)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(tmp_path / "part")
    assert str(err.value) == f"{tmp_path / 'part' / missing}: missing from checkpoint"


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("how", ["tampered", "truncated"])
def test_tampered_or_truncated_file_names_it(tmp_path, name, how):
    save(tmp_path, seed=1)
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    if how == "tampered":
        data[len(data) // 2] ^= 0x01  # one bit
    else:
        data = data[: len(data) - 7]
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(tmp_path)
    assert str(err.value) == f"{path}: checksum mismatch (tampered or truncated checkpoint)"


class Evil:
    """Unpickling this runs ``os.system``: the classic malicious checkpoint."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _forge(d: Path, name: str, data: bytes) -> None:
    """Replace ``name`` and fix up checksums.json, as an attacker with write access would."""
    (d / name).write_bytes(data)
    sums = json.loads((d / CHECKSUMS).read_text())
    sums[name] = hashlib.sha256(data).hexdigest()
    (d / CHECKSUMS).write_text(json.dumps(sums))


@pytest.mark.parametrize("name", ["optim.pt", "model.safetensors", "ema.safetensors"])
def test_malicious_pickle_is_never_executed(tmp_path, name):
    d = tmp_path / "ck"
    save(d, seed=1)
    pwned = tmp_path / "pwned"
    if name == "optim.pt":  # a torch.save zip whose data.pkl holds the payload
        import io

        buf = io.BytesIO()
        torch.save({"optimizer": Evil(pwned), "scheduler": {}}, buf)
        payload = buf.getvalue()
    else:
        payload = pickle.dumps({"weight": Evil(pwned)})
    _forge(d, name, payload)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(d)
    msg = str(err.value)
    assert msg.startswith(f"{d / name}: unreadable (") and "\n" not in msg, msg
    assert not pwned.exists()
    # the payload is live: plain pickle would have run it
    if name != "optim.pt":
        pickle.loads(payload)
        assert pwned.exists()
