"""Single-file PPO trainer for MEM1 agents, read top to bottom.

    python -m mem1_fast.train                 # CPU default: tiny Llama, synthetic multi-hop QA, in-process BM25
    python -m mem1_fast.train --task webshop  # the same on WebShop-style shopping
    python -m mem1_fast.train --advantage gae # PPO with a critic and GAE, as MEM1 trains
    python -m mem1_fast.train --help          # every option
    torchrun --nproc-per-node 8 -m mem1_fast.train --model DIR ...   # FSDP2 over ranks (mem1_fast/distributed.py)

Each step: sample task episodes (each repeated `group_size` times), roll them out with the engine (KV cache
consolidated per `mode`), score them, pack the trajectories in the mode's exact layout, turn rewards into
per-token advantages (`--advantage`: GAE with a critic, GRPO or RLOO; mem1_fast/advantages.py), and take PPO
updates on the generated tokens only, with log-probs and entropy computed from the hidden states of those tokens
(`ops.ppo_loss`) under the interval visibility (`ops.state_attention`). In an exact mode the log-prob each token
was sampled with *is* the old-policy log-prob (the exactness invariant), so no extra forward pass is spent on it;
an engine whose numerics differ gets its old log-probs recomputed and truncated importance weights.

Writes `<output_dir>/metrics.jsonl` (keys grouped as rollout/, loss/, value/, mismatch/, time/), an HF-format
checkpoint in `<output_dir>/checkpoint/` (model, tokenizer, trainer_state.pt with optimizer, critic and RNG
states), and resumes from it when present: a resumed run logs what the uninterrupted run would have.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from tqdm import tqdm

from . import advantages, rollout
from .consolidation import EXACT_MODES


@dataclass
class TaskOptions:
    """The task and its retrieval (the options `mem1_fast.eval` shares)."""
    task: str = "synthetic"
    """a generated task: 'synthetic' (multi-hop QA, a fresh random world per episode) or 'webshop' (WebShop-style
    shopping, a fresh random catalog per episode); or a MEM1-format parquet file (needs --corpus or --retriever-url)"""
    corpus: str = ""
    """JSONL corpus in MEM1 format for in-process BM25 (parquet tasks)"""
    retriever_url: str = ""
    """MEM1-style HTTP retriever (POST /retrieve) instead of in-process BM25 (parquet tasks)"""
    topk: int = 3
    """documents per search (parquet tasks; generated tasks set their own)"""
    max_turns: int = 6
    """turn limit for parquet tasks (a generated task's is the expert's turns + 2)"""
    obs_max_tokens: int = 1000
    """token budget of one observation for parquet tasks (documents are cut to fit, tags and hint kept)"""


@dataclass
class Args(TaskOptions):
    output_dir: str = "runs/mem1_default"
    """where metrics.jsonl and checkpoint/ go; an existing checkpoint there is resumed"""
    seed: int = 0
    """seed for task sampling, sampling and initialization"""
    model: str = ""
    """local HF model directory; empty = a tiny Llama built offline over the generated task's vocabulary (the
    synthetic task's for a parquet task)"""
    mode: Literal[EXACT_MODES] = "recompute"
    """consolidation mode (docs/design.md §3): what the engine keeps and the exact training layout; 'full' is the
    full-context baseline (every turn keeps the whole history)"""
    engine: Literal[rollout.names()] = "hf"
    """rollout engine: 'hf' runs the trainer's own model (exact log-probs); 'paged' too, over a paged KV cache"""
    n_min: int = 1
    """fewest objectives (questions, purchases) per generated episode"""
    n_max: int = 4
    """most objectives per generated episode (training never sees more; evaluation goes past it)"""
    rl_n_min: int = 0
    """generated tasks: fewest objectives of an RL episode (0 = max(--n-min, --n-max - 1)): RL samples where the warm
    start still errs, with a budget of the expert's turns + 2"""
    steps: int = 80
    """RL steps"""
    episodes_per_step: int = 16
    """distinct task episodes per step"""
    group_size: int = 4
    """rollouts per episode (grpo / rloo compare the rollouts of a group)"""
    max_new_tokens: int = 24
    """tokens generated per turn at most"""
    temperature: float = 0.7
    """sampling temperature (the trainer scores tokens at the same temperature); 0.7 for the tiny default, whose
    samples at 1.0 were too noisy for RL to move its greedy policy (README, "The CPU default")"""
    lr: float = 3e-4
    """learning rate of the RL phase (AdamW)"""
    advantage: Literal[advantages.names()] = "grpo"
    """advantage estimator: 'gae' (PPO with a critic, MEM1's), 'grpo' (reward normalized in its group), 'rloo'
    (reward minus the mean of the group's other rollouts)"""
    gamma: float = 1.0
    """gae: discount per generated token"""
    lam: float = 1.0
    """gae: lambda of the advantage estimate"""
    critic: Literal["separate", "shared"] = "separate"
    """gae: the value model: a copy of the policy's decoder with a value head, or a head on the policy's states"""
    critic_lr: float = 1e-4
    """gae: learning rate of the critic (AdamW)"""
    vf_coef: float = 0.5
    """gae: weight of the value loss (shared critic: next to the policy loss)"""
    vf_clip: float = 0.2
    """gae: clip range of the values around the values at rollout time (0 = no clipping)"""
    whiten_advantages: Literal["auto", "yes", "no"] = "auto"
    """normalize the advantages over the step's trained tokens ('auto': for gae only)"""
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    """how token losses are averaged: over all tokens of the step, or per trajectory (summed or averaged)"""
    clip_eps: float = 0.2
    """PPO ratio clip"""
    entropy_coef: float = 0.0
    """entropy bonus weight"""
    kl_coef: float = 0.0
    """weight of the KL to a frozen reference policy (0 = no reference model is kept)"""
    kl_in: Literal["loss", "reward"] = "loss"
    """where the KL goes: a loss term (k3), or a per-token penalty in the reward"""
    kl_estimator: Literal["k1", "k3"] = "k3"
    """KL estimator (k1 = logp - ref, k3 = exp(ref - logp) - (ref - logp) - 1); the loss term is k3"""
    tis: Literal["token", "sequence", "off"] = "token"
    """when old log-probs are recomputed: truncated importance weights pi_trainer / pi_engine on the policy
    gradient, per token or per trajectory"""
    tis_cap: float = 2.0
    """truncation of the importance weights"""
    ppo_epochs: int = 1
    """passes over each step's rollouts"""
    ppo_minibatches: int = 1
    """optimizer steps per pass: the step's trajectories are split into this many mini-batches (MEM1 takes 2)"""
    max_tokens_per_batch: int = 8192
    """token budget of one packed forward (trajectories are never split)"""
    share_question: bool = False
    """pack the samples of a group with one copy of their question (same loss and gradients, fewer tokens)"""
    recompute_old_logprobs: bool = False
    """score rollouts with a forward pass instead of the sampled log-probs; on by itself when the engine says
    its log-probs are not the trainer's (e.g. bf16 vLLM vs fp32 training)"""
    sft_steps: int = 800
    """generated tasks only: supervised warm start on scripted-expert trajectories before RL (800 steps on the
    synthetic task: about 6 minutes on 2 CPU cores)"""
    sft_batch: int = 32
    """expert episodes per SFT step"""
    sft_lr: float = 2e-3
    """SFT learning rate (AdamW, linear warm-up then cosine)"""
    sft_teacher_shortcut: float = 0.6
    """SFT only: the scripted teacher is hasty: with this probability it makes its task's mistake (synthetic: on a
    two-hop question it answers with the entity of the first hop, a weaker teacher's classic multi-hop mistake;
    webshop: it buys without selecting the color and size). Imitation learns the habit; RL, rewarded for the
    task's score, has to unlearn it. 0 = a perfect teacher"""
    sft_position_jitter: int = 64
    """SFT only: every expert trajectory's tokens after the question get their positions shifted by a random
    0..this (PoSE-style skipped positions), so the lookups into the question are learned at the distances that
    episodes with more objectives have; RL and evaluation use the engine's exact positions"""
    sft_save_every: int = 100
    """SFT steps between checkpoints"""
    eval_every: int = 40
    """RL steps between greedy evaluations (0 = never)"""
    eval_episodes: int = 64
    """fresh episodes per evaluation (generated tasks: per number of objectives)"""
    eval_objectives: str = "1,2,4,8"
    """generated tasks: the numbers of objectives each evaluation covers (comma-separated; may lie past --n-max),
    each with a budget of the expert's turns + 2"""
    save_every: int = 10
    """RL steps between checkpoints (a final one is always written)"""
    tensorboard: bool = True
    """also write the metrics as TensorBoard events in <output_dir>/tensorboard/ (when tensorboard is installed:
    the logging extra)"""
    wandb_project: str = ""
    """also log the metrics to this Weights & Biases project (needs wandb; empty = off)"""
    threads: int = 0
    """torch CPU threads (0 = leave torch's default)"""
    device: str = "cpu"
    """torch device for training and the HF engine (under torchrun on GPUs: each rank's LOCAL_RANK device)"""
    activation_checkpointing: bool = False
    """recompute each decoder layer's activations in the backward pass (policy and critic)"""
    bf16: bool = False
    """under torchrun on GPUs: FSDP2 mixed precision (bf16 parameters and compute, fp32 gradient reduction);
    old log-probs are then recomputed by the trainer"""


