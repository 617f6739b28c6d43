"""Importing reference-layout checkpoints: the Q-Former reproduces a brute-force forward on the raw
tensors, and the CLIP part round-trips through open_clip's real loading path."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from qks_pipeline.config import ModelConfig
from qks_pipeline.errors import QKSError
from qks_pipeline.stage_two.authors_checkpoint import export_clip_weights, load_reference_checkpoint
from qks_pipeline.stage_two.model import QKS
from tests.qks_reference_impl import random_reference_state, reference_scores

HEADS, QUERIES, LAYERS, FF = 2, 3, 2, 16
TINY = "QKSReferenceTestTiny"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# Q-Former width = ViT width, as in the reference
D, E = TINY_CFG["vision_cfg"]["width"], TINY_CFG["embed_dim"]


@pytest.fixture(scope="module")
def tiny_clip_state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    folder = tmp_path_factory.mktemp("clip_cfg")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    return open_clip.create_model(TINY, pretrained=None).state_dict()


@pytest.fixture(scope="module")
def raw(tiny_clip_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full reference-layout checkpoint: Q-Former, queries, proj, and CLIP without visual.proj."""
    sd = random_reference_state(LAYERS, QUERIES, D, E, FF, seed=3)
    sd |= {f"clip_model.{k}": v for k, v in tiny_clip_state.items() if k != "visual.proj"}
    return sd


def save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("layout", ["plain", "module", "state_dict", "model+module", "safetensors"])
def test_import_reproduces_brute_force(
    raw: dict[str, torch.Tensor], tmp_path: Path, layout: str
) -> None:
    prefixed = {f"module.{k}": v for k, v in raw.items()}
    path = {
        "plain": lambda: save(raw, tmp_path / "a.pth"),
        "module": lambda: save(prefixed, tmp_path / "a.pth"),
        "state_dict": lambda: save({"state_dict": raw, "epoch": 3}, tmp_path / "a.pth"),
        "model+module": lambda: save(
            {"model": prefixed, "optimizer": {"lr": 1e-5}}, tmp_path / "a.pth"
        ),
        "safetensors": lambda: (
            save_file(raw, tmp_path / "a.safetensors") or tmp_path / "a.safetensors"
        ),
    }[layout]()
    qks_state, clip_state, fields = load_reference_checkpoint(path)
    assert fields == {"num_queries": QUERIES, "num_layers": LAYERS, "ff_dim": FF}
    model = QKS(ModelConfig(num_heads=HEADS, **fields), *qks_state["proj"].shape)
    model.load_state_dict(qks_state, strict=True)
    tokens, labels = torch.randn(2, 5, D), torch.randn(4, E)
    with torch.no_grad():
        logits = model.eval()(tokens, labels)
    expected = reference_scores(raw, tokens, labels, HEADS).max(dim=1).values
    torch.testing.assert_close(logits.double(), expected, atol=1e-5, rtol=1e-5)
    assert not any(k.startswith(("net.", "clip_model.", "module.")) for k in clip_state)


def test_clip_export_round_trips_through_open_clip(
    raw: dict[str, torch.Tensor], tiny_clip_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    ckpt = save(raw, tmp_path / "ref.pth")
    qks_state, clip_state, _ = load_reference_checkpoint(ckpt)
    # the trained projection, documented choice
    torch.testing.assert_close(clip_state["visual.proj"], raw["proj"])
    image = torch.randn(1, 3, 32, 32)
    for name in ("clip.pt", "clip.safetensors"):
        export_clip_weights(clip_state, tmp_path / name)
        model, _, preprocess = open_clip.create_model_and_transforms(
            TINY, pretrained=str(tmp_path / name)
        )
        loaded = model.state_dict()
        assert set(loaded) == set(tiny_clip_state)
        for key, value in tiny_clip_state.items():
            torch.testing.assert_close(
                loaded[key], raw["proj"] if key == "visual.proj" else value, atol=0, rtol=0
            )
        with torch.no_grad():
            torch.testing.assert_close(
                model.encode_image(image), _pooled_cls(model, image) @ raw["proj"]
            )


def _pooled_cls(model: open_clip.model.CLIP, image: torch.Tensor) -> torch.Tensor:
    """The CLS token after ln_post, unprojected (the vision tower's projection switched off)."""
    proj, model.visual.proj = model.visual.proj, None
    try:
        return model.visual(image)
    finally:
        model.visual.proj = proj


def test_checkpoint_without_clip(raw: dict[str, torch.Tensor], tmp_path: Path) -> None:
    head_only = {k: v for k, v in raw.items() if not k.startswith("clip_model.")}
    _, clip_state, _ = load_reference_checkpoint(save(head_only, tmp_path / "h.pth"))
    assert clip_state == {}


def test_incomplete_qformer_is_refused(raw: dict[str, torch.Tensor], tmp_path: Path) -> None:
    broken = {
        k: v for k, v in raw.items() if k != "net.encoder.layer.1.crossattention.self.key.weight"
    }
    with pytest.raises(QKSError, match="layers.1.cross_attn.key.weight"):
        load_reference_checkpoint(save(broken, tmp_path / "b.pth"))


def test_unknown_qformer_part_is_refused(raw: dict[str, torch.Tensor], tmp_path: Path) -> None:
    extra = raw | {"net.encoder.layer.0.adapter.dense.weight": torch.zeros(2, 2)}
    with pytest.raises(QKSError, match="adapter"):
        load_reference_checkpoint(save(extra, tmp_path / "x.pth"))


def test_pickled_objects_need_trust(raw: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = save({"state_dict": raw, "args": argparse.Namespace(lr=1e-5)}, tmp_path / "p.pth")
    with pytest.raises(QKSError, match="pass --trust-pickle if you trust its source"):
        load_reference_checkpoint(path)
    assert load_reference_checkpoint(path, trust_pickle=True)[2]["num_layers"] == LAYERS


def test_missing_or_foreign_file(tmp_path: Path) -> None:
    with pytest.raises(QKSError, match="not found"):
        load_reference_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(QKSError, match="not a QKS checkpoint"):
        load_reference_checkpoint(save({"weight": torch.zeros(3)}, tmp_path / "other.pth"))


def test_keys_outside_the_layout_are_ignored_with_a_warning(
    raw: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = save(raw | {"label_emb": torch.zeros(4, E)}, tmp_path / "w.pth")
    with pytest.warns(UserWarning, match="ignoring 1 key.*label_emb"):
        qks_state, _, _ = load_reference_checkpoint(path)
    assert "label_emb" not in qks_state


@pytest.mark.parametrize("name", ["bad.pth", "bad.safetensors"])
def test_unreadable_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"not a checkpoint at all")
    with pytest.raises(QKSError, match="cannot read checkpoint"):
        load_reference_checkpoint(tmp_path / name)
