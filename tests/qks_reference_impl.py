"""An independent, deliberately naive re-computation of the QKS forward pass, on reference-layout
(BERT-named) tensors.

Everything is spelled out with explicit matmuls and per-image, per-head loops: the softmax, the erf
GELU and the LayerNorm are written by hand, in float64. Tests compare
`qks_pipeline.stage_two.model.QKS` and the reference-checkpoint importer against it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

EPS = 1e-12  # BERT's LayerNorm epsilon


def layer_norm(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + EPS) * w + b


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def linear(sd: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def attention(sd: dict[str, Tensor], prefix: str, x: Tensor, ctx: Tensor, num_heads: int) -> Tensor:
    """BERT attention + self-output for one image: x (N, D), ctx (T, Dk) -> (N, D)."""
    q, k, v = (
        linear(sd, f"{prefix}.self.{n}", t) for n, t in (("query", x), ("key", ctx), ("value", ctx))
    )
    hd = q.shape[1] // num_heads
    heads = []
    for h in range(num_heads):
        cols = slice(h * hd, (h + 1) * hd)
        s = q[:, cols] @ k[:, cols].T / math.sqrt(hd)  # (N, T)
        e = torch.exp(s - s.max(dim=1, keepdim=True).values)
        heads.append((e / e.sum(dim=1, keepdim=True)) @ v[:, cols])  # (N, hd)
    out = linear(sd, f"{prefix}.output.dense", torch.cat(heads, dim=1))
    return layer_norm(
        x + out, sd[f"{prefix}.output.LayerNorm.weight"], sd[f"{prefix}.output.LayerNorm.bias"]
    )


def reference_scores(
    sd: dict[str, Tensor], tokens: Tensor, label_emb: Tensor, num_heads: int, keep_cls: bool = True
) -> Tensor:
    """Per-query label scores (B, N, C) from a state dict in the reference's key layout."""
    sd = {k: v.double() for k, v in sd.items()}
    tokens, label_emb = tokens.double(), label_emb.double()
    num_layers = len({k.split(".")[3] for k in sd if k.startswith("net.encoder.layer.")})
    out = []
    for b in range(tokens.shape[0]):
        ctx = tokens[b] if keep_cls else tokens[b, 1:]
        x = layer_norm(
            sd["query_tokens"][0],
            sd["net.embeddings.LayerNorm.weight"],
            sd["net.embeddings.LayerNorm.bias"],
        )
        for i in range(num_layers):
            p = f"net.encoder.layer.{i}"
            x = attention(sd, f"{p}.attention", x, x, num_heads)
            x = attention(sd, f"{p}.crossattention", x, ctx, num_heads)
            h = linear(
                sd, f"{p}.output_query.dense", gelu(linear(sd, f"{p}.intermediate_query.dense", x))
            )
            x = layer_norm(
                x + h,
                sd[f"{p}.output_query.LayerNorm.weight"],
                sd[f"{p}.output_query.LayerNorm.bias"],
            )
        out.append(x @ sd["proj"] @ label_emb.T)  # (N, C)
    return torch.stack(out)


# Our parameter names -> the reference's BERT names, written out independently of
# qks_pipeline.stage_two.authors_checkpoint.
_OURS_TO_REF = {
    "self_attn.query": "attention.self.query",
    "self_attn.key": "attention.self.key",
    "self_attn.value": "attention.self.value",
    "self_attn.dense": "attention.output.dense",
    "self_attn.norm": "attention.output.LayerNorm",
    "cross_attn.query": "crossattention.self.query",
    "cross_attn.key": "crossattention.self.key",
    "cross_attn.value": "crossattention.self.value",
    "cross_attn.dense": "crossattention.output.dense",
    "cross_attn.norm": "crossattention.output.LayerNorm",
    "ffn.fc1": "intermediate_query.dense",
    "ffn.fc2": "output_query.dense",
    "ffn.norm": "output_query.LayerNorm",
}