# --- setup: every option and input checked before a model is built -------------------------------------------
class UsageError(ValueError):
    """A bad option value, combination or input file; the CLI prints it on one line and exits with status 2."""


def check_args(args: Args) -> None:
    """Option values and combinations (cheap; files are read by load_task and load_model_and_tokenizer)."""
    from . import tasks

    def need(ok: bool, option: str, problem: str):
        if not ok:
            raise UsageError(f"{option}: {problem}")

    least = dict(steps=0, episodes_per_step=1, max_new_tokens=1, ppo_epochs=1, ppo_minibatches=1,
                 max_tokens_per_batch=1, sft_steps=0, sft_batch=1, sft_save_every=1, sft_position_jitter=0,
                 eval_every=0, eval_episodes=1, save_every=1, threads=0, topk=1, max_turns=1, obs_max_tokens=1)
    for name, lo in least.items():
        need(getattr(args, name) >= lo, "--" + name.replace("_", "-"), f"{getattr(args, name)} must be >= {lo}")
    need(args.ppo_minibatches <= args.episodes_per_step * args.group_size, "--ppo-minibatches",
         f"{args.ppo_minibatches}: more mini-batches than the step's {args.episodes_per_step * args.group_size} "
         "trajectories (--episodes-per-step x --group-size)")
    need(args.group_size >= 2 or args.advantage in advantages.CRITIC, "--group-size",
         f"{args.group_size}: {args.advantage} compares the rollouts of a group, so a group of one gives every "
         "rollout advantage 0; use 2 or more (or --advantage gae)")
    need(math.isfinite(args.temperature) and args.temperature > 0, "--temperature",
         f"{args.temperature}: RL samples its rollouts, so the temperature must be a finite number > 0 "
         "(evaluation is greedy whatever this is)")
    for option, value in (("--lr", args.lr), ("--sft-lr", args.sft_lr), ("--clip-eps", args.clip_eps),
                          ("--critic-lr", args.critic_lr)):
        need(math.isfinite(value) and value > 0, option, f"{value} must be a finite number > 0")
    for option, value in (("--entropy-coef", args.entropy_coef), ("--kl-coef", args.kl_coef),
                          ("--vf-coef", args.vf_coef), ("--vf-clip", args.vf_clip)):
        need(math.isfinite(value) and value >= 0, option, f"{value} must be a finite number >= 0")
    for option, value in (("--gamma", args.gamma), ("--lam", args.lam)):
        need(math.isfinite(value) and 0 <= value <= 1, option, f"{value} must lie in [0, 1]")
    need(math.isfinite(args.tis_cap) and args.tis_cap >= 1, "--tis-cap", f"{args.tis_cap} must be a number >= 1")
    need(not (args.kl_in == "loss" and args.kl_estimator == "k1"), "--kl-estimator",
         "k1 as a loss term has zero expected gradient (E[grad log p] = 0); the loss term is k3, "
         "k1 goes in the reward (--kl-in reward)")
    if args.task in tasks.names():
        need(args.n_min >= 1, "--n-min", f"{args.n_min}: an episode needs at least 1 objective")
        need(args.n_max >= args.n_min, "--n-max", f"{args.n_max} is smaller than --n-min {args.n_min}")
        need(args.rl_n_min == 0 or args.n_min <= args.rl_n_min <= args.n_max, "--rl-n-min",
             f"{args.rl_n_min} must lie in --n-min..--n-max ({args.n_min}..{args.n_max}) or be 0")
        try:
            tasks.get(args.task)(n_range=(args.n_min, args.n_max), slack=2)
        except ValueError as e:
            raise UsageError(f"--n-max: {args.n_max} objectives of task {args.task!r}: {e}") from None
        need(0 <= args.sft_teacher_shortcut <= 1, "--sft-teacher-shortcut",
             f"{args.sft_teacher_shortcut} is a probability: it must lie in [0, 1]")
        from .eval import parse_objectives
        parse_objectives(args.eval_objectives, "--eval-objectives", args.task)
        need(not args.corpus and not args.retriever_url, "--corpus/--retriever-url",
             f"the {args.task} task builds its own documents per episode; these options are for parquet tasks")
    else:
        need(Path(args.task).is_file(), "--task", f"{args.task!r} is neither a generated task "
             f"({', '.join(tasks.names())}) nor an existing parquet file")
        need(bool(args.corpus) != bool(args.retriever_url), "--corpus/--retriever-url",
             "a parquet task needs exactly one of --corpus (in-process BM25) or --retriever-url (HTTP)")
        if args.retriever_url:
            from urllib.parse import urlparse
            u = urlparse(args.retriever_url)
            need(u.scheme in ("http", "https") and bool(u.netloc), "--retriever-url",
                 f"{args.retriever_url!r} is not an http(s) URL")
    need(rollout.serves(args.engine, args.mode), "--engine",
         f"{args.engine!r} cannot serve --mode {args.mode!r}; engines that can: "
         f"{', '.join(e for e in rollout.names() if rollout.serves(e, args.mode))}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UsageError(f"--device: {args.device!r} is not a torch device ({e})") from None
    need(device.type in ("cpu", "cuda"), "--device", f"{args.device!r}: only cpu and cuda are supported")
    need(not args.bf16 or (device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1), "--bf16",
         "bf16 mixed precision is FSDP2's: run under torchrun on CUDA devices")
    if device.type == "cuda":
        n = torch.cuda.device_count()
        need(n > 0, "--device", f"{args.device!r}: no CUDA device here")
        need(device.index is None or device.index < n, "--device", f"{args.device!r}: this machine has {n} CUDA "
             f"device(s)")
    out = Path(args.output_dir)
    need(not out.exists() or out.is_dir(), "--output-dir", f"{args.output_dir!r} exists and is not a directory")
    from .metrics import available
    need(not args.wandb_project or available("wandb"), "--wandb-project", "wandb is not installed (pip install wandb)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output-dir: cannot create {args.output_dir!r} ({e.strerror or e})") from None


def load_task(args: Args):
    """The task's data, read and checked: a generated task, or the parquet examples with their retriever."""
    from . import tasks
    if args.task in tasks.names():
        cls = tasks.get(args.task)
        # every turn budget up to the task's limit, so no hint number is new when evaluated at a larger N
        return cls(seed=args.seed, n_range=(args.n_min, args.n_max), slack=(2, cls.MAX_TURNS)), None
    from .retrieval import BM25Retriever, HttpRetriever, load_corpus
    from .tasks.qa import load_mem1_parquet
    path = Path(args.task)
    try:
        examples = load_mem1_parquet(path)
    except (OSError, ValueError, KeyError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise UsageError(f"--task: {args.task!r} is not a readable MEM1 parquet file: {_one_line(e)}") from None
    if not examples:
        raise UsageError(f"--task: {args.task!r} has no rows")
    if args.retriever_url:
        return examples, HttpRetriever(args.retriever_url)
    try:
        docs = load_corpus(args.corpus)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"--corpus: {args.corpus!r} is not a readable JSONL corpus: {_one_line(e)}") from None
    if not docs:
        raise UsageError(f"--corpus: {args.corpus!r} has no documents")
    return examples, BM25Retriever(docs)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def load_model_and_tokenizer(args: Args):
    """The tiny default, or a local HF model directory: its tokenizer first (cheap), then the model."""
    from . import hf
    if not args.model:
        from . import tasks
        from .tiny import default_agent
        return default_agent(args.seed, args.task if args.task in tasks.names() else "synthetic")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise UsageError(f"--model: {args.model!r} is not a local HF model directory (no config.json; nothing is "
                         "downloaded)")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises OSError, ValueError, TypeError... for a missing/broken tokenizer
        raise UsageError(f"--model: no usable tokenizer in {args.model!r}: {_one_line(e)}") from None
    if tok.eos_token_id is None:
        raise UsageError(f"--model: the tokenizer in {args.model!r} has no eos token")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=hf.NAME, dtype=torch.float32)
    except Exception as e:  # missing/corrupt weights, an architecture transformers does not know, ...
        raise UsageError(f"--model: cannot load a causal LM from {args.model!r}: {_one_line(e)}") from None
    return model, tok


