"""Expert usage statistics: per layer and expert, how often the router selects it and its mean gate probability;
a heat-map PNG."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import token_windows
from .plotting import pyplot
from .probes import RouterProbes


@dataclass
class ExpertUsage:
    """freq[l, e]: fraction of tokens whose top-k includes expert e at layer l (each row sums to k).
    prob[l, e]: mean router probability p(e|x) over tokens (each row sums to 1)."""

    att_freq: torch.Tensor  # [L, E_att]
    att_prob: torch.Tensor  # [L, E_att]
    mlp_freq: torch.Tensor  # [L, E_mlp]
    mlp_prob: torch.Tensor  # [L, E_mlp]
    tokens: int

    def site(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        if kind not in ("att", "mlp"):
            raise ValueError(f"expert site must be 'att' or 'mlp', got {kind!r}")
        return (self.att_freq, self.att_prob) if kind == "att" else (self.mlp_freq, self.mlp_prob)

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            **{k: getattr(self, k).tolist() for k in ("att_freq", "att_prob", "mlp_freq", "mlp_prob")},
        }


@torch.no_grad()
def expert_usage(
    model, data, seq_len: int = 128, batch_size: int = 16, max_batches: int | None = None, tokenizer=None
) -> ExpertUsage:
    """Run `model` (eval mode: greedy top-k routing) over consecutive windows of `data` (a token tensor, token
    file or text file, see molm.train.load_tokens) and count, per router, the tokens that select each expert."""
    windows = token_windows(
        data,
        tokenizer,
        seq_len,
        model.config.vocab_size,
        "usage data",
        None if max_batches is None else max_batches * batch_size,
    )
    c = model.config
    sites = {"att": (c.n_att_experts, ".attn.q_proj.gate"), "mlp": (c.n_mlp_experts, ".mlpf.gate")}
    counts = {kind: torch.zeros(c.n_layer, e, dtype=torch.float64) for kind, (e, _) in sites.items()}
    probs = {kind: torch.zeros(c.n_layer, e, dtype=torch.float64) for kind, (e, _) in sites.items()}
    was_training = model.training
    model.eval()
    total = 0
    for i in range(0, len(windows), batch_size):
        x = windows[i : i + batch_size].to(model.device)
        with RouterProbes(model) as probes:
            model(x, return_aux_loss=False)
        for name, r in probes.routings:
            layer = int(name.split(".")[2])  # transformer.h.<layer>....
            kind = "att" if name.endswith(sites["att"][1]) else "mlp"
            counts[kind][layer] += torch.bincount(r.experts.reshape(-1).cpu(), minlength=counts[kind].shape[1])
            probs[kind][layer] += r.probs.double().sum(0).cpu()
        total += x.numel()
    model.train(was_training)
    return ExpertUsage(counts["att"] / total, probs["att"] / total, counts["mlp"] / total, probs["mlp"] / total, total)


def plot_usage(usage: ExpertUsage, path: str, title: str | None = None) -> bool:
    """Heat maps of selection frequency (layers x experts) for the attention and MLP experts, as a PNG.
    False when matplotlib is missing."""
    plt = pyplot("usage plot")
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.6 * usage.att_freq.shape[0] + 2.2), squeeze=False)
    for ax, kind in zip(axes[0], ("att", "mlp")):
        freq = usage.site(kind)[0].numpy()
        im = ax.imshow(freq, aspect="auto", cmap="viridis", vmin=0)
        ax.set_title(f"{'attention' if kind == 'att' else 'MLP'} experts: selection frequency")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_xticks(range(freq.shape[1]))
        ax.set_yticks(range(freq.shape[0]))
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