def ours_to_reference(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a `QKS.state_dict()` to the reference layout."""
    out = {}
    for key, value in state.items():
        if key in ("query_tokens", "proj"):
            out[key] = value
        elif key.startswith("embed_norm."):
            out["net.embeddings.LayerNorm." + key.split(".")[-1]] = value
        else:
            _, i, block, sub, param = key.split(".")
            out[f"net.encoder.layer.{i}.{_OURS_TO_REF[f'{block}.{sub}']}.{param}"] = value
    return out


def random_reference_state(
    num_layers: int, num_queries: int, dim: int, embed_dim: int, ff_dim: int, seed: int = 0
) -> dict[str, Tensor]:
    """A reference-layout checkpoint (without `clip_model.*`) with random values, including the
    unused BERT weights.

    LayerNorm weights and biases are random too, so that a swapped or misplaced tensor changes the
    result.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.1, mean: float = 0.0) -> Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    sd = {
        "query_tokens": rnd(1, num_queries, dim, std=1.0),
        "proj": rnd(dim, embed_dim, std=dim**-0.5),
        "net.embeddings.word_embeddings.weight": rnd(30, dim),
        "net.embeddings.position_embeddings.weight": rnd(16, dim),
        "net.embeddings.position_ids": torch.arange(16)[None],
        "net.embeddings.LayerNorm.weight": rnd(dim, mean=1.0),
        "net.embeddings.LayerNorm.bias": rnd(dim),
    }
    shapes = {"intermediate_query.dense": (ff_dim, dim), "output_query.dense": (dim, ff_dim)}
    # the unused text feed-forward
    shapes |= {"intermediate.dense": (ff_dim, dim), "output.dense": (dim, ff_dim)}
    for block in ("attention", "crossattention"):
        shapes |= {f"{block}.self.{n}": (dim, dim) for n in ("query", "key", "value")}
        shapes[f"{block}.output.dense"] = (dim, dim)
    for i in range(num_layers):
        p = f"net.encoder.layer.{i}"
        for name, (out_f, in_f) in shapes.items():
            sd[f"{p}.{name}.weight"] = rnd(out_f, in_f, std=in_f**-0.5)
            sd[f"{p}.{name}.bias"] = rnd(out_f)
        for name in ("attention.output", "crossattention.output", "output_query", "output"):
            sd[f"{p}.{name}.LayerNorm.weight"] = rnd(dim, mean=1.0)
            sd[f"{p}.{name}.LayerNorm.bias"] = rnd(dim)
    return sd


# ------------------------------------------------------------------------- the reference's training
def reference_asl(
    x: Tensor, targets: Tensor, masked: bool = False, gamma_neg: float = 4.0, eps: float = 1e-5
) -> Tensor:
    """ASL's `AsymmetricLossOptimized(gamma_neg=4, gamma_pos=0, clip=0, eps=1e-5,
    disable_torch_grad_focal_loss=True)` step by step, in its in-place style, scaled as the QKS
    reference scales it (x 1000 / (B x C)). `masked` (masl) multiplies out the unknown (0) entries.
    """
    y = (targets == 1).to(x.dtype)
    anti = 1 - y
    xs_pos = torch.sigmoid(x)
    xs_neg = 1.0 - xs_pos
    loss = y * torch.log(xs_pos.clamp(min=eps))
    loss.add_(anti * torch.log(xs_neg.clamp(min=eps)))
    # the authors' switch: the focusing weight is a constant to autograd
    torch.set_grad_enabled(False)
    w = torch.pow(1 - xs_pos * y - xs_neg * anti, 0.0 * y + gamma_neg * anti)
    torch.set_grad_enabled(True)
    loss *= w
    if masked:
        loss = loss * (targets != 0).to(x.dtype)
    return -loss.sum() * 1000 / (x.shape[0] * x.shape[1])


def reference_bce(x: Tensor, targets: Tensor, masked: bool = False) -> Tensor:
    """BCE written out: -(y log s(x) + (1 - y) log(1 - s(x))) summed (over annotated entries if
    `masked`) / (B x C)."""
    y = (targets == 1).to(x.dtype)
    per_entry = -(y * torch.log(torch.sigmoid(x)) + (1 - y) * torch.log(1 - torch.sigmoid(x)))
    if masked:
        per_entry = per_entry * (targets != 0).to(x.dtype)
    return per_entry.sum() / x.numel()


def reference_adamw(
    params: dict[str, Tensor], grads: dict[str, Tensor], state: dict, lr: float, wd: float
) -> None:
    """One AdamW step in place on `params` (torch's defaults: betas (0.9, 0.999), eps 1e-8)."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    state["t"] = t = state.get("t", 0) + 1
    for k, p in params.items():
        m = state.get(("m", k), torch.zeros_like(p))
        v = state.get(("v", k), torch.zeros_like(p))
        m = b1 * m + (1 - b1) * grads[k]
        v = b2 * v + (1 - b2) * grads[k] ** 2
        state[("m", k)], state[("v", k)] = m, v
        p.mul_(1 - lr * wd)  # decoupled weight decay, on every parameter (one group)
        p.sub_(lr * (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps))


def reference_step(
    params: dict[str, Tensor],
    batch: tuple[Tensor, Tensor, Tensor],
    num_heads: int,
    state: dict,
    lr: float,
    wd: float,
) -> float:
    """The reference's step on our-named float64 parameters: naive forward, max, ASL, AdamW."""
    tokens, label_emb, targets = batch
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    # (B, C)
    logits = (
        reference_scores(ours_to_reference(leaves), tokens, label_emb, num_heads).max(dim=1).values
    )
    loss = reference_asl(logits, targets)
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
    reference_adamw(params, grads, state, lr, wd)
    return loss.item()