def episode_sampler(args: Args, task, retriever, tok):
    """`sample(rng, n) -> list[episode]` over the loaded task."""
    if retriever is None:
        return lambda rng, n: [task.sample(rng) for _ in range(n)]
    make = qa_episode_maker(args, retriever, tok)
    return lambda rng, n: [make(rng.choice(task)) for _ in range(n)]


def qa_episode_maker(args: Args, retriever, tok):
    """`make(example) -> QAEpisode`: a parquet row bound to the retriever, rendered as MEM1 renders it."""
    from .tasks.qa import QAEpisode
    # MEM1 applies the chat template with a generation prompt; all turns continue inside that assistant turn
    render = (lambda msgs: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)) \
        if getattr(tok, "chat_template", None) else None
    count = lambda s: len(tok.encode(s, add_special_tokens=False))  # noqa: E731
    return lambda ex: QAEpisode.from_example(ex, retriever, render, topk=args.topk, max_turns=args.max_turns,
                                             obs_budget=args.obs_max_tokens, count_tokens=count)


def probe_texts(sample_episodes, task_cls=None) -> list[str]:
    """Task text a reloaded tokenizer must encode to the same ids: a prompt, and for a generated task a whole
    expert episode (states, actions, observations)."""
    ep = sample_episodes(random.Random(0), 1)[0]
    texts = [ep.prompt]
    if task_cls is not None:
        texts += [g + " " + o for g, o in task_cls.expert_trajectory(ep)]
    return texts


