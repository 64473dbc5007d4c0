"""Option types and consoles shared by the `genlab` sub-command modules."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

out = Console()
err = Console(stderr=True)

# Sampling options shared by `generate` and `chat` (SamplingParams fields).
MaxNew = Annotated[int, typer.Option("--max-new-tokens", "-m", help="Tokens to generate at most.")]
Temperature = Annotated[float, typer.Option(help="0 = greedy.")]
TopK = Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = off).")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass in (0, 1].")]
MinP = Annotated[float, typer.Option(help="Drop tokens below min_p x the top probability.")]
RepPenalty = Annotated[float, typer.Option(help="Penalise tokens already seen (1 = off).")]
Stop = Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable).")]
Seed = Annotated[Optional[int], typer.Option(help="Same seed -> same output.")]
Dtype = Annotated[str, typer.Option(help="float32 | bfloat16 | float16.")]
Device = Annotated[str, typer.Option(help="cpu | cuda | cuda:1 ...")]
Adapter = Annotated[Optional[list[str]], typer.Option("--adapter", help="LoRA adapter folder, or NAME=FOLDER (repeatable; the first is used).")]

# Training options shared by `pretrain` and `finetune` (TrainConfig fields; None = config file / default).
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (metrics.jsonl, loss.png, checkpoints ...).")]
Config = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of config fields; flags win.")]
SeqLen = Annotated[Optional[int], typer.Option(help="Tokens per training sequence.")]
BatchSize = Annotated[Optional[int], typer.Option(help="Sequences per micro-batch per process.")]
GradAccum = Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step.")]
MaxSteps = Annotated[Optional[int], typer.Option(help="Optimizer steps.")]
MaxMinutes = Annotated[Optional[float], typer.Option(help="Stop cleanly after this many minutes.")]
TimeSchedule = Annotated[Optional[bool], typer.Option(
    "--time-schedule/--step-schedule",
    help="With --max-minutes: decay the learning rate by the clock as well, so the schedule ends when the time does.")]
Lr = Annotated[Optional[float], typer.Option(help="Peak learning rate.")]
Warmup = Annotated[Optional[int], typer.Option(help="Linear warm-up steps.")]
EvalEvery = Annotated[Optional[int], typer.Option(help="Validate every N steps.")]
CkptEvery = Annotated[Optional[int], typer.Option(help="Checkpoint every N steps.")]
TrainSeed = Annotated[Optional[int], typer.Option(help="Seed for init and data order.")]
TrainDevice = Annotated[Optional[str], typer.Option(help="auto | cpu | cuda.")]
Compile = Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the model (GPU).")]
Fsdp = Annotated[Optional[bool], typer.Option("--fsdp/--no-fsdp", help="Shard parameters across torchrun processes.")]
Preset = Annotated[Optional[str], typer.Option(help="Model size preset (genlab model presets).")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")]
