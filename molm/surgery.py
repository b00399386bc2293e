"""Change the number of experts of a trained model: `extend` appends new experts, `prune` keeps the used ones.

Both return a fresh plain ModuleFormerForCausalLM whose config has the new n_att_experts / n_mlp_experts, so
`save_pretrained` writes an ordinary MoLM checkpoint that `molm.load` reads back. The expert axis is dim 0 of every
tensor whose shape depends on it: `experts.weight`, `output_experts.weight` and the router's output rows
(`w_gate.3.weight` for the mlp gate, `w_gate.0.weight` for the linear gate, `expert_centroids` for gmm).

Routing caveat (docs/model.md §3.4): gates are the raw softmax probabilities over *all* experts, never
renormalised over the chosen k. So the softmax denominator changes with the expert count:
- extend: new router rows take probability mass from the old experts, so even with freeze_old the old experts'
  gates shrink until the model has learned to use (or ignore) the new ones. New rows start near zero logits (the
  original init, normal(0, initializer_range)), so a new expert starts at about the probability of a neutral one.
- prune: the kept experts' probabilities grow by 1 / (1 - dropped mass) per token. The outputs are unchanged only
  where the dropped experts had zero probability; in general the pruned model equals the original with the dropped
  experts' router logits set to -inf. `prune(..., rescale=True)` scales the kept output projections by
  1 - (mean dropped mass), which undoes the inflation exactly when the dropped mass is the same for every token.
  Load concentration (molm.train concentration_weight) drives that mass towards 0.
"""

from __future__ import annotations

import torch

from .model import ModuleFormerForCausalLM
from .quantization import require_float_weights

SITES = {"att": ("n_att_experts", "k_att", "attn.q_proj"), "mlp": ("n_mlp_experts", "k_mlp", "mlpf")}


def _site_of(key: str, gate_type: str) -> tuple[str, int] | None:
    """('att' | 'mlp', layer) for a tensor that has an expert axis, else None."""
    parts = key.split(".")
    if len(parts) < 4 or parts[:2] != ["transformer", "h"]:
        return None
    router_rows = {"mlp": "gate.w_gate.3.weight", "linear": "gate.w_gate.0.weight", "gmm": "gate.expert_centroids"}
    rest = ".".join(parts[3:])
    for kind, (_, _, prefix) in SITES.items():
        if rest in (
            f"{prefix}.experts.weight",
            f"{prefix}.output_experts.weight",
            f"{prefix}.{router_rows[gate_type]}",
        ):
            return kind, int(parts[2])
    return None


def _rebuild(model: ModuleFormerForCausalLM, config, rows, seed: int | None) -> ModuleFormerForCausalLM:
    """A new model with `config`; every expert-axis tensor is rows(key, kind, layer, old, new_init) along dim 0."""
    if not isinstance(model, ModuleFormerForCausalLM):
        raise TypeError(f"expected a ModuleFormerForCausalLM, got {type(model).__name__}")
    new = ModuleFormerForCausalLM(config, backend=model.backend).init_weights(seed)
    new.to(device=model.device, dtype=model.dtype)
    old_state = model.state_dict()
    state = new.state_dict()
    with torch.no_grad():
        for key, tensor in state.items():
            site = _site_of(key, config.gate_type)
            value = old_state[key] if site is None else rows(key, site[0], site[1], old_state[key], tensor)
            tensor.copy_(value)
    if hasattr(model, "name_or_path"):
        new.name_or_path = model.name_or_path
    return new.train(model.training)