# --- the pieces every phase shares ----------------------------------------------------------------------------
def episode_metrics(trajs, prefix: str) -> dict:
    from .eval import summarize
    return {f"{prefix}/{k}": v for k, v in summarize(trajs).items() if k != "episodes"}


def main(args: Args):
    """Train; returns the final (model, tokenizer). Raises UsageError for bad input: before any model is built for
    options and files, before any training step for a tokenizer that would not reload as itself. Under torchrun
    every rank runs this; rank 0 writes metrics and checkpoints."""
    from . import checkpoint as ckpt_io
    from . import distributed, metrics
    from .advantages import gather_per_trajectory, mismatch_stats
    from .consolidation import pack
    from .critic import Critic, ValueHead, value_loss
    from .eval import evaluate as evaluate_episodes
    from .eval import TIMINGS, generated_episodes, headline, parse_objectives
    from .ops import ppo_loss
    from .rollout import full_state_dict
    from .scoring import PackedLM

    check_args(args)
    d = distributed.init(args.device)
    lead = d.rank == 0
    task, retriever = load_task(args)
    out = Path(args.output_dir)
    ckpt = out / "checkpoint"
    if lead:
        ckpt_io.recover(ckpt)
    d.barrier()
    resuming = ckpt_io.has_state(ckpt)
    model, tok = load_model_and_tokenizer(dataclasses.replace(args, model=str(ckpt)) if resuming else args)
    sample_episodes = episode_sampler(args, task, retriever, tok)
    task_cls = type(task) if retriever is None else None  # a generated task
    if task_cls is not None:  # RL on a generated task: the largest trained N, MEM1's turn budget
        lo = args.rl_n_min or max(args.n_min, args.n_max - 1)
        rl_episodes = episode_sampler(args, task_cls(seed=args.seed, n_range=(lo, args.n_max)), None, tok)
    else:
        rl_episodes = sample_episodes
    probes = probe_texts(sample_episodes, task_cls)
    why = ckpt_io.reload_mismatch(tok, probes, config=model.config)  # checkpoints must reload as this: say so now
    if why:
        raise UsageError(f"--model: AutoTokenizer would not reload the tokenizer of {args.model or 'the tiny model'!r} "
                         f"from a checkpoint as itself: {why}")
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    # trainer state: fresh, or resumed from the checkpoint (the model and tokenizer above were loaded from it)
    state = {"phase": "sft", "sft_step": 0, "rl_step": 0, "py_rng": None}
    saved = None
    if resuming:
        saved = ckpt_io.load_state(ckpt)
        state.update({k: saved[k] for k in state})
        own = saved["ranks"][d.rank] if d.active else saved  # each rank's RNG streams are its own
        torch.set_rng_state(own["torch_rng"])
        state["py_rng"] = own["py_rng"]
        if lead:
            print(f"resuming from {ckpt}: phase {state['phase']}, sft step {state['sft_step']}, "
                  f"rl step {state['rl_step']}")
    if lead:  # what a killed run logged after its last checkpoint is logged again by this one
        ckpt_io.trim_metrics(out / "metrics.jsonl", state)
    metrics_f = open(out / "metrics.jsonl", "a") if lead else None  # check_args created the folder
    sinks = []
    if lead and args.tensorboard:
        if metrics.available("tensorboard"):
            sinks.append(metrics.TensorBoard(out / "tensorboard"))
        else:
            print("tensorboard is not installed: metrics go to metrics.jsonl only (MEM1_FAST_EXTRAS=test,logging)")
    if lead and args.wandb_project:
        sinks.append(metrics.WandB(args.wandb_project, out, dataclasses.asdict(args)))

    def log(record: dict):
        if lead:
            metrics_f.write(json.dumps(record) + "\n")
            metrics_f.flush()
            for sink in sinks:
                sink(record)

    model.to(args.device)
    rng = random.Random(args.seed + 7919 * d.rank)  # every rank samples its own episodes
    if state["py_rng"] is not None:
        rng.setstate(state["py_rng"])
    if lead:
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {len(tok)}, "
              f"mode {args.mode}, output {out}" + (f", {d.world} ranks (FSDP2)" if d.active else ""))
    # the policy the trainer updates (sharded under torchrun) and the unsharded copy that rolls out (on one
    # process, the policy itself: weight sync costs nothing)
    replica = copy.deepcopy(model) if d.active else model
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = distributed.shard(PackedLM(model), model.get_decoder().layers, d, bf16=args.bf16)

    def checkpoint(optimizer, extra=lambda: {}):
        """Every rank takes part (gathering sharded weights and optimizer state); rank 0 writes."""
        mine = {"py_rng": rng.getstate(), "torch_rng": torch.get_rng_state()}
        ranks = d.gather_objects(mine)
        payload = {"optimizer": distributed.optimizer_state(policy, optimizer, d), "torch_rng": mine["torch_rng"],
                   "args": dataclasses.asdict(args), **extra()}
        weights = full_state_dict(model) if d.active else None
        if lead:
            state["py_rng"] = mine["py_rng"]
            payload.update(state)
            if d.active:
                payload["ranks"] = ranks
            ckpt_io.save(ckpt, model, tok, payload, probes, state_dict=weights)
        d.barrier()

    def passes(batches):
        """(batch, weight) for this rank's micro-batch passes, padded so every rank runs as many (FSDP2)."""
        return distributed.pad_passes(batches, d)

    # ---- phase 1: supervised warm start on scripted-expert trajectories (generated tasks) ----------------------
    do_sft = task_cls is not None and args.sft_steps > 0 and state["phase"] == "sft"
    if do_sft:
        opt = torch.optim.AdamW(policy.parameters(), lr=args.sft_lr, betas=(0.9, 0.98), weight_decay=0.01)
        if saved is not None and state["sft_step"] > 0:
            distributed.load_optimizer_state(policy, opt, saved["optimizer"], d)
        warm = max(1, args.sft_steps // 10)
        sched = lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / args.sft_steps)))  # noqa: E731
        bar = tqdm(range(state["sft_step"], args.sft_steps), desc="sft (expert warm start)", dynamic_ncols=True,
                   disable=not lead)
        for step in bar:
            t0 = time.time()
            trajs = [expert_as_trajectory(task_cls, ep, tok, args.sft_teacher_shortcut, rng)
                     for ep in sample_episodes(rng, args.sft_batch)]
            policy.train()
            total_tokens = d.sum(sum(t.num_generated() for t in trajs))  # over every rank's expert tokens
            loss_sum = 0.0
            for g in opt.param_groups:
                g["lr"] = args.sft_lr * sched(step)
            opt.zero_grad(set_to_none=True)
            todo = passes(pack(trajs, args.mode, args.max_tokens_per_batch))
            gaps = torch.randint(0, args.sft_position_jitter + 1, (len(trajs),))
            for i, (batch, w) in enumerate(todo):
                skip_positions(batch, gaps)
                batch = batch.to(args.device)
                distributed.set_gradient_sync(policy, i == len(todo) - 1)
                logp = policy.logprobs(batch, 1.0)
                loss = -logp.sum() / total_tokens  # mean over every expert token of the step
                if w * d.loss_scale != 1.0:  # FSDP2 averages gradients over ranks; padding passes count 0
                    loss = loss * (w * d.loss_scale)
                loss.backward()
                loss_sum += loss.item()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            state["sft_step"] = step + 1
            loss_sum = d.sum(loss_sum) / d.world
            bar.set_postfix(loss=f"{loss_sum:.3f}")
            log({"phase": "sft", "step": step + 1, "loss": loss_sum, "lr": opt.param_groups[0]["lr"],
                 "tokens_per_s": sum(len(t) for t in trajs) / (time.time() - t0)})
            if (step + 1) % args.sft_save_every == 0 and step + 1 < args.sft_steps:
                checkpoint(opt)
        state["phase"] = "rl"
        checkpoint(opt)

    # ---- phase 2: RL (PPO; advantages from --advantage) -----------------------------------------------------
    state["phase"] = "rl"
    if d.active:  # the rollout copy starts from the policy as SFT (or the checkpoint) left it
        replica.load_state_dict(full_state_dict(model))
    ref_policy = None
    if args.kl_coef > 0:  # the reference is the policy RL started from, kept on disk so a resumed run has it too
        ref_model = ckpt_io.reference_model(out / "reference", replica, write=lead, wait=d.barrier)
        ref_model.to(args.device).eval().requires_grad_(False)
        ref_policy = distributed.shard(PackedLM(ref_model), ref_model.get_decoder().layers, d, bf16=args.bf16)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    resumed_rl = saved is not None and saved["phase"] == "rl" and state["rl_step"] > 0
    if resumed_rl:
        distributed.load_optimizer_state(policy, opt, saved["optimizer"], d)
    # the critic (gae): a copy of the policy's decoder with a value head, or a head on the policy's own states
    critic = critic_opt = None
    if args.advantage in advantages.CRITIC:
        critic = ValueHead(model.config.hidden_size) if args.critic == "shared" else Critic.from_policy(replica)
        critic.to(args.device)
        if resumed_rl:
            critic.load_state_dict(saved["critic"])
        if args.activation_checkpointing and args.critic == "separate":
            critic.decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        critic = distributed.shard(critic, critic.decoder.layers if args.critic == "separate" else [], d,
                                   bf16=args.bf16)
        critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, betas=(0.9, 0.99), weight_decay=0.0)
        if resumed_rl:
            distributed.load_optimizer_state(critic, critic_opt, saved["critic_optimizer"], d)
    extra_state = lambda: {} if critic is None else {  # noqa: E731
        "critic": full_state_dict(critic), "critic_optimizer": distributed.optimizer_state(critic, critic_opt, d)}
    engine = rollout.create(args.engine, replica, tok, args.mode, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature)
    # the engine knows its numerics; a bf16 trainer never computes what an fp32 engine sampled from
    recompute_old = args.recompute_old_logprobs or not engine.exact_logprobs or args.bf16
    whiten = args.whiten_advantages == "yes" or (args.whiten_advantages == "auto" and critic is not None)
    eval_rng_seed = args.seed + 10_000
    eval_ns = parse_objectives(args.eval_objectives, "--eval-objectives", args.task) if task_cls is not None else []

    def sample(episodes, greedy: bool, seed: int | None = None):
        replica.eval()
        with torch.no_grad():
            return rollout.run_episodes(engine, tok, episodes, rollout.AgentConfig(max_turns=args.max_turns),
                                        greedy=greedy, seed=seed)

    def evaluate(step):
        """Greedy episodes on rank 0's engine (the others wait), summarized by mem1_fast.eval: for a generated
        task fresh episodes at each N of --eval-objectives (held-out N too), else the task's own."""
        rec = None
        if lead:
            if task_cls is not None:
                groups = {f"n{n}/": generated_episodes(args.task, n, args.eval_episodes, eval_rng_seed)
                          for n in eval_ns}
            else:
                groups = {"": sample_episodes(random.Random(eval_rng_seed), args.eval_episodes)}
            rec, everything = {"phase": "eval", "step": step}, []
            replica.eval()
            for key, episodes in groups.items():
                m, trajs = evaluate_episodes(engine, tok, episodes, args.max_turns)
                everything += trajs
                if key:  # one group per N (generated tasks); clocks under time/, like every other clock
                    rec.update({f"{'time/' if k in TIMINGS else ''}eval/{key}{k}": v for k, v in m.items()})
            rec.update(episode_metrics(everything, "eval"))  # pooled over every group
            log(rec)
            h = headline(everything)  # the task's headline metric: em (QA), score (shopping)
            per_n = [f"N={k[:-1].removeprefix('n')} {rec[f'eval/{k}{h}_per_objective']:.2f} "
                     f"({rec[f'eval/{k}peak_kv_tokens']:.0f} KV)" for k in groups if k]
            tqdm.write(f"eval at RL step {step}: {h}/objective " + (", ".join(per_n) if per_n else
                       f"{rec[f'eval/{h}_per_objective']:.3f}") + f"; answered {rec['eval/answered']:.2f}")
        d.barrier()
        return rec

    def values_of(b):
        """The critic's values of batch b's trained tokens (shared: a head on the policy's rows)."""
        if args.critic == "shared":
            return critic(policy(b, lambda rows, w, t: rows))
        return critic(b)

    if state["rl_step"] == 0 and args.eval_every:
        evaluate(0)
    bar = tqdm(range(state["rl_step"], args.steps), desc=f"rl ({args.mode}, {args.advantage})", dynamic_ncols=True,
               disable=not lead)
    for step in bar:
        t0 = time.time()
        # 1. rollouts: each episode repeated group_size times (on every rank, its own episodes)
        base = rl_episodes(rng, args.episodes_per_step)
        episodes = [ep for ep in base for _ in range(args.group_size)]
        trajs = sample(episodes, greedy=False, seed=rng.randrange(2**31))
        t_rollout = time.time() - t0
        lengths = [t.num_generated() for t in trajs]

        # 2. pack in the mode's exact layout, then score what the update needs, per trajectory in sampling order:
        #    old log-probs (the sampled ones in an exact mode, unless the engine's numerics differ), the reference's,
        #    the critic's values at rollout time
        #    (each PPO mini-batch of trajectories packed on its own; trajectory ids stay the step's)
        minibatches = [(len(trajs) * m // args.ppo_minibatches, len(trajs) * (m + 1) // args.ppo_minibatches)
                       for m in range(args.ppo_minibatches)]
        batches, mb_of = [], []
        for m, (lo, hi) in enumerate(minibatches):
            for b in pack(trajs[lo:hi], args.mode, args.max_tokens_per_batch, share_question=args.share_question):
                if lo:
                    b.traj_ids += lo
                batches.append(b.to(args.device))
                mb_of.append(m)
        todo = passes(batches)
        each = lambda f: [f(b) for b, _ in todo][:len(batches)]  # noqa: E731  (padding passes: collectives only)
        per_traj = lambda name, xs: gather_per_trajectory(batches, xs, lengths, name)  # noqa: E731
        sampled_lp = [b.old_logprobs[b.loss_positions()] for b in batches]
        policy.eval()
        with torch.no_grad():
            old = each(lambda b: policy.logprobs(b, args.temperature)) if recompute_old else sampled_lp
            ref = each(lambda b: ref_policy.logprobs(b, args.temperature)) if ref_policy else None
            if critic is not None:
                critic.eval()
                old_v = each(values_of)
        total_tokens = d.sum(sum(lengths))  # the step's trained tokens over all ranks
        stats = {}
        if recompute_old:  # how far the engine's sampling distribution is from the trainer's
            stats.update(mismatch_stats(torch.cat(old), torch.cat(sampled_lp)))

        # 3. advantages (and the critic's targets), per generated token of each trajectory
        rewards = torch.tensor([t.reward for t in trajs])
        kl = None
        if ref is not None and args.kl_in == "reward":
            kl = per_traj("kl", [advantages.kl_penalty(o, r, args.kl_estimator) for o, r in zip(old, ref)])
            stats["rollout/kl_ref"] = float(sum(k.sum() for k in kl)) / sum(lengths)
        returns = None
        if critic is not None:
            adv, returns = advantages.gae(advantages.token_rewards(rewards.tolist(), lengths, kl, args.kl_coef),
                                          per_traj("values", old_v), args.gamma, args.lam)
        else:
            seq_rewards = rewards if kl is None else rewards - args.kl_coef * torch.stack([k.sum() for k in kl]).float()
            per_seq = advantages.ESTIMATORS[args.advantage](seq_rewards, args.group_size)
            adv = [per_seq[i].expand(n) for i, n in enumerate(lengths)]
        if recompute_old and args.tis != "off":  # truncated importance sampling: engine -> trainer distribution
            w = advantages.tis_weights(per_traj("old", old), per_traj("sampled", sampled_lp), args.tis, args.tis_cap)
            stats["mismatch/tis_truncated_frac"] = float(sum((x >= args.tis_cap).sum() for x in w)) / sum(lengths)
            adv = [a * x for a, x in zip(adv, w)]
        if whiten:  # over the trained tokens of every rank
            adv = advantages.whiten(adv, total=d.sum)
        # loss aggregation: token weights and the normalizer each mini-batch's losses share (over all ranks;
        # FSDP2 averages gradients over ranks, so each rank's loss carries the world size)
        if args.loss_agg == "token-mean":
            token_w, normalizers = None, [d.sum(sum(lengths[lo:hi])) for lo, hi in minibatches]
        else:
            normalizers = [d.sum(hi - lo) for lo, hi in minibatches]
            token_w = None if args.loss_agg == "seq-mean-token-sum" else [torch.full((n,), 1.0 / n) for n in lengths]
        if d.active:
            normalizers = [x / d.loss_scale for x in normalizers]
        adv_b = [advantages.per_token(adv, b).to(args.device) for b in batches]
        tw_b = [None if token_w is None else advantages.per_token(token_w, b).to(args.device) for b in batches]
        ret_b = None if returns is None else [advantages.per_token(returns, b).to(args.device) for b in batches]

        # 4. PPO: clipped surrogate on every generated token (and the clipped value loss), over ppo_epochs passes
        acc = dict.fromkeys(["loss/policy", "loss/entropy", "loss/approx_kl", "loss/old_approx_kl", "loss/clipfrac"]
                            + (["loss/kl_ref"] if ref is not None and args.kl_in == "loss" else [])
                            + (["loss/value", "value/clipfrac"] if critic is not None else []), 0.0)
        skipped = critic is None and d.sum(sum(int(bool((a != 0).any())) for a in adv_b)) == 0
        if not skipped:
            engine.sleep()  # free what the engine can hold while the trainer updates
            policy.train()
            if critic is not None:
                critic.train()
            n, k = sum(lengths) * args.ppo_epochs, args.ppo_epochs * args.ppo_minibatches
            for _, mb in ((e, m) for e in range(args.ppo_epochs) for m in range(args.ppo_minibatches)):
                opt.zero_grad(set_to_none=True)
                if critic_opt is not None:
                    critic_opt.zero_grad(set_to_none=True)
                normalizer = normalizers[mb]
                mb_todo = passes([bi for bi in range(len(batches)) if mb_of[bi] == mb])
                for i, (bi, weight) in enumerate(mb_todo):
                    b = batches[bi]
                    for m in (policy, critic):
                        distributed.set_gradient_sync(m, i == len(mb_todo) - 1)

                    def fused(rows, w, targets):
                        # the loss and its gradient w.r.t. the logits come out of one pass over the vocabulary
                        return rows, ppo_loss(rows, w, targets, old[bi], adv_b[bi],
                                              ref[bi] if ref is not None and args.kl_in == "loss" else None,
                                              args.temperature, args.clip_eps, args.entropy_coef,
                                              args.kl_coef if args.kl_in == "loss" else 0.0,
                                              normalizer=normalizer, token_weights=tw_b[bi])
                    rows, (ploss, logp, ent) = policy(b, fused)
                    loss = ploss
                    if critic is not None:
                        v = critic(rows) if args.critic == "shared" else critic(b)
                        vloss, vclip = value_loss(v, old_v[bi], ret_b[bi], args.vf_clip, tw_b[bi], normalizer)
                        loss = loss + args.vf_coef * vloss  # the separate critic's graph is its own: no cross terms
                    if weight != 1.0:  # a padding pass: collectives only
                        loss = loss * weight
                    loss.backward()
                    if weight == 0.0:
                        continue
                    with torch.no_grad():  # CleanRL's statistics: approx_kl is k3, old_approx_kl k1
                        logratio = logp - old[bi]
                        acc["loss/policy"] += float(ploss) / k
                        acc["loss/clipfrac"] += float(((logratio.exp() - 1).abs() > args.clip_eps).sum()) / n
                        acc["loss/entropy"] += float(ent.sum()) / n
                        acc["loss/old_approx_kl"] += float((-logratio).sum()) / n
                        acc["loss/approx_kl"] += float((logratio.exp() - 1 - logratio).sum()) / n
                        if "loss/kl_ref" in acc:
                            dr = ref[bi] - logp
                            acc["loss/kl_ref"] += float((torch.exp(dr) - dr - 1).sum()) / n
                        if critic is not None:
                            acc["loss/value"] += float(vloss.detach()) / k
                            acc["value/clipfrac"] += float(vclip) * len(v) / n
                torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                opt.step()
                if critic_opt is not None:
                    torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
                    critic_opt.step()
            engine.wake()
            engine.sync_weights(model)  # the next rollouts sample from the updated policy
        stats.update(acc)
        if critic is not None:
            v, r = torch.cat(old_v).double().cpu(), torch.cat(ret_b).double().cpu()
            stats.update({"value/mean": float(v.mean()), "value/returns_mean": float(r.mean()),
                          "value/explained_variance": float(1 - (r - v).var() / r.var()) if r.var() > 0 else 0.0})
        state["rl_step"] = step + 1
        elapsed = time.time() - t0
        rec = {"phase": "rl", "step": step + 1, **episode_metrics(trajs, "rollout"), **stats,
               **{f"rollout/{k}": v for k, v in engine.pool_stats().items()},
               "skipped_update": skipped, "trained_tokens": sum(lengths), "packed_batches": len(batches),
               "packed_tokens": sum(b.num_tokens for b in batches),
               "shared_question_tokens_saved": sum(b.saved_tokens for b in batches),
               "time/rollout_s": t_rollout, "time/step_s": elapsed,
               "time/trained_tokens_per_s": sum(lengths) * args.ppo_epochs / max(elapsed - t_rollout, 1e-9)}
        rec = distributed.mean_record(rec, d)  # every rank's rollouts and losses
        log(rec)
        h = headline(trajs)
        bar.set_postfix({"reward": f"{rec['rollout/reward']:.2f}", h: f"{rec[f'rollout/{h}_per_objective']:.2f}",
                         "turns": f"{rec['rollout/turns']:.1f}"})
        if args.eval_every and (step + 1) % args.eval_every == 0:
            evaluate(step + 1)
        if (step + 1) % args.save_every == 0:
            checkpoint(opt, extra_state)
    checkpoint(opt, extra_state)
    if lead:
        metrics_f.close()
        for sink in sinks:
            sink.close()
        print(f"done: metrics in {out / 'metrics.jsonl'}, checkpoint in {ckpt}")
    d.close()
    return model, tok


def skip_positions(batch, gaps: torch.Tensor) -> None:
    """Shift the positions of every token after its trajectory's question by the trajectory's gap (in place)."""
    from .trajectory import Kind
    after = batch.kind != int(Kind.PROMPT)
    batch.position_ids[after] += gaps[batch.traj_ids[after]]


def expert_as_trajectory(task_cls, episode, tok, shortcut: float = 0.0, rng: random.Random | None = None):
    """A scripted-expert episode of a generated task as a Trajectory (log-probs unknown: zeros); `shortcut`: the
    hasty teacher's rate (the task's file says what it gets wrong). The expert's text is tokenized once here; it was
    never sampled, so there is nothing to keep token-identical to."""
    from .trajectory import Trajectory, split_generation, think_splitter
    split = think_splitter(tok)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    triples = [("PROMPT", 0, enc(episode.prompt))]
    for j, (gen, obs) in enumerate(task_cls.expert_trajectory(episode, shortcut, rng)):
        state, action = split_generation(enc(gen), split)
        triples += [("STATE", j, state), ("ACTION", j, action)]
        if obs:
            triples.append(("OBS", j, enc(obs)))
    return Trajectory.from_triples(triples)


def task_args(task: str = "synthetic", **kw) -> Args:
    """Args as `--task TASK` gives them: a generated task's recipe (its `RECIPE`: the option defaults it was tuned
    with) in place of the global defaults, then `kw`."""
    from . import tasks
    recipe = tasks.get(task).RECIPE if task in tasks.names() else {}
    return Args(task=task, **{**recipe, **kw})


def cli(argv: list[str] | None = None) -> None:
    import argparse
    pre = argparse.ArgumentParser(add_help=False)  # --task first: its recipe sets the other options' defaults
    pre.add_argument("--task", default=Args.task)
    task = pre.parse_known_args(sys.argv[1:] if argv is None else argv)[0].task
    args = tyro.cli(Args, args=argv, default=task_args(task))
    try:
        main(args)
    except UsageError as e:  # one line, status 2, no traceback
        print(f"mem1_fast.train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
