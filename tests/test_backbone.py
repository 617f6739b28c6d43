"""The backbone: real open_clip loading, visual tokens, label embeddings, fingerprint, refusals."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import warnings

import open_clip
import pytest
import torch

from qks_pipeline.errors import QKSError, shorten
from qks_pipeline.stage_one.backbone import (
    check_supported,
    encode_labels,
    load_backbone,
    offline_hint,
    token_shape,
    visual_tokens,
)


@pytest.fixture(scope="module")
def tiny(tiny_clip):
    config, weights = tiny_clip
    return load_backbone(str(config), str(weights), "cpu")


def test_load_uses_the_weights_file_and_freezes(tiny, tiny_clip):
    model = tiny.model
    saved = torch.load(tiny_clip[1], weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert not model.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert token_shape(model) == (17, 64)  # (64 / 16)^2 patches + CLS, width 64


def _manual_tokens(visual, images: torch.Tensor) -> torch.Tensor:
    """conv1 -> CLS + positions -> ln_pre -> transformer -> ln_post, written out by hand."""
    x = visual.conv1(images)  # (B, D, g, g)
    x = x.flatten(2).transpose(1, 2)  # (B, g*g, D)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, D)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding  # (B, T, D)
    x = visual.transformer(visual.ln_pre(x))
    return visual.ln_post(x)


def test_visual_tokens_match_a_manual_pass(tiny):
    model = tiny.model
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    tokens = visual_tokens(model, images)
    assert tokens.shape == (3, 17, 64)
    with torch.no_grad():
        torch.testing.assert_close(tokens, _manual_tokens(model.visual, images), rtol=0, atol=1e-6)
        # CLS before the projection: projecting it gives open_clip's own image embedding
        torch.testing.assert_close(
            tokens[:, 0] @ model.visual.proj, model.encode_image(images), rtol=1e-5, atol=1e-6
        )
    # restored after the call
    assert model.visual.proj is not None and model.visual.output_tokens is False


def test_encode_labels_is_the_plain_mean_over_templates(tiny):
    model, tokenizer = tiny.model, tiny.tokenizer
    labels = ["cat", "red car", "tree"]
    templates = ["a photo of a {}.", "{} in the scene.", "a {}!"]
    emb = encode_labels(model, tokenizer, labels, templates, batch_labels=2)
    assert emb.shape == (3, 32)
    with torch.no_grad():
        for i, label in enumerate(labels):
            feats = model.encode_text(tokenizer([t.format(label) for t in templates]))  # (M, E)
            torch.testing.assert_close(emb[i], feats.mean(0), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(emb.norm(dim=-1), torch.ones(3))  # unnormalised, as in the reference
    normed = encode_labels(model, tokenizer, labels, templates, normalize=True)
    torch.testing.assert_close(
        normed, torch.nn.functional.normalize(emb, dim=-1), rtol=1e-5, atol=1e-6
    )


def _cut_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "cut at the text encoder" in r.getMessage()]


def test_a_label_cut_by_the_context_length_is_warned_about(tiny, caplog):
    """77 tokens: start, 75 words, end fill the context exactly; one word more is cut."""
    fits = " ".join(["word"] * 75)
    cut = " ".join(["word"] * 76)
    assert tiny.tokenizer([fits])[0, -1] != 0
    with caplog.at_level(logging.WARNING, logger="qks_pipeline.stage_one.backbone"):
        encode_labels(tiny.model, tiny.tokenizer, ["red", fits], ["{}"])
        assert _cut_warnings(caplog) == []
        encode_labels(tiny.model, tiny.tokenizer, ["red", fits, cut], ["{}", "a {}"])
    (message,) = _cut_warnings(caplog)
    # `fits` is cut in its second template, `cut` in both
    assert message.startswith("2 label(s) cut at the text encoder's context of 77 tokens")
    assert message.endswith(f"(in some template): {shorten(f'{fits}, {cut}')}")
    assert len(message) < 300


def test_label_embedding_shows_a_progress_bar_when_asked(tiny, capsys):
    encode_labels(tiny.model, tiny.tokenizer, ["red", "blue", "tree"], ["a {}"], progress=True)
    assert "embed labels: 100%" in capsys.readouterr().err
    # None: on a terminal only (pytest's stderr is not one)
    encode_labels(tiny.model, tiny.tokenizer, ["red"], ["a {}"])
    assert capsys.readouterr().err == ""


def test_fingerprint_and_source_name_weights_preprocessing_and_layout(tiny, tiny_clip, tmp_path):
    config, weights = tiny_clip
    fp = tiny.fingerprint
    assert tiny.source == {"model": str(config.resolve()), "pretrained": str(weights.resolve())}
    assert fp["model"] == "TinyCLIP-test" and len(fp["model_config_sha256"]) == 64
    assert fp["token_shape"] == [17, 64] and fp["visual_proj"] == [64, 32]
    assert fp["preprocess"]["size"] == [64, 64] and fp["preprocess"]["interpolation"] == "bicubic"
    assert fp["preprocess"]["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
    json.dumps(fp)  # storable as a Zarr attribute
    other = tmp_path / "other.pt"
    state = torch.load(weights, weights_only=True)
    state["visual.proj"] = state["visual.proj"] + 1
    torch.save(state, other)
    fp2 = load_backbone(str(config), str(other)).fingerprint
    assert fp2["weights_sha256"] != fp["weights_sha256"]


def test_random_weights_are_reproducible(tiny_clip):
    a = load_backbone(str(tiny_clip[0]), "none").model
    b = load_backbone(str(tiny_clip[0]), "none").model
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_hub_fails_fast_in_one_line(tmp_path, sample_dataset):
    """The default backbone (a download) with the hub at a closed local port: no network touched."""
    env = os.environ | {
        "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
        "HF_HOME": str(tmp_path / "hf"),
    }
    cmd = [
        sys.executable,
        "-m",
        "qks_pipeline.cli",
        "embed-labels",
        "--dataset",
        str(sample_dataset.dataset),
    ]
    cmd += [
        "--templates",
        str(sample_dataset.templates),
        "--out",
        str(tmp_path / "l.zarr"),
        "--device",
        "cpu",
    ]
    start = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and time.monotonic() - start < 20 and len(lines) == 1, done.stderr
    assert (
        "cannot download the 'openai' weights of ViT-B-16" in lines[0] and "unreachable" in lines[0]
    )
    # OpenAI's file, which open_clip downloads from its URL and `resolve_weights` knows by its hash
    url = open_clip.get_pretrained_cfg("ViT-B-16", "openai")["url"]
    assert lines[0].endswith(
        f"download {url} where there is internet, then set "
        "backbone.pretrained=/path/to/ViT-B-16.pt (params.yaml, --set or --pretrained)"
    )


@pytest.mark.parametrize(
    ("name", "tag", "source", "setting"),
    [
        (
            "ViT-B-32",
            "laion2b_s34b_b79k",
            "https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K/resolve/main/"
            "open_clip_model.safetensors (or open_clip_pytorch_model.bin there)",
            "backbone.pretrained=/path/to/open_clip_model.safetensors (params.yaml, --set or "
            "--pretrained)",
        ),
        (
            "ViT-B-16",
            "dfn2b",
            "https://huggingface.co/apple/DFN2B-CLIP-ViT-B-16/resolve/main/"
            "open_clip_model.safetensors (or open_clip_pytorch_model.bin there)",
            "backbone.pretrained=/path/to/open_clip_model.safetensors and "
            "backbone.model=ViT-B-16-quickgelu (params.yaml, --set or --pretrained/--model)",
        ),
    ],
)
def test_offline_a_hub_tag_names_the_hub_file_and_its_settings(name, tag, source, setting):
    """A hub file is not known by its hash: QuickGELU weights need the -quickgelu model name."""
    hint = offline_hint(name, open_clip.get_pretrained_cfg(name, tag))
    assert hint == f"download {source} where there is internet, then set {setting}"


def test_bad_names_are_user_errors(tiny_clip):
    with pytest.raises(QKSError, match="unknown open_clip model"):
        load_backbone("No-Such-Model", "openai")
    with pytest.raises(QKSError, match="neither an open_clip tag"):
        load_backbone(str(tiny_clip[0]), "no-such-tag")
    with pytest.raises(QKSError, match="config file not found"):
        load_backbone("missing/TinyCLIP.json", "none")


@pytest.mark.parametrize(
    ("vision_extra", "message"),
    [
        ({"attentional_pool": True}, "attention-pooling"),
        ({"final_ln_after_pool": True}, "CLS-token pooling"),
        ({"pool_type": "avg"}, "CLS-token pooling"),
    ],
)
def test_unsupported_towers_are_refused(tiny_clip, tmp_path, vision_extra, message):
    cfg = json.loads(tiny_clip[0].read_text())
    cfg["vision_cfg"].update(vision_extra)
    path = tmp_path / f"TinyCLIP-{next(iter(vision_extra))}.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(QKSError, match=message):
        load_backbone(str(path), "none")


def test_a_non_vit_tower_is_refused():
    fake = torch.nn.Module()
    fake.visual = torch.nn.Identity()  # stands for a timm or ResNet tower
    with pytest.raises(QKSError, match="not an open_clip VisionTransformer"):
        check_supported(fake, "fake")


def test_a_torchscript_archive_loads_as_a_quickgelu_model(tiny, tiny_clip, tmp_path):
    """OpenAI's .pt files are TorchScript QuickGELU models; a traced tiny model stands in."""
    model, tokenizer = tiny.model, tiny.tokenizer
    archive = tmp_path / "openai-style.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(
            model, (torch.zeros(1, 3, 64, 64), tokenizer(["a"])), check_trace=False
        ).save(archive)
    backbone = load_backbone(str(tiny_clip[0]), str(archive))
    loaded = backbone.model
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert isinstance(
        loaded.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU
    )
    assert backbone.fingerprint["quick_gelu"] is True


def test_hub_log_lines_are_printed_once_under_the_cli_logging():
    code = (
        "import logging, qks_pipeline.stage_one.backbone; "
        "from qks_pipeline.cli.stage_one import _log_setup; _log_setup(); "
        "logging.getLogger('huggingface_hub.file_download').warning('hub note')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stderr.count("hub note") == 1, done.stderr


def test_safetensors_alternatives_follow_open_clips_downloader():
    """open_clip keeps its rule private; when it changes, this test names what to update."""
    from open_clip import pretrained

    from qks_pipeline.stage_one.backbone import safetensors_alternatives

    private = getattr(pretrained, "_get_safe_alternatives", None)
    if private is None:
        pytest.skip("open_clip no longer has _get_safe_alternatives: check its download rule")
    for file in ("open_clip_pytorch_model.bin", "model.bin", "model.pth", "model.safetensors"):
        assert safetensors_alternatives(file) == list(private(file)), (
            f"open_clip's safetensors rule changed for {file}: update safetensors_alternatives"
        )