def extend(
    model: ModuleFormerForCausalLM,
    new_att_experts: int = 0,
    new_mlp_experts: int = 0,
    freeze_old: bool = False,
    seed: int | None = None,
) -> ModuleFormerForCausalLM:
    """Append new experts (and router output rows) to every layer. New expert weights use the original init.

    freeze_old=True leaves only the new experts and their router rows trainable: every other parameter gets
    requires_grad=False, and the old rows of the expert tensors get a gradient hook that zeroes them (the trainer
    also keeps those tensors out of weight decay), so AdamW leaves the old rows bitwise unchanged.
    `model.expert_edits.frozen_rows` maps each partly trainable parameter to its number of frozen leading rows.
    """
    require_float_weights(model, "molm.extend")
    for name, n in (("new_att_experts", new_att_experts), ("new_mlp_experts", new_mlp_experts)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {n!r}")
    c = model.config
    config = c.replace(
        n_att_experts=c.n_att_experts + new_att_experts,
        n_mlp_experts=c.n_mlp_experts + new_mlp_experts,
        extra=dict(c.extra),
    )
    config.validate()

    def rows(key, kind, layer, old, init):
        return torch.cat([old, init[old.shape[0] :]], dim=0)

    new = _rebuild(model, config, rows, seed)
    if freeze_old:
        old_counts = {"att": c.n_att_experts, "mlp": c.n_mlp_experts}
        for name, p in new.named_parameters():
            site = _site_of(name, config.gate_type)
            if site is None or p.shape[0] == old_counts[site[0]]:
                p.requires_grad_(False)
                continue
            n_old = old_counts[site[0]]
            new.expert_edits.frozen_rows[name] = n_old
            p.register_hook(lambda g, n=n_old: torch.cat([torch.zeros_like(g[:n]), g[n:]]))
    return new


def _ranked(usage, kind: str, layer: int) -> list[int]:
    """Experts of one site, most used first (selection frequency, then mean probability)."""
    freq, prob = usage.site(kind)
    score = freq[layer].double() + 1e-9 * prob[layer].double()  # probability only breaks ties
    return torch.argsort(score, descending=True, stable=True).tolist()


def keep_counts(model, usage, keep=None, mass: float | None = None) -> dict[str, int]:
    """Experts to keep per layer at each site. keep: int (same for both sites), float in (0, 1] (fraction of the
    experts), or {"att": n, "mlp": m}; mass: smallest count whose most-used experts cover >= mass of the selections
    in every layer (the config has one expert count per site, so the largest over layers wins)."""
    if (keep is None) == (mass is None):
        raise ValueError("prune needs exactly one of keep= (count, fraction or {'att': n, 'mlp': m}) or mass=")
    c = model.config
    counts = {}
    for kind, (e_field, k_field, _) in SITES.items():
        e, k = getattr(c, e_field), getattr(c, k_field)
        if mass is not None:
            if not 0.0 < mass <= 1.0:
                raise ValueError(f"mass must be in (0, 1], got {mass}")
            freq = usage.site(kind)[0]
            n = 1
            for layer in range(c.n_layer):
                f = freq[layer][_ranked(usage, kind, layer)]
                covered = torch.cumsum(f / f.sum().clamp_min(1e-12), 0)
                n = max(n, int((covered < mass - 1e-9).sum()) + 1)
        else:
            value = keep[kind] if isinstance(keep, dict) else keep
            if isinstance(value, float):
                if not 0.0 < value <= 1.0:
                    raise ValueError(f"keep as a fraction must be in (0, 1], got {value}")
                n = max(1, round(value * e))
            elif isinstance(value, int) and not isinstance(value, bool):
                n = value
            else:
                raise TypeError(f"keep for {kind!r} must be an int or a float fraction, got {value!r}")
            if not 1 <= n <= e:
                raise ValueError(f"keep {n} {kind} experts: must be between 1 and {e_field} ({e})")
        counts[kind] = max(n, k)  # top-k needs at least k experts
    return counts


def prune(
    model: ModuleFormerForCausalLM, usage, keep=None, mass: float | None = None, rescale: bool = False
) -> ModuleFormerForCausalLM:
    """Keep the most used experts of every layer (by `usage`, a molm.ExpertUsage) and their router rows; drop the
    rest. See `keep_counts` for keep= / mass=. Kept experts stay in ascending id order.

    Dropping experts inflates the kept gates by 1 / (1 - m(x)), m(x) = the dropped probability mass of token x
    (module docstring); the default gives exactly the original model with the dropped router logits at -inf.
    rescale=True multiplies the kept experts' output projections by (1 - m̄), m̄ = the dropped experts' mean
    probability in `usage`: exact when m(x) is the same for every token, a no-op when m̄ = 0. (In experiments/ it
    did not help: the damage comes from the dropped experts, not from the gate scale.)"""
    require_float_weights(model, "molm.prune")
    counts = keep_counts(model, usage, keep, mass)
    c = model.config
    for kind in SITES:
        shape = tuple(usage.site(kind)[0].shape)
        want = (c.n_layer, getattr(c, SITES[kind][0]))
        if shape != want:
            raise ValueError(f"usage for {kind} experts has shape {list(shape)}, the model needs {list(want)}")
    kept = {
        (kind, layer): sorted(_ranked(usage, kind, layer)[: counts[kind]])
        for kind in SITES
        for layer in range(c.n_layer)
    }
    config = c.replace(n_att_experts=counts["att"], n_mlp_experts=counts["mlp"], extra=dict(c.extra))
    scale = {
        (kind, layer): 1.0 - float(usage.site(kind)[1][layer].sum() - usage.site(kind)[1][layer][ids].sum())
        for (kind, layer), ids in kept.items()
    }

    def rows(key, kind, layer, old, init):
        kept_rows = old[torch.tensor(kept[(kind, layer)], device=old.device)]
        if rescale and key.endswith("output_experts.weight"):
            kept_rows = kept_rows * max(scale[(kind, layer)], 0.0)
        return kept_rows

    new = _rebuild(model, config, rows, seed=0)
    new.expert_edits.kept_experts = {f"{kind}.{layer}": ids for (kind, layer), ids in kept.items()}
    new.expert_edits.output_scale = {f"{kind}.{layer}": s if rescale else 1.0 for (kind, layer), s in scale.items()}
    return new
