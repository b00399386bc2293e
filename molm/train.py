"""Causal-LM training and finetuning: AdamW, warmup + cosine schedule, gradient accumulation, fp32 or bf16 (fp32 master
weights), MI aux loss (docs/model.md §4), load concentration, periodic eval perplexity, HF-format checkpoints with
resume, tqdm progress, a loss-curve PNG, and torchrun data parallel (gradient all-reduce; gloo on CPU, nccl on CUDA).

Batches are random windows of the token stream drawn from a generator seeded by (seed, step, micro-step), and the
global RNG (router `sample_topk`, dropout) is reseeded the same way, so a resumed run repeats the uninterrupted
one step for step, and N ranks with batch b see exactly the windows one process with batch N*b would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import ModuleFormerConfig
from .data import as_tokenizer, batch_windows, check_tokens, load_tokens
from .evaluate import perplexity_of_stream as perplexity  # molm.train.perplexity: the eval perplexity logged here
from .model import ModuleFormerForCausalLM
from .modules import Router
from .plotting import pyplot
from .probes import RouterProbes
from .quantization import require_float_weights

STATE_FILE = "trainer_state.pt"
LOG_FILE = "log.jsonl"


@dataclass
class TrainConfig:
    steps: int = 1000
    seq_len: int = 128
    batch_size: int = 16  # windows per micro-step per rank
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int | None = None  # None: min(50, 10% of steps), so that a short run still reaches lr
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    precision: str = "float32"  # or "bfloat16": bf16 weights/activations, fp32 master weights and AdamW state
    aux_loss_weight: float | None = None  # MI loss weight; None keeps model.config.aux_loss_weight
    sample_topk: int | None = None  # None keeps model.config.sample_topk
    concentration_weight: float = 0.0  # load concentration: + w * sum over routers of H(mean routing probs)
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 0  # 0: save at the end only
    seed: int = 0
    device: str = "auto"  # cuda when available (cuda:LOCAL_RANK under torchrun), else cpu
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form notes stored with the checkpoint


# --- losses ------------------------------------------------------------------------------------------------------
def concentration_loss(routings) -> torch.Tensor:
    """Sum over routers of the marginal entropy H(p̄) of expert usage, p̄_e = mean over tokens of p(e|x).

    This is exactly the term the MI loss (docs/model.md §4) *maximises* to balance experts, with the sign flipped:
    adding it with weight w turns L_MI = H(e|x) - H(e) into H(e|x) - (1 - w) H(e). For w > 1 the pressure is to
    concentrate the task's tokens on few experts while each token stays confident, so the unused experts can be pruned.
    It uses probabilities, not top-k counts, so it is differentiable and also moves mass off experts that are not
    chosen.
    """
    total = None
    for _, r in routings:
        marginal = r.probs.float().mean(0)
        h = -(marginal * (marginal + 1e-8).log()).sum()
        total = h if total is None else total + h
    return total


# --- schedule, optimiser -----------------------------------------------------------------------------------------
def warmup_steps(cfg: TrainConfig) -> int:
    """cfg.warmup when given, else 50 steps or 10% of the run, whichever is fewer."""
    return cfg.warmup if cfg.warmup is not None else max(1, min(50, cfg.steps // 10))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine down to cfg.lr * min_lr_ratio at cfg.steps."""
    warmup = warmup_steps(cfg)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _param_groups(params: list[tuple[str, torch.nn.Parameter]], frozen_rows: dict, weight_decay: float):
    """Decay matrices; not biases, LayerNorms, or tensors with frozen rows (decoupled decay would move them)."""
    decay = [p for n, p in params if p.dim() >= 2 and n not in frozen_rows]
    no_decay = [p for n, p in params if p.dim() < 2 or n in frozen_rows]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _maybe_init_distributed(device: str) -> None:
    """Under torchrun (WORLD_SIZE > 1) join the process group: nccl on CUDA, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if str(device).startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")


def _average_across_ranks(grads: list[torch.Tensor], sums: dict, world: int) -> dict:
    """Average the fp32 gradients (in place) and the logged sums over the ranks with one all-reduce.

    gloo's worker thread drops its reference to the buffer only after the collective has completed, and dropping a
    tensor that Python also holds takes the GIL. A rank that exits before that thread got the GIL aborts at
    interpreter shutdown ("terminate called without an active exception"), so wait, with the GIL released, until
    the backend has let go of the buffer.
    """
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor(list(sums.values()), device=grads[0].device)])
    held_by_python = sys.getrefcount(flat)
    dist.all_reduce(flat)
    flat /= world
    if dist.get_backend() == "gloo":
        deadline = time.monotonic() + 30.0
        while sys.getrefcount(flat) > held_by_python and time.monotonic() < deadline:
            time.sleep(1e-4)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return dict(zip(sums, flat[offset:].tolist()))


# --- model -------------------------------------------------------------------------------------------------------
def _as_model(model, seed: int, device: str):
    if isinstance(model, ModuleFormerConfig):
        torch.manual_seed(seed)
        return ModuleFormerForCausalLM(model).init_weights(seed).to(device)
    if isinstance(model, (str, os.PathLike)):
        from .loading import load

        return load(model, dtype=torch.float32, device=device)
    if not isinstance(model, ModuleFormerForCausalLM):
        raise TypeError(
            f"model must be a ModuleFormerForCausalLM, a ModuleFormerConfig or a checkpoint directory, "
            f"got {type(model).__name__}"
        )
    return model.to(device=device, dtype=torch.float32)  # fp32 master weights in both precisions


@dataclass
class TrainResult:
    model: ModuleFormerForCausalLM
    history: list[dict]  # one dict per logged step: step, lr, loss, ce, aux, (eval_ppl)


def train(
    model,
    train_data,
    out_dir=None,
    eval_data=None,
    tokenizer=None,
    config: TrainConfig | None = None,
    resume: bool = False,
    **overrides,
) -> TrainResult:
    """Train `model` (a ModuleFormerForCausalLM, a ModuleFormerConfig to initialise, or a checkpoint directory) on
    `train_data` (see `load_tokens`). Keyword overrides set TrainConfig fields. With `out_dir`, writes the model
    (config.json + model.safetensors), the tokenizer, trainer_state.pt, log.jsonl and loss.png there;
    `resume=True` continues from out_dir's trainer_state.pt. Returns the trained model (fp32) and the log."""
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    if cfg.device == "auto":
        cuda = torch.cuda.is_available()
        cfg.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu"
    if cfg.precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision must be 'float32' or 'bfloat16', got {cfg.precision!r}")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.seq_len < 2:
        raise ValueError("steps, batch_size and grad_accum must be >= 1 and seq_len >= 2")
    _maybe_init_distributed(cfg.device)
    rank, world = _rank_world()
    tokenizer = as_tokenizer(tokenizer)
    model = _as_model(model, cfg.seed, cfg.device)
    require_float_weights(model, "training")
    if tokenizer is None and getattr(model, "name_or_path", None):
        try:
            tokenizer = as_tokenizer(model.name_or_path)
        except FileNotFoundError:
            pass
    if cfg.aux_loss_weight is not None:
        model.config.aux_loss_weight = cfg.aux_loss_weight
    if cfg.sample_topk is not None:
        model.config.sample_topk = cfg.sample_topk
        for m in model.modules():
            if isinstance(m, Router):
                m.sample_topk = cfg.sample_topk
    model.config.validate()
    tokens = load_tokens(train_data, tokenizer)
    check_tokens(tokens, cfg.seq_len, model.config.vocab_size, "training data")
    eval_tokens = load_tokens(eval_data, tokenizer) if eval_data is not None else None
    if eval_tokens is not None:
        check_tokens(eval_tokens, cfg.seq_len, model.config.vocab_size, "evaluation data")

    edits = getattr(model, "expert_edits", None)
    frozen_rows = edits.frozen_rows if edits is not None else {}
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.precision == "bfloat16":  # the model computes in bf16; AdamW updates fp32 master copies
        master = [p.detach().float().clone().requires_grad_(True) for _, p in params]
        model.to(torch.bfloat16)
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    else:
        master = [p for _, p in params]
    groups = _param_groups(list(zip([n for n, _ in params], master)), frozen_rows, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=False)

    start, history = 0, []
    state_path = os.path.join(out_dir, STATE_FILE) if out_dir else None
    if resume:
        if not state_path or not os.path.isfile(state_path):
            raise FileNotFoundError(f"resume=True but {state_path or 'out_dir=None'} holds no {STATE_FILE}")
        state = torch.load(state_path, map_location=cfg.device, weights_only=True)
        with torch.no_grad():
            for p, saved in zip(master, state["master"]):
                p.copy_(saved)
            for (_, p), m in zip(params, master):
                p.copy_(m)
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["step"], json.loads(state["history"])

    model.train()
    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums = {"loss": 0.0, "ce": 0.0, "aux": 0.0, "conc": 0.0}
        for micro in range(cfg.grad_accum):
            seed = (cfg.seed * 1_000_003 + step) * 101 + micro
            torch.manual_seed(seed * 7 + rank)  # router sampling / dropout: per rank, repeatable on resume
            generator = torch.Generator().manual_seed(seed)
            x = batch_windows(tokens, cfg.seq_len, cfg.batch_size * world, generator)
            x = x[rank * cfg.batch_size : (rank + 1) * cfg.batch_size].to(cfg.device)
            with RouterProbes(model) as probes:
                out = model(x, return_aux_loss=True)
            logits = out.logits
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            loss = ce
            if model.config.aux_loss_weight > 0:
                loss = loss + model.config.aux_loss_weight * out.aux_loss.float()
            if cfg.concentration_weight > 0:
                conc = concentration_loss(probes.routings)
                loss = loss + cfg.concentration_weight * conc
                sums["conc"] += float(conc.detach()) / cfg.grad_accum
            (loss / cfg.grad_accum).backward()
            sums["loss"] += float(loss.detach()) / cfg.grad_accum
            sums["ce"] += float(ce.detach()) / cfg.grad_accum
            sums["aux"] += float(out.aux_loss.detach()) / cfg.grad_accum
        for (_, p), m in zip(params, master):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if m is not p:
                m.grad = p.grad.float()
                p.grad = None
        if world > 1:
            sums = _average_across_ranks([m.grad for m in master], sums, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(master, cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if master[0] is not params[0][1]:
            with torch.no_grad():
                for (_, p), m in zip(params, master):
                    p.copy_(m)
        entry = {"step": step + 1, "lr": lr, **{k: round(v, 5) for k, v in sums.items()}}
        if grad_norm is not None:
            entry["grad_norm"] = round(float(grad_norm), 4)
        last = step + 1 == cfg.steps
        if eval_tokens is not None and rank == 0 and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            entry["eval_ppl"] = round(perplexity(model, eval_tokens, cfg.seq_len, cfg.batch_size, cfg.eval_batches), 4)
        history.append(entry)
        if bar is not None:
            bar.set_postfix({k: entry[k] for k in ("ce", "eval_ppl") if k in entry})
            bar.update(1)
        if out_dir and rank == 0 and (last or (cfg.save_every and (step + 1) % cfg.save_every == 0)):
            _save(model, out_dir, master, optimizer, step + 1, history, cfg, tokenizer)
    if bar is not None:
        bar.close()
    if out_dir and rank == 0:
        plot_history(history, os.path.join(out_dir, "loss.png"))
        model.name_or_path = os.fspath(out_dir)  # saved there with its tokenizer: later saves copy it from there
    if master[0] is not params[0][1]:  # hand back an fp32 model
        model.float()
        with torch.no_grad():
            for (_, p), m in zip(params, master):
                p.copy_(m)
    model.eval()
    return TrainResult(model, history)


def _save(model, out_dir, master, optimizer, step, history, cfg, tokenizer) -> None:
    os.makedirs(out_dir, exist_ok=True)
    if tokenizer is not None and hasattr(tokenizer, "save"):  # first: save_pretrained describes it for transformers
        tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    model.save_pretrained(out_dir)  # also copies the tokenizer files of model.name_or_path when there are any
    state = {
        "step": step,
        "master": [m.detach().cpu() for m in master],
        "optimizer": optimizer.state_dict(),
        "history": json.dumps(history),
        "train_config": json.dumps(dataclasses.asdict(cfg)),
    }
    tmp = os.path.join(out_dir, STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(out_dir, STATE_FILE))  # a crash mid-save never leaves a torn state
    with open(os.path.join(out_dir, LOG_FILE), "w", encoding="utf-8") as f:
        for entry in history:
            f.write(json.dumps(entry) + "\n")


def plot_history(history: list[dict], path: str) -> bool:
    """Training cross entropy and eval perplexity against step, as a PNG. False when matplotlib is missing."""
    plt = pyplot("loss plot")
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["ce"] for h in history], label="train cross entropy", lw=1)
    evals = [h for h in history if "eval_ppl" in h]
    if evals:
        ax.plot([h["step"] for h in evals], [math.log(h["eval_ppl"]) for h in evals], "o-", label="eval log ppl")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
