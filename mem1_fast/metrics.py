"""Where the trainer's metric records go besides metrics.jsonl: TensorBoard event files, Weights & Biases.

A record is one JSON object per SFT step, RL step or evaluation (`phase`, `step`, then numbers). Each sink turns
its numbers into scalars tagged by their prefix (`rollout/`, `loss/`, `value/`, `mismatch/`, `time/`, `eval/`;
unprefixed keys go under the phase: `sft/loss`, `rl/trained_tokens`), at the record's step. After a resume the
steps a killed run logged past its last checkpoint appear twice in these viewers (metrics.jsonl is trimmed).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def scalars(record: dict) -> dict[str, float]:
    phase = record.get("phase", "rl")
    return {(k if "/" in k else f"{phase}/{k}"): float(v) for k, v in record.items()
            if k not in ("phase", "step") and isinstance(v, (int, float))}


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class TensorBoard:
    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(directory), flush_secs=10)  # metrics.jsonl is the record of truth

    def __call__(self, record: dict) -> None:
        for tag, v in scalars(record).items():
            self.writer.add_scalar(tag, v, global_step=int(record.get("step", 0)))

    def close(self) -> None:
        self.writer.close()


class WandB:
    """One W&B run per output directory: its id is kept in <output_dir>/wandb_id, so a resumed run continues it."""

    def __init__(self, project: str, out: Path, config: dict):
        import wandb
        id_file = out / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id)
        self.run = wandb.init(project=project, id=run_id, resume="allow", dir=str(out),
                              config=json.loads(json.dumps(config, default=str)))

    def __call__(self, record: dict) -> None:
        self.run.log({**scalars(record), f"{record.get('phase', 'rl')}/step": record.get("step", 0)})

    def close(self) -> None:
        self.run.finish()
